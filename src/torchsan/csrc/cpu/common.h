// What every family of the fused CPU kernels uses: the thread-count-independent parallel loop, the footprint
// geometry and padded planes, fixed-width vectors with partial and streaming loads and stores, the argument checks,
// and the machine's cache sizes that some thresholds derive from.
//
// Layout: NCHW, contiguous. Each task builds a padded copy of the few input planes it needs (reflect or zeros, so
// the hot loops have no bounds checks), then streams rows with stride-1 inner loops that the compiler vectorises.
// Tasks write disjoint outputs, and every reduction runs over fixed chunks in a fixed order: results do not depend
// on the number of threads (except where a kernel hands a product to torch's BLAS: conv1x1.h's small-map route).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <new>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

// The register-blocked blocks: inlined into their loops whatever the compiler's size heuristics decide (out of line,
// their accumulators go through the stack).
#define TORCHSAN_ALWAYS_INLINE inline __attribute__((always_inline))

// The widest vector unit the build targets (the Python side compiles with -march=native unless told otherwise):
// AVX-512, AVX/AVX2, or 128-bit (SSE2 on x86-64, NEON on Arm, and any other target).
#if defined(__AVX512F__)
#define TORCHSAN_VECTOR_ISA "avx512"
#elif defined(__AVX2__)
#define TORCHSAN_VECTOR_ISA "avx2"
#elif defined(__AVX__)
#define TORCHSAN_VECTOR_ISA "avx"
#elif defined(__ARM_NEON)
#define TORCHSAN_VECTOR_ISA "neon"
#elif defined(__SSE2__)
#define TORCHSAN_VECTOR_ISA "sse2"
#else
#define TORCHSAN_VECTOR_ISA "generic"
#endif

// torchsan::cpu has hidden visibility, in every file that opens it: its functions and template instances stay inside
// the extension, as they would in one translation unit's anonymous namespace (called directly, not through the PLT,
// never interposed). Only the module's init function is exported.
namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {

// at::parallel_for inlines its body twice (a serial and a threaded path), and the two copies may be compiled with
// different vectorisation or floating-point contraction. Every kernel goes through parallel_range, which calls one
// out-of-line copy of the body from both paths, so results are the same for any number of threads.
template <typename F>
__attribute__((noinline)) void run_out_of_line(const F& f, int64_t begin, int64_t end) {
  f(begin, end);
}
template <typename F>
void parallel_range(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { run_out_of_line(f, b, e); });
}

// Buffers whose vectors start on cache lines: a 64-byte vector load from a 16-byte-aligned heap block straddles two.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const CacheLineAllocator&) const { return true; }
  bool operator!=(const CacheLineAllocator&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// A k x k footprint with stride s, padding p and dilation d over an H x W plane: the output is Ho x Wo, the padded
// plane Hp x Wp. L = Ho * Wo output positions, K = k * k taps.
struct Geometry {
  int64_t H, W, Ho, Wo, Hp, Wp, k, s, p, d;
  bool reflect;
  Geometry(int64_t H_, int64_t W_, int64_t k_, int64_t s_, int64_t p_, int64_t d_, bool reflect_)
      : H(H_), W(W_), k(k_), s(s_), p(p_), d(d_), reflect(reflect_) {
    const int64_t span = d * (k - 1) + 1;
    Ho = (H + 2 * p - span) / s + 1;
    Wo = (W + 2 * p - span) / s + 1;
    // Only the rows/columns some window touches are needed; keep the full padded extent for simplicity.
    Hp = H + 2 * p;
    Wp = W + 2 * p;
  }
  int64_t L() const { return Ho * Wo; }
  int64_t K() const { return k * k; }
  int64_t plane() const { return Hp * Wp; }
};

inline int64_t reflect_index(int64_t i, int64_t n) {
  if (i < 0) i = -i;
  if (i >= n) i = 2 * (n - 1) - i;
  return i;
}

// dst (Hp x Wp) <- src (H x W) with padding p.
template <typename T>
void pad_plane(const T* src, T* dst, const Geometry& g) {
  for (int64_t i = 0; i < g.Hp; ++i) {
    T* drow = dst + i * g.Wp;
    int64_t si = i - g.p;
    if (!g.reflect && (si < 0 || si >= g.H)) {
      std::fill(drow, drow + g.Wp, T(0));
      continue;
    }
    const T* srow = src + reflect_index(si, g.H) * g.W;
    for (int64_t j = 0; j < g.p; ++j) {
      drow[j] = g.reflect ? srow[reflect_index(j - g.p, g.W)] : T(0);
      drow[g.p + g.W + j] = g.reflect ? srow[reflect_index(g.W + j, g.W)] : T(0);
    }
    std::memcpy(drow + g.p, srow, sizeof(T) * g.W);
  }
}

// dst (H x W) += the padded gradient src (Hp x Wp), folding padded cells back onto their sources.
template <typename T>
void fold_plane(const T* src, T* dst, const Geometry& g) {
  for (int64_t i = 0; i < g.Hp; ++i) {
    int64_t si = i - g.p;
    if (si < 0 || si >= g.H) {
      if (!g.reflect) continue;
      si = reflect_index(si, g.H);
    }
    const T* srow = src + i * g.Wp;
    T* drow = dst + si * g.W;
#pragma omp simd
    for (int64_t j = 0; j < g.W; ++j) drow[j] += srow[g.p + j];  // the interior
    if (g.reflect) {  // the padded columns fold onto their reflections
      for (int64_t j = 0; j < g.p; ++j) {
        drow[reflect_index(j - g.p, g.W)] += srow[j];
        drow[reflect_index(g.W + j, g.W)] += srow[g.p + g.W + j];
      }
    }
  }
}

// Fixed-width vectors (GCC vector extensions): 32 bytes with AVX, else 16 (SSE2, NEON); 64 bytes with AVX-512 when
// the build asks (TORCHSAN_VECTOR_BITS=512: the native build on an AVX-512 CPU, or TORCHSAN_CPU_ARCH=avx512). The
// register-blocked kernels use them: V<T> holds VW<T> values.
#if defined(__AVX512F__) && defined(TORCHSAN_VECTOR_BITS) && TORCHSAN_VECTOR_BITS == 512
#define TORCHSAN_ZMM 1
constexpr int64_t kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int64_t kVectorBytes = 32;
#else
constexpr int64_t kVectorBytes = 16;
#endif
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};

template <typename T>
using V = typename Vec<T>::type;
template <typename T>
constexpr int64_t VW = kVectorBytes / sizeof(T);

// Load lanes <= VW values (zero-filled), store lanes values.
// A constant-size memcpy compiles to one unaligned vector move. A partial vector (row tails: on SAN's 14 and 7 px
// maps most vectors are partial) uses AVX-512's or AVX2's masked moves, which neither touch nor fault on the lanes
// left out; elsewhere, a variable-size memcpy.
#if defined(TORCHSAN_ZMM)
#define TORCHSAN_MASKED_MOVES 1
inline V<float> masked_load(const float* p, int64_t lanes) {
  const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << lanes) - 1), p);
  V<float> out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}
inline V<double> masked_load(const double* p, int64_t lanes) {
  const __m512d v = _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << lanes) - 1), p);
  V<double> out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}
inline void masked_store(float* p, V<float> v, int64_t lanes) {
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << lanes) - 1), m);
}
inline void masked_store(double* p, V<double> v, int64_t lanes) {
  __m512d m;
  std::memcpy(&m, &v, sizeof(m));
  _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << lanes) - 1), m);
}
#elif defined(__AVX2__)
#define TORCHSAN_MASKED_MOVES 1
inline __m256i lane_mask(int64_t lanes, int64_t width) {
  alignas(32) static const int32_t ramp[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  // width = 8 (float): 32-bit lanes; width = 4 (double): each 64-bit lane is two 32-bit -1s.
  if (width == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ramp + 8 - lanes));
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ramp + 8 - 2 * lanes));
}
inline V<float> masked_load(const float* p, int64_t lanes) {
  const __m256 v = _mm256_maskload_ps(p, lane_mask(lanes, 8));
  V<float> out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}
inline V<double> masked_load(const double* p, int64_t lanes) {
  const __m256d v = _mm256_maskload_pd(p, lane_mask(lanes, 4));
  V<double> out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}
inline void masked_store(float* p, V<float> v, int64_t lanes) {
  __m256 m;
  std::memcpy(&m, &v, sizeof(m));
  _mm256_maskstore_ps(p, lane_mask(lanes, 8), m);
}
inline void masked_store(double* p, V<double> v, int64_t lanes) {
  __m256d m;
  std::memcpy(&m, &v, sizeof(m));
  _mm256_maskstore_pd(p, lane_mask(lanes, 4), m);
}
#endif

// Non-temporal (streaming) stores of whole, aligned vectors: they write around the caches instead of first reading
// each destination line in. The gathers use them for outputs too large to stay cached until they are read.
#if defined(TORCHSAN_ZMM)
inline void stream_store(float* p, V<float> v) {
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  _mm512_stream_ps(p, m);
}
inline void stream_store(double* p, V<double> v) {
  __m512d m;
  std::memcpy(&m, &v, sizeof(m));
  _mm512_stream_pd(p, m);
}
inline void stream_fence() { _mm_sfence(); }
constexpr bool kHaveStreamStores = true;
#elif defined(__AVX__)
inline void stream_store(float* p, V<float> v) {
  __m256 m;
  std::memcpy(&m, &v, sizeof(m));
  _mm256_stream_ps(p, m);
}
inline void stream_store(double* p, V<double> v) {
  __m256d m;
  std::memcpy(&m, &v, sizeof(m));
  _mm256_stream_pd(p, m);
}
inline void stream_fence() { _mm_sfence(); }
constexpr bool kHaveStreamStores = true;
#else
template <typename T>
inline void stream_store(T* p, V<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
inline void stream_fence() {}
constexpr bool kHaveStreamStores = false;
#endif

// dst[i] = src[i] for i < n: the whole aligned vectors of dst with stream_store, the ends plainly.
template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && reinterpret_cast<std::uintptr_t>(dst + i) % sizeof(V<T>) != 0; ++i) dst[i] = src[i];
  for (; i + VW<T> <= n; i += VW<T>) {
    V<T> v;
    std::memcpy(&v, src + i, sizeof(v));
    stream_store(dst + i, v);
  }
  for (; i < n; ++i) dst[i] = src[i];
}

template <typename T>
inline V<T> load_partial(const T* p, int64_t lanes) {
  V<T> v = {};
  if (lanes == VW<T>) {
    std::memcpy(&v, p, sizeof(V<T>));
  } else if (lanes > 0) {
#if defined(TORCHSAN_MASKED_MOVES)
    v = masked_load(p, lanes);
#else
    std::memcpy(&v, p, sizeof(T) * lanes);
#endif
  }
  return v;
}
template <typename T>
inline void store_partial(T* p, V<T> v, int64_t lanes) {
  if (lanes == VW<T>) {
    std::memcpy(p, &v, sizeof(V<T>));
  } else if (lanes > 0) {
#if defined(TORCHSAN_MASKED_MOVES)
    masked_store(p, v, lanes);
#else
    std::memcpy(p, &v, sizeof(T) * lanes);
#endif
  }
}
template <typename T>
inline T hsum(V<T> v) {
  T s = 0;
  for (int64_t i = 0; i < VW<T>; ++i) s += v[i];
  return s;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t ceil_div(int64_t v, int64_t m) { return (v + m - 1) / m; }

// Pixels per task of the 1x1 convolutions and the channel statistics: fixed, so that their reductions (per chunk,
// then over the chunks in order) do not depend on the thread count.
constexpr int64_t kPixelChunk = 4096;

// Where the 1x1-convolution kernels and the channel statistics read their input rows (N, Cin, P): a row source's
// row(n, ci, q0, m, scratch) returns the m values x[n, ci, q0 .. q0 + m), either in place (DenseRows) or computed
// into scratch (Subtraction2Rows, which gathers them on the fly).
template <typename T>
struct DenseRows {
  const T* x;
  int64_t Cin, P;
  const T* row(int64_t n, int64_t ci, int64_t q0, int64_t, T*) const { return x + (n * Cin + ci) * P + q0; }
};

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name, " must be float32 or float64");
}

inline void check_geometry(const Geometry& g) {
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "torchsan: the footprint does not fit the input (output size ", g.Ho, "x", g.Wo,
              ")");
  TORCH_CHECK(!g.reflect || (g.p < g.H && g.p < g.W), "torchsan: reflect padding ", g.p,
              " must be smaller than the input size ", g.H, "x", g.W);
}

// ---------------------------------------------------------------------------------------------------------------
// The machine: the L2 and L3 data cache sizes (per core and per L3 slice), read once from Linux sysfs. Not
// sysconf(_SC_LEVEL3_CACHE_SIZE): on some VMs it reports the whole package's L3 instead of the slice a core shares.
struct CacheSizes {
  int64_t l2_bytes = int64_t(1) << 20;  // when sysfs cannot tell
  int64_t l3_bytes = int64_t(32) << 20;
};

// "32768K" -> 33554432; 0 if unreadable.
inline int64_t parse_cache_size(const std::string& text) {
  std::size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (...) {
    return 0;
  }
  const char unit = used < text.size() ? text[used] : ' ';
  if (unit == 'K') value <<= 10;
  if (unit == 'M') value <<= 20;
  if (unit == 'G') value <<= 30;
  return value > 0 ? value : 0;
}

inline CacheSizes read_cache_sizes() {
  CacheSizes sizes;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
    int level = 0;
    std::string type, size;
    if (!(level_file >> level) || !(type_file >> type) || !(size_file >> size)) continue;
    if (type != "Unified" && type != "Data") continue;
    const int64_t bytes = parse_cache_size(size);
    if (bytes == 0) continue;
    if (level == 2) sizes.l2_bytes = bytes;
    if (level == 3) sizes.l3_bytes = bytes;
  }
  return sizes;
}

inline const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = read_cache_sizes();
  return sizes;
}

}  // namespace cpu
}  // namespace torchsan
