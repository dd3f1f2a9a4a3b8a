// Fused CPU kernels for the SAN primitives (aggregation, subtraction2, unfold), forward and backward.
//
// Layout: NCHW, contiguous. Each task builds a padded copy of the few input planes it needs (reflect or
// zeros, so the hot loops have no bounds checks), then streams rows with stride-1 inner loops that the
// compiler vectorises (the stride-1 gathers, one run per tap, from column-shifted copies of each plane).
// Tasks write disjoint outputs: results do not depend on the number of threads.
// The unfolded (N, C, K, L) value tensor is never allocated by the aggregation.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

// at::parallel_for inlines its body twice (a serial and a threaded path), and the two copies may be compiled with
// different vectorisation or floating-point contraction. Every kernel goes through this wrapper, which calls one
// out-of-line copy of the body from both paths, so results are the same for any number of threads.
template <typename F>
__attribute__((noinline)) void run_range(const F& f, int64_t begin, int64_t end) {
  f(begin, end);
}
template <typename F>
void parallel_range(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { run_range(f, b, e); });
}

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

// Output rows per block: each tap's weights for a block are one contiguous run of kRowBlock * W_out values,
// which streams far better than one short row per tap, while the block's outputs stay in L1.
constexpr int64_t kRowBlock = 8;

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

// Fixed-width vectors (GCC vector extensions; 32 bytes = one AVX register), used by the register-blocked kernels.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename T>
using V = typename Vec<T>::type;
template <typename T>
constexpr int64_t VW = 32 / sizeof(T);

// Load nv <= VW values (zero-filled), store nv values.
// A constant-size memcpy compiles to one unaligned vector move. A partial vector (row tails: on SAN's 14 and 7 px
// maps most vectors are partial) uses AVX2's masked moves, which neither touch nor fault on the lanes left out;
// without AVX2, a variable-size memcpy.
#if defined(__AVX2__)
inline __m256i lane_mask(int64_t nv, int64_t lanes) {
  alignas(32) static const int32_t ramp[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  // lanes = 8 (float): 32-bit lanes; lanes = 4 (double): each 64-bit lane is two 32-bit -1s.
  if (lanes == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ramp + 8 - nv));
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ramp + 8 - 2 * nv));
}
inline V<float> masked_load(const float* p, int64_t nv) {
  const __m256 v = _mm256_maskload_ps(p, lane_mask(nv, 8));
  V<float> out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}
inline V<double> masked_load(const double* p, int64_t nv) {
  const __m256d v = _mm256_maskload_pd(p, lane_mask(nv, 4));
  V<double> out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}
inline void masked_store(float* p, V<float> v, int64_t nv) {
  __m256 m;
  std::memcpy(&m, &v, sizeof(m));
  _mm256_maskstore_ps(p, lane_mask(nv, 8), m);
}
inline void masked_store(double* p, V<double> v, int64_t nv) {
  __m256d m;
  std::memcpy(&m, &v, sizeof(m));
  _mm256_maskstore_pd(p, lane_mask(nv, 4), m);
}
#endif

// Non-temporal (streaming) stores of whole, aligned vectors: they write around the caches instead of first reading
// each destination line in. The gathers use them for outputs too large to stay cached until they are read.
#if defined(__AVX__)
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

template <typename T>
inline V<T> load_part(const T* p, int64_t nv) {
  V<T> v = {};
  if (nv == VW<T>) {
    std::memcpy(&v, p, sizeof(V<T>));
  } else if (nv > 0) {
#if defined(__AVX2__)
    v = masked_load(p, nv);
#else
    std::memcpy(&v, p, sizeof(T) * nv);
#endif
  }
  return v;
}
template <typename T>
inline void store_part(T* p, V<T> v, int64_t nv) {
  if (nv == VW<T>) {
    std::memcpy(p, &v, sizeof(V<T>));
  } else if (nv > 0) {
#if defined(__AVX2__)
    masked_store(p, v, nv);
#else
    std::memcpy(p, &v, sizeof(T) * nv);
#endif
  }
}
template <typename T>
inline T hsum(V<T> v) {
  T s = 0;
  for (int64_t i = 0; i < VW<T>; ++i) s += v[i];
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Softmax over the K taps (dim 2) of (N, C, K, L), the pairwise attention's normalisation. Per plane and per vector
// of VW positions: the max over the K taps, exp and sum in one sweep, then the scaling, with the K vectors in L1.
// exp: float32 uses a Cephes-style polynomial (relative error about 2e-7, like torch's SLEEF-based exp), flushing
// arguments below -87.3 (where expf underflows to subnormals) to 0; float64 calls std::exp.
inline V<float> vexp(V<float> x) {
  typedef int32_t VI __attribute__((vector_size(32)));
  const V<float> lo = x < -87.3f ? V<float>{} - 1.0f : V<float>{};  // all-ones where the result underflows
  x = x < -87.3f ? V<float>{} : x;
  x = x > 88.3f ? V<float>{} + 88.3f : x;
  V<float> fx = x * 1.44269504088896341f + 0.5f;
  V<float> fl;
#if defined(__AVX2__)
  __m256 f;
  std::memcpy(&f, &fx, sizeof(f));
  f = _mm256_floor_ps(f);
  std::memcpy(&fl, &f, sizeof(fl));
#else
  for (int i = 0; i < 8; ++i) fl[i] = std::floor(fx[i]);
#endif
  x = x - fl * 0.693359375f - fl * -2.12194440e-4f;
  V<float> y = V<float>{} + 1.9875691500E-4f;
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * x * x + x + 1.0f;
  VI n = __builtin_convertvector(fl, VI);
  n = (n + 127) << 23;
  V<float> pow2;
  std::memcpy(&pow2, &n, sizeof(pow2));
  y = y * pow2;
  VI bits;
  std::memcpy(&bits, &y, sizeof(bits));
  VI keep;
  std::memcpy(&keep, &lo, sizeof(keep));
  bits = bits & ~keep;  // underflow -> +0
  std::memcpy(&y, &bits, sizeof(y));
  return y;
}
inline V<double> vexp(V<double> x) {
  for (int i = 0; i < 4; ++i) x[i] = std::exp(x[i]);
  return x;
}

// Each plane in blocks of kSoftmaxVecs vectors of positions: every tap row is visited for 2 cache lines at a time,
// which keeps the K strided streams prefetchable; the block's K rows stay in L1 between the sweeps.
constexpr int64_t kSoftmaxVecs = 4;

// One block of B vectors of positions starting at q0 (FULL: all B * VW positions are inside the row).
template <typename T, int64_t B, bool FULL>
inline void tap_softmax_block(const T* xp, T* yp, int64_t K, int64_t L, int64_t q0) {
  int64_t nv[B];
  for (int64_t b = 0; b < B; ++b) nv[b] = FULL ? VW<T> : std::max<int64_t>(0, std::min(VW<T>, L - q0 - b * VW<T>));
  auto ld = [&](const T* p, int64_t b) { return FULL ? load_part(p, VW<T>) : load_part(p, nv[b]); };
  auto st = [&](T* p, V<T> v, int64_t b) { FULL ? store_part(p, v, VW<T>) : store_part(p, v, nv[b]); };
  V<T> m[B], sum[B] = {};
  for (int64_t b = 0; b < B; ++b) m[b] = ld(xp + q0 + b * VW<T>, b);
  for (int64_t k = 1; k < K; ++k) {
    if (FULL) {  // the K rows are K strided streams: fetch the next block's lines ahead
      __builtin_prefetch(xp + k * L + q0 + B * VW<T>);
      __builtin_prefetch(xp + k * L + q0 + B * VW<T> + 64 / sizeof(T));
    }
    for (int64_t b = 0; b < B; ++b) {
      const V<T> v = ld(xp + k * L + q0 + b * VW<T>, b);
      m[b] = v > m[b] ? v : m[b];
    }
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t b = 0; b < B; ++b) {
      const V<T> e = vexp(ld(xp + k * L + q0 + b * VW<T>, b) - m[b]);
      sum[b] += e;
      st(yp + k * L + q0 + b * VW<T>, e, b);
    }
  for (int64_t b = 0; b < B; ++b) sum[b] = T(1) / sum[b];
  for (int64_t k = 0; k < K; ++k)
    for (int64_t b = 0; b < B; ++b) {
      T* o = yp + k * L + q0 + b * VW<T>;
      st(o, ld(o, b) * sum[b], b);
    }
}

// One (K, L) plane: y = softmax over K of x.
template <typename T>
void tap_softmax_plane(const T* x, T* y, int64_t K, int64_t L) {
  constexpr int64_t B = kSoftmaxVecs;
  int64_t q0 = 0;
  for (; q0 + B * VW<T> <= L; q0 += B * VW<T>) tap_softmax_block<T, B, true>(x, y, K, L, q0);
  for (; q0 < L; q0 += VW<T>) tap_softmax_block<T, 1, false>(x, y, K, L, q0);
}

template <typename T>
void tap_softmax_kernel(const T* x, T* y, int64_t planes, int64_t K, int64_t L) {
  parallel_range(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tap_softmax_plane(x + t * K * L, y + t * K * L, K, L);
  });
}

// gx = y * (g - sum_k y * g), per position; blocks as in the forward.
template <typename T, int64_t B, bool FULL>
inline void tap_softmax_backward_block(const T* gp, const T* yp, T* op, int64_t K, int64_t L, int64_t q0) {
  int64_t nv[B];
  for (int64_t b = 0; b < B; ++b) nv[b] = FULL ? VW<T> : std::max<int64_t>(0, std::min(VW<T>, L - q0 - b * VW<T>));
  auto ld = [&](const T* p, int64_t b) { return FULL ? load_part(p, VW<T>) : load_part(p, nv[b]); };
  V<T> s[B] = {};
  for (int64_t k = 0; k < K; ++k) {
    if (FULL) {  // 2K strided streams: fetch the next block's lines ahead
      const int64_t next = k * L + q0 + B * VW<T>;
      __builtin_prefetch(yp + next);
      __builtin_prefetch(gp + next);
      __builtin_prefetch(yp + next + 64 / sizeof(T));
      __builtin_prefetch(gp + next + 64 / sizeof(T));
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t i = k * L + q0 + b * VW<T>;
      s[b] += ld(yp + i, b) * ld(gp + i, b);
    }
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t i = k * L + q0 + b * VW<T>;
      const V<T> v = ld(yp + i, b) * (ld(gp + i, b) - s[b]);
      FULL ? store_part(op + i, v, VW<T>) : store_part(op + i, v, nv[b]);
    }
}

// One (K, L) plane; gx may be g (in place: each value is read before it is written).
template <typename T>
void tap_softmax_backward_plane(const T* g, const T* y, T* gx, int64_t K, int64_t L) {
  constexpr int64_t B = kSoftmaxVecs;
  int64_t q0 = 0;
  for (; q0 + B * VW<T> <= L; q0 += B * VW<T>) tap_softmax_backward_block<T, B, true>(g, y, gx, K, L, q0);
  for (; q0 < L; q0 += VW<T>) tap_softmax_backward_block<T, 1, false>(g, y, gx, K, L, q0);
}

template <typename T>
void tap_softmax_backward_kernel(const T* g, const T* y, T* gx, int64_t planes, int64_t K, int64_t L) {
  parallel_range(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      tap_softmax_backward_plane(g + t * K * L, y + t * K * L, gx + t * K * L, K, L);
  });
}

// Stride-1 aggregation, register-blocked: for one output row and VW output pixels, the G feature channels that
// share a weight channel accumulate all K taps in G registers; each tap loads its weight vector once for all G.
// xp: the S padded planes of this task (with VW values of slack after the last), plane = Hp * Wp.
template <typename T, int G>
inline void agg_fwd_block(const T* xp, int64_t plane, const T* wt, T* y0, int64_t ystride, int64_t ho, int64_t q,
                          int64_t nv, const Geometry& g) {
  const int64_t L = g.L();
  V<T> acc[G] = {};
  for (int64_t kh = 0; kh < g.k; ++kh) {
    const T* xrow = xp + (ho + kh * g.d) * g.Wp + q;
    for (int64_t kw = 0; kw < g.k; ++kw) {
      const T* wp = wt + (kh * g.k + kw) * L + ho * g.Wo + q;
      __builtin_prefetch(wp + 4 * VW<T>);  // the K weight rows are K strided streams: fetch ahead explicitly
      const V<T> wv = load_part(wp, nv);
      const T* xb = xrow + kw * g.d;
      for (int j = 0; j < G; ++j) acc[j] += wv * load_part(xb + j * plane, VW<T>);
    }
  }
  for (int j = 0; j < G; ++j) store_part(y0 + j * ystride + ho * g.Wo + q, acc[j], nv);
}

// Backward of the block above: gw[tap] = sum_j gy_j * x_j(tap) (G loads and FMAs, one store per tap), and
// gxp_j(tap) += w[tap] * gy_j into the padded gradient planes. Lanes past nv add exact zeros (gy and w are
// zero-filled there), so full-width read-modify-writes of gxp are safe.
template <typename T, int G>
inline void agg_bwd_block(const T* gy0, int64_t gystride, const T* xp, T* gxp, int64_t plane, const T* wt, T* gwt,
                          bool first, int64_t ho, int64_t q, int64_t nv, const Geometry& g) {
  const int64_t L = g.L();
  V<T> gv[G];
  for (int j = 0; j < G; ++j) gv[j] = load_part(gy0 + j * gystride + ho * g.Wo + q, nv);
  // With wide rows and footprints, taps go column by column: consecutive read-modify-writes of gxp then hit
  // different rows, whereas along a row each overlaps the previous tap's store by all but one lane and the load
  // waits on store forwarding (x0.82-0.91 at 28-56 px, k = 7). Each gxp value sums its taps in the same order
  // either way (by kw within its row).
  const bool by_column = g.k >= 5 && g.Wo >= 2 * VW<T>;
  auto tap = [&](int64_t kh, int64_t kw) {
    const int64_t off = (ho + kh * g.d) * g.Wp + q + kw * g.d, wofs = (kh * g.k + kw) * L + ho * g.Wo + q;
    __builtin_prefetch(wt + wofs + 4 * VW<T>);  // K strided streams each of w and gw: fetch ahead explicitly
    __builtin_prefetch(gwt + wofs + 4 * VW<T>, 1);
    const V<T> wv = load_part(wt + wofs, nv);
    V<T> acc = first ? V<T>{} : load_part(gwt + wofs, nv);
    for (int j = 0; j < G; ++j) {
      acc += gv[j] * load_part(xp + j * plane + off, VW<T>);
      T* gq = gxp + j * plane + off;
      store_part(gq, load_part(gq, VW<T>) + wv * gv[j], VW<T>);
    }
    store_part(gwt + wofs, acc, nv);
  };
  if (by_column) {
    for (int64_t kw = 0; kw < g.k; ++kw)
      for (int64_t kh = 0; kh < g.k; ++kh) tap(kh, kw);
  } else {
    for (int64_t kh = 0; kh < g.k; ++kh)
      for (int64_t kw = 0; kw < g.k; ++kw) tap(kh, kw);
  }
}

// y[n, c, o] = sum_k w[n, c % Cw, k, o] * x[n, c, nbr_k(o)]
// wsm: if given, w holds logits; each task first writes the softmax over K of its (K, L) plane into wsm and then
// aggregates with it while it is in cache.
template <typename T>
void aggregation_forward_kernel(const T* x, const T* w, T* y, int64_t N, int64_t C, int64_t Cw, const Geometry& g,
                                T* wsm = nullptr) {
  const int64_t S = C / Cw, K = g.K(), L = g.L(), HW = g.H * g.W;
  parallel_range(0, N * Cw, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xp(S * g.plane() + VW<T>, T(0));  // slack: full-width loads at the end of the last row
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / Cw, cw = t % Cw;
      const T* wt = w + (n * Cw + cw) * K * L;
      if (wsm) {
        tap_softmax_plane(wt, wsm + (n * Cw + cw) * K * L, K, L);
        wt = wsm + (n * Cw + cw) * K * L;
      }
      for (int64_t j = 0; j < S; ++j) pad_plane(x + (n * C + j * Cw + cw) * HW, xp.data() + j * g.plane(), g);
      if (g.s == 1) {
        for (int64_t ho = 0; ho < g.Ho; ++ho) {
          for (int64_t q = 0; q < g.Wo; q += VW<T>) {
            const int64_t nv = std::min(VW<T>, g.Wo - q);
            int64_t j = 0;
            for (; j + 8 <= S; j += 8)
              agg_fwd_block<T, 8>(xp.data() + j * g.plane(), g.plane(), wt, y + (n * C + j * Cw + cw) * L, Cw * L, ho,
                                  q, nv, g);
            for (; j < S; ++j)
              agg_fwd_block<T, 1>(xp.data() + j * g.plane(), g.plane(), wt, y + (n * C + j * Cw + cw) * L, Cw * L, ho,
                                  q, nv, g);
          }
        }
        continue;
      }
      for (int64_t j = 0; j < S; ++j) std::fill(y + (n * C + j * Cw + cw) * L, y + (n * C + j * Cw + cw + 1) * L, T(0));
      for (int64_t hb = 0; hb < g.Ho; hb += kRowBlock) {
        const int64_t he = std::min(g.Ho, hb + kRowBlock);
        for (int64_t kh = 0; kh < g.k; ++kh) {
          for (int64_t kw = 0; kw < g.k; ++kw) {
            for (int64_t ho = hb; ho < he; ++ho) {
              const T* wrow = wt + (kh * g.k + kw) * L + ho * g.Wo;
              const int64_t off = (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
              for (int64_t j = 0; j < S; ++j) {
                const T* xrow = xp.data() + j * g.plane() + off;
                T* yrow = y + (n * C + j * Cw + cw) * L + ho * g.Wo;
                if (g.s == 1) {
#pragma omp simd
                  for (int64_t wo = 0; wo < g.Wo; ++wo) yrow[wo] += wrow[wo] * xrow[wo];
                } else {
                  for (int64_t wo = 0; wo < g.Wo; ++wo) yrow[wo] += wrow[wo] * xrow[wo * g.s];
                }
              }
            }
          }
        }
      }
    }
  });
}

template <typename T>
// softmax: w is the output of a softmax over K (see the forward's wsm); each task turns its finished (K, L) plane of
// gw into the gradient w.r.t. the logits, in place, while it is in cache.
void aggregation_backward_kernel(const T* gy, const T* x, const T* w, T* gx, T* gw, int64_t N, int64_t C, int64_t Cw,
                                 const Geometry& g, bool softmax = false) {
  const int64_t S = C / Cw, K = g.K(), L = g.L(), HW = g.H * g.W;
  parallel_range(0, N * Cw, 1, [&](int64_t begin, int64_t end) {
    // (slack after the last plane: full-width vector loads and read-modify-writes at the end of its last row)
    std::vector<T> xp(gw ? S * g.plane() + VW<T> : 0, T(0)), gxp(gx ? S * g.plane() + VW<T> : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / Cw, cw = t % Cw;
      if (g.s == 1 && gx && gw) {
        for (int64_t j = 0; j < S; ++j) pad_plane(x + (n * C + j * Cw + cw) * HW, xp.data() + j * g.plane(), g);
        std::fill(gxp.begin(), gxp.end(), T(0));
        const T* wt = w + (n * Cw + cw) * K * L;
        T* gwt = gw + (n * Cw + cw) * K * L;
        for (int64_t ho = 0; ho < g.Ho; ++ho) {
          for (int64_t q = 0; q < g.Wo; q += VW<T>) {
            const int64_t nv = std::min(VW<T>, g.Wo - q);
            int64_t j = 0;
            for (; j + 8 <= S; j += 8)
              agg_bwd_block<T, 8>(gy + (n * C + j * Cw + cw) * L, Cw * L, xp.data() + j * g.plane(),
                                  gxp.data() + j * g.plane(), g.plane(), wt, gwt, j == 0, ho, q, nv, g);
            for (; j < S; ++j)
              agg_bwd_block<T, 1>(gy + (n * C + j * Cw + cw) * L, Cw * L, xp.data() + j * g.plane(),
                                  gxp.data() + j * g.plane(), g.plane(), wt, gwt, j == 0, ho, q, nv, g);
          }
        }
        for (int64_t j = 0; j < S; ++j) {
          T* dst = gx + (n * C + j * Cw + cw) * HW;
          std::fill(dst, dst + HW, T(0));
          fold_plane(gxp.data() + j * g.plane(), dst, g);
        }
        if (softmax) tap_softmax_backward_plane(gwt, wt, gwt, K, L);
        continue;
      }
      if (gw) {
        for (int64_t j = 0; j < S; ++j) pad_plane(x + (n * C + j * Cw + cw) * HW, xp.data() + j * g.plane(), g);
        std::fill(gw + (n * Cw + cw) * K * L, gw + (n * Cw + cw + 1) * K * L, T(0));
      }
      if (gx) std::fill(gxp.begin(), gxp.end(), T(0));
      const T* wt = w + (n * Cw + cw) * K * L;
      T* gwt = gw ? gw + (n * Cw + cw) * K * L : nullptr;
      for (int64_t hb = 0; hb < g.Ho; hb += kRowBlock) {
        const int64_t he = std::min(g.Ho, hb + kRowBlock);
        for (int64_t kh = 0; kh < g.k; ++kh) {
          for (int64_t kw = 0; kw < g.k; ++kw) {
            for (int64_t ho = hb; ho < he; ++ho) {
              const int64_t kofs = (kh * g.k + kw) * L + ho * g.Wo;
              const int64_t off = (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
              for (int64_t j = 0; j < S; ++j) {
                const T* gyrow = gy + (n * C + j * Cw + cw) * L + ho * g.Wo;
                if (gw) {
                  const T* xrow = xp.data() + j * g.plane() + off;
                  T* gwrow = gwt + kofs;
                  if (g.s == 1) {
#pragma omp simd
                    for (int64_t wo = 0; wo < g.Wo; ++wo) gwrow[wo] += gyrow[wo] * xrow[wo];
                  } else {
                    for (int64_t wo = 0; wo < g.Wo; ++wo) gwrow[wo] += gyrow[wo] * xrow[wo * g.s];
                  }
                }
                if (gx) {
                  const T* wrow = wt + kofs;
                  T* gxrow = gxp.data() + j * g.plane() + off;
                  if (g.s == 1) {
#pragma omp simd
                    for (int64_t wo = 0; wo < g.Wo; ++wo) gxrow[wo] += wrow[wo] * gyrow[wo];
                  } else {
                    for (int64_t wo = 0; wo < g.Wo; ++wo) gxrow[wo * g.s] += wrow[wo] * gyrow[wo];
                  }
                }
              }
            }
          }
        }
      }
      if (gx) {
        for (int64_t j = 0; j < S; ++j) {
          T* dst = gx + (n * C + j * Cw + cw) * HW;
          std::fill(dst, dst + HW, T(0));
          fold_plane(gxp.data() + j * g.plane(), dst, g);
        }
      }
      if (softmax && gwt) tap_softmax_backward_plane(gwt, wt, gwt, K, L);
    }
  });
}

// Stride 1: the k column-shifted copies S_kw[h][wo] = xp[h][wo + kw d] (Hp x Wo each) of a padded plane turn each
// tap's window into one contiguous run: tap (kh, kw) is rows kh d .. kh d + Ho - 1 of S_kw, L values from kh d Wo.
// So every tap is one long vectorised loop, where the row-by-row gathers above run Ho loops of Wo values (7 and 14
// on SAN's last stages, mostly remainder iterations). Building the copies costs k Hp rows per plane, not K Ho.
//
// The copies' rows are short on small maps, so they move whole vectors: xp, S and the gradient planes are private
// work buffers with kSlack values past their end. A copied row may spill up to VW - 1 values into the next, which is
// written right after it; an accumulated row reads its source exactly (a masked tail) and adds 0 to the spilled lanes.
template <typename T>
constexpr int64_t kSlack = VW<T>;

template <typename T>
void shift_columns(const T* xp, T* S, const Geometry& g) {
  for (int64_t kw = 0; kw < g.k; ++kw)
    for (int64_t h = 0; h < g.Hp; ++h) {
      const T* src = xp + h * g.Wp + kw * g.d;
      T* dst = S + (kw * g.Hp + h) * g.Wo;
      for (int64_t i = 0; i < g.Wo; i += VW<T>) std::memcpy(dst + i, src + i, sizeof(V<T>));
    }
}

// The adjoint of shift_columns: gxp[h][wo + kw d] += GS_kw[h][wo].
template <typename T>
void unshift_columns(const T* GS, T* gxp, const Geometry& g) {
  for (int64_t kw = 0; kw < g.k; ++kw)
    for (int64_t h = 0; h < g.Hp; ++h) {
      const T* src = GS + (kw * g.Hp + h) * g.Wo;
      T* dst = gxp + h * g.Wp + kw * g.d;
      for (int64_t i = 0; i < g.Wo; i += VW<T>) {
        V<T> acc;
        std::memcpy(&acc, dst + i, sizeof(acc));
        acc += load_part(src + i, std::min(VW<T>, g.Wo - i));
        std::memcpy(dst + i, &acc, sizeof(acc));
      }
    }
}

// The centres of a stride-1 footprint: rows c0 .. c0 + Ho - 1, columns c0 .. of the padded plane xp, as an (Ho, Wo)
// plane. When the padding is the footprint's half-span (SAN's "same" padding) that is the unpadded plane itself.
template <typename T>
void centre_plane(const T* xp, T* cen, const Geometry& g) {
  const int64_t c0 = (g.k / 2) * g.d;
  for (int64_t ho = 0; ho < g.Ho; ++ho) std::memcpy(cen + ho * g.Wo, xp + (ho + c0) * g.Wp + c0, sizeof(T) * g.Wo);
}

// Plane src -> its column-shifted copies S, through the padded buffer xp.
template <typename T>
void shifted_copies(const T* src, T* xp, T* S, const Geometry& g) {
  pad_plane(src, xp, g);
  shift_columns(xp, S, g);
}

// The centres of plane src (see centre_plane): src itself with "same" padding, else extracted into cen through xp.
template <typename T>
const T* centres(const T* src, T* xp, T* cen, const Geometry& g) {
  if (g.p == (g.k / 2) * g.d) return src;
  pad_plane(src, xp, g);
  centre_plane(xp, cen, g);
  return cen;
}

// o[i] = (ct ? ct[i] : 0) - sg * src[i] for i < n, the whole vectors with streaming stores. (sg = +-1: exact
// products, so the same values as the plain loops.)
template <typename T>
void stream_gather_row(T* o, const T* ct, const T* src, T sg, int64_t n) {
  int64_t i = 0;
  for (; i < n && reinterpret_cast<std::uintptr_t>(o + i) % sizeof(V<T>) != 0; ++i)
    o[i] = ct ? ct[i] - sg * src[i] : -sg * src[i];
  for (; i + VW<T> <= n; i += VW<T>) {
    V<T> x;
    std::memcpy(&x, src + i, sizeof(x));
    V<T> v = -sg * x;
    if (ct) {
      V<T> c;
      std::memcpy(&c, ct + i, sizeof(c));
      v = c - sg * x;
    }
    stream_store(o + i, v);
  }
  for (; i < n; ++i) o[i] = ct ? ct[i] - sg * src[i] : -sg * src[i];
}

// Outputs at least this large are streamed (see stream_store): the gathers write K = 9 to 49 times their input,
// which on SAN's shapes (10 to 80 MB at batch 8) does not stay in this machine's caches until it is read.
constexpr int64_t kStreamBytes = int64_t(8) << 20;
constexpr int64_t kStreamRunBytes = 2048;  // and only taps this long (SAN's 28, 56 and 112 px maps)
// Shorter taps leave lines partly written when streamed one by one, so on 14 px maps (taps of 784 bytes) a plane of
// at most kSmallPlaneBytes is gathered into a private buffer and streamed out in one run, on outputs larger than this
// machine's 32 MB L3. Forward, then a sum of the output, 39 MB at 14 px: x1.11-1.32. At 20 MB the sum found the
// output in the L3 only when it was written normally (x0.72-0.79 staged), and on 7 px maps (196-byte taps) the
// staging cost more than the streaming saved (x0.87-0.96 at 39 MB).
constexpr int64_t kSmallPlaneBytes = int64_t(64) << 10;
constexpr int64_t kStagedStreamBytes = int64_t(32) << 20;
constexpr int64_t kStagedRunBytes = 512;

template <typename T>
void gather_forward_s1(const T* x1, const T* x2, T* out, T sign, int64_t N, int64_t C, int64_t Ct, const Geometry& g) {
  const int64_t K = g.K(), L = g.L(), HW = g.H * g.W;
  const bool same = g.p == (g.k / 2) * g.d;  // the centres are x1's own plane
  // Streaming tap by tap pays only in long runs: x1.11-1.36 on 28-112 px maps (taps of 3-50 KB), but x0.73 on 14 px
  // maps and 5 times slower on 7 px maps (taps of 784 and 196 bytes). 14 px planes may go through a buffer (staged).
  const int64_t bytes = N * Ct * K * L * int64_t(sizeof(T));
  const bool stream = kHaveStreamStores && bytes >= kStreamBytes && L * int64_t(sizeof(T)) >= kStreamRunBytes;
  const bool staged = kHaveStreamStores && !stream && bytes > kStagedStreamBytes &&
                      L * int64_t(sizeof(T)) >= kStagedRunBytes && K * L * int64_t(sizeof(T)) <= kSmallPlaneBytes;
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    const T sg = sign;  // a local: the compiler need not reload it after each store
    std::vector<T> xp(g.plane() + kSlack<T>), S(g.k * g.Hp * g.Wo + kSlack<T>), cen(x1 && !same ? L : 0);
    std::vector<T> buf(staged ? K * L : 0);
    for (int64_t t = begin; t < end; ++t) {
      shifted_copies(x2 + t * HW, xp.data(), S.data(), g);
      const T* ct = x1 ? centres(x1 + t * HW, xp.data(), cen.data(), g) : nullptr;
      T* const odst = out + ((t / C) * Ct + t % C) * K * L;  // out has Ct >= C channels
      T* ot = staged ? buf.data() : odst;
      for (int64_t kh = 0; kh < g.k; ++kh) {
        for (int64_t kw = 0; kw < g.k; ++kw) {
          const T* src = S.data() + (kw * g.Hp + kh * g.d) * g.Wo;
          T* o = ot + (kh * g.k + kw) * L;
          if (stream) {
            stream_gather_row(o, ct, src, sg, L);
          } else if (ct) {
#pragma omp simd
            for (int64_t i = 0; i < L; ++i) o[i] = ct[i] - sg * src[i];
          } else {
#pragma omp simd
            for (int64_t i = 0; i < L; ++i) o[i] = -sg * src[i];
          }
        }
      }
      if (staged) stream_gather_row(odst, static_cast<const T*>(nullptr), buf.data(), T(-1), K * L);  // a copy
    }
    if (stream || staged) stream_fence();  // the streamed values are visible to whoever reads the output next
  });
}

// out[n, c, k, o] = (x1 ? x1[n, c, centre(o)] : 0) - sign * x2[n, c, nbr_k(o)]; unfold is x1 = null, sign = -1.
// Stride 1 runs gather_forward_s1; the rows below are strided.
template <typename T>
void gather_forward_kernel(const T* x1, const T* x2, T* out, T sign, int64_t N, int64_t C, int64_t Ct,
                           const Geometry& g) {
  if (g.s == 1) return gather_forward_s1(x1, x2, out, sign, N, C, Ct, g);
  const int64_t K = g.K(), L = g.L(), HW = g.H * g.W, c0 = (g.k / 2) * g.d;
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p1(x1 ? g.plane() : 0), p2(g.plane());
    for (int64_t t = begin; t < end; ++t) {
      if (x1) pad_plane(x1 + t * HW, p1.data(), g);
      pad_plane(x2 + t * HW, p2.data(), g);
      for (int64_t kh = 0; kh < g.k; ++kh) {
        for (int64_t kw = 0; kw < g.k; ++kw) {
          T* ot = out + (((t / C) * Ct + t % C) * K + kh * g.k + kw) * L;  // out has Ct >= C channels
          for (int64_t ho = 0; ho < g.Ho; ++ho) {
            T* orow = ot + ho * g.Wo;
            const T* xrow = p2.data() + (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
            const T* crow = x1 ? p1.data() + (ho * g.s + c0) * g.Wp + c0 : nullptr;
            if (crow) {
              for (int64_t wo = 0; wo < g.Wo; ++wo) orow[wo] = crow[wo * g.s] - sign * xrow[wo * g.s];
            } else {
              for (int64_t wo = 0; wo < g.Wo; ++wo) orow[wo] = -sign * xrow[wo * g.s];
            }
          }
        }
      }
    }
  });
}

// A training-mode BatchNorm's statistics share of the gradient of z = subtraction2(x1, x2), added to gout on the fly:
// gz = gout + a[c] + b[c] * (z - mean[c]) (see channel_stats_backward_kernel), z recomputed from x1 and x2.
template <typename T>
struct StatsCorrection {
  const T *x1, *x2, *a, *b, *mean;  // x1, x2 (N, C, H, W); a, b, mean (C)
};

template <typename T>
void gather_backward_s1(const T* gout, T* gx1, T* gx2, T sign, int64_t N, int64_t C, int64_t Ct, const Geometry& g,
                        const StatsCorrection<T>* corr) {
  const int64_t K = g.K(), L = g.L(), HW = g.H * g.W, c0 = (g.k / 2) * g.d, shifted = g.k * g.Hp * g.Wo;
  const bool same = g.p == c0;
  // On small planes each tap also fetches its share of the next plane's gradient: x0.94-1.28 backward on 7-14 px maps
  // (about x1.10 in the median of five A/B runs), whose taps are too short for the hardware prefetcher to run ahead.
  const bool prefetch_next = K * L * int64_t(sizeof(T)) <= kSmallPlaneBytes;
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    const T sg = sign;
    std::vector<T> GS(gx2 ? shifted : 0), gc(gx1 ? L : 0), gp(g.plane() + kSlack<T>);
    std::vector<T> S(corr ? shifted + kSlack<T> : 0), cen(corr && !same ? L : 0), gz(corr ? L : 0);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(GS.begin(), GS.end(), T(0));
      std::fill(gc.begin(), gc.end(), T(0));
      const T* ct = nullptr;
      if (corr) {  // z = centre - S, as in the forward
        shifted_copies(corr->x2 + t * HW, gp.data(), S.data(), g);
        ct = centres(corr->x1 + t * HW, gp.data(), cen.data(), g);
      }
      const T* gt = gout + ((t / C) * Ct + t % C) * K * L;  // gout: Ct >= C channels
      const T* gnext = prefetch_next && t + 1 < end ? gout + (((t + 1) / C) * Ct + (t + 1) % C) * K * L : nullptr;
      for (int64_t kh = 0; kh < g.k; ++kh) {
        for (int64_t kw = 0; kw < g.k; ++kw) {
          const T* gr = gt + (kh * g.k + kw) * L;
          if (gnext)
            for (int64_t i = 0; i < L; i += 64 / sizeof(T)) __builtin_prefetch(gnext + (kh * g.k + kw) * L + i);
          const int64_t at = (kw * g.Hp + kh * g.d) * g.Wo;
          if (corr) {
            const int64_t c = t % C;
            const T a = corr->a[c], b = corr->b[c], mu = corr->mean[c];
            const T* src = S.data() + at;
#pragma omp simd
            for (int64_t i = 0; i < L; ++i) gz[i] = gr[i] + a + b * ((ct[i] - src[i]) - mu);
            gr = gz.data();
          }
          if (gx1 && gx2) {
            T* gs = GS.data() + at;
#pragma omp simd
            for (int64_t i = 0; i < L; ++i) {
              gc[i] += gr[i];
              gs[i] -= sg * gr[i];
            }
          } else if (gx1) {
#pragma omp simd
            for (int64_t i = 0; i < L; ++i) gc[i] += gr[i];
          } else if (gx2) {
            T* gs = GS.data() + at;
#pragma omp simd
            for (int64_t i = 0; i < L; ++i) gs[i] -= sg * gr[i];
          }
        }
      }
      if (gx2) {
        std::fill(gp.begin(), gp.end(), T(0));
        unshift_columns(GS.data(), gp.data(), g);
        std::fill(gx2 + t * HW, gx2 + (t + 1) * HW, T(0));
        fold_plane(gp.data(), gx2 + t * HW, g);
      }
      if (gx1 && same) {
        std::copy(gc.begin(), gc.end(), gx1 + t * HW);
      } else if (gx1) {
        std::fill(gp.begin(), gp.end(), T(0));
        for (int64_t ho = 0; ho < g.Ho; ++ho)
          std::copy(gc.data() + ho * g.Wo, gc.data() + (ho + 1) * g.Wo, gp.data() + (ho + c0) * g.Wp + c0);
        std::fill(gx1 + t * HW, gx1 + (t + 1) * HW, T(0));
        fold_plane(gp.data(), gx1 + t * HW, g);
      }
    }
  });
}

template <typename T>
void gather_backward_kernel(const T* gout, T* gx1, T* gx2, T sign, int64_t N, int64_t C, int64_t Ct,
                            const Geometry& g, const StatsCorrection<T>* corr = nullptr) {
  if (g.s == 1) return gather_backward_s1(gout, gx1, gx2, sign, N, C, Ct, g, corr);
  const int64_t K = g.K(), L = g.L(), HW = g.H * g.W, c0 = (g.k / 2) * g.d;
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p1(gx1 ? g.plane() : 0), p2(gx2 ? g.plane() : 0);
    std::vector<T> z1(corr ? g.plane() : 0), z2(corr ? g.plane() : 0), gz(corr ? g.Wo : 0);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(p1.begin(), p1.end(), T(0));
      std::fill(p2.begin(), p2.end(), T(0));
      if (corr) {
        pad_plane(corr->x1 + t * HW, z1.data(), g);
        pad_plane(corr->x2 + t * HW, z2.data(), g);
      }
      for (int64_t kh = 0; kh < g.k; ++kh) {
        for (int64_t kw = 0; kw < g.k; ++kw) {
          const T* gt = gout + (((t / C) * Ct + t % C) * K + kh * g.k + kw) * L;  // gout: Ct >= C channels
          for (int64_t ho = 0; ho < g.Ho; ++ho) {
            const T* grow = gt + ho * g.Wo;
            if (corr) {
              const int64_t c = t % C;
              const T a = corr->a[c], b = corr->b[c], mu = corr->mean[c];
              const T* crow = z1.data() + (ho * g.s + c0) * g.Wp + c0;
              const T* xrow = z2.data() + (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
              for (int64_t wo = 0; wo < g.Wo; ++wo)
                gz[wo] = grow[wo] + a + b * ((crow[wo * g.s] - xrow[wo * g.s]) - mu);
              grow = gz.data();
            }
            if (gx1) {
              T* crow = p1.data() + (ho * g.s + c0) * g.Wp + c0;
              for (int64_t wo = 0; wo < g.Wo; ++wo) crow[wo * g.s] += grow[wo];
            }
            if (gx2) {
              T* xrow = p2.data() + (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
              for (int64_t wo = 0; wo < g.Wo; ++wo) xrow[wo * g.s] -= sign * grow[wo];
            }
          }
        }
      }
      if (gx1) {
        std::fill(gx1 + t * HW, gx1 + (t + 1) * HW, T(0));
        fold_plane(p1.data(), gx1 + t * HW, g);
      }
      if (gx2) {
        std::fill(gx2 + t * HW, gx2 + (t + 1) * HW, T(0));
        fold_plane(p2.data(), gx2 + t * HW, g);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// y = W relu(scale * x + shift) + bias over (N, Cin, P) -> (N, Cout, P): a training-mode BatchNorm (given as a
// per-channel affine map), ReLU and 1x1 convolution in one pass. This is the mapping gamma's building block; it
// runs over the (K, L) grid, where the unfused version writes and re-reads two Cin x K x L intermediates.
constexpr int64_t kPixelChunk = 4096;  // pixels per task: fixed, so reductions do not depend on thread count
constexpr int64_t kCols = 2;           // column vectors per register block of the small GEMMs below
constexpr int64_t kSub = 256;          // pixels per sub-block: its staged rows stay in L1/L2 (a multiple of kCols * VW)
constexpr int64_t kInTile = 2;         // input channels per register block of the weight-gradient reduction

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Rows per register block (R) of the small GEMMs: 6 x kCols = 12 accumulators (of AVX2's 16 registers) hide the FMA
// latency better than 4 x kCols = 8 (x0.8-0.9 at 32-128 rows, benchmarks/mapping_triples.py), but pad 8 rows to 12.
// Pick the one with less padded work, counting a 6-row block as 1.2 times as fast.
inline int pick_rows(int64_t rows) { return round_up(rows, 6) * 10 < round_up(rows, 4) * 12 ? 6 : 4; }

// A (rows x cols) packed in blocks of R rows, column-major within a block, zero-padded:
// out[(b * cols + c) * R + j] = A[b * R + j][c]. `transpose` reads A as the transpose of a (cols x rows) src.
template <typename T, int R>
std::vector<T> pack_rows(const T* src, int64_t rows, int64_t cols, bool transpose) {
  std::vector<T> out(round_up(rows, R) * cols, T(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      out[((r / R) * cols + c) * R + r % R] = transpose ? src[c * rows + r] : src[r * cols + c];
  return out;
}

// For one packed block of R rows of A: acc = A_block (R x inner) @ B (inner x kSub staged rows), for the
// columns [0, m) in steps of kCols * VW; epi(j, q, acc) receives row j, columns q .. q + kCols * VW (kCols vectors).
// R x kCols accumulators stay in registers; each step loads kCols B vectors and broadcasts R weights.
template <typename T, int R, typename Epilogue>
inline void gemm_block(const T* ap, int64_t inner, const T* B, int64_t m, Epilogue&& epi) {
  for (int64_t q = 0; q < m; q += kCols * VW<T>) {
    V<T> acc[R][kCols] = {};
    for (int64_t i = 0; i < inner; ++i) {
      V<T> b[kCols];
      for (int64_t c = 0; c < kCols; ++c) std::memcpy(&b[c], B + i * kSub + q + c * VW<T>, sizeof(V<T>));
      const T* a = ap + i * R;
      for (int64_t j = 0; j < R; ++j)
        for (int64_t c = 0; c < kCols; ++c) acc[j][c] += a[j] * b[c];
    }
    for (int64_t j = 0; j < R; ++j) epi(j, q, acc[j]);
  }
}

// Store the columns [q, q + kCols * VW) of a row, clipped to m.
template <typename T>
inline void store_cols(T* row, int64_t q, int64_t m, const V<T>* v) {
  for (int64_t c = 0; c < kCols; ++c) {
    const int64_t nv = std::min(VW<T>, m - q - c * VW<T>);
    if (nv <= 0) return;
    store_part(row + q + c * VW<T>, v[c], nv);
  }
}

// Where the BN-ReLU-conv kernels and the channel statistics read their input rows (N, Cin, P): row(n, ci, q0, m,
// scratch) returns the m values x[n, ci, q0 .. q0 + m), either in place (DenseRows) or computed into scratch.
template <typename T>
struct DenseRows {
  const T* x;
  int64_t Cin, P;
  const T* row(int64_t n, int64_t ci, int64_t q0, int64_t, T*) const { return x + (n * Cin + ci) * P + q0; }
};

// z = [x1_i - x2_j, append] of subtraction2 with append (P = K * L), gathered on the fly, so that the K-times larger
// z is never written: the pairwise mapping's first triple reads its input through this. With stride 1 it reads x1's
// centre planes and x2's column-shifted copies (one run per tap, as gather_forward_s1); otherwise padded copies of
// x1 and x2 (N, C, Hp, Wp), one output row at a time. The values are those gather_forward_kernel writes, bit for bit.
template <typename T>
struct RelationRows {
  const T* x1p;
  const T* x2p;
  const T* append;  // (B, E, K, L) with B = 1 (broadcast over N) or N; null if E = 0
  int64_t append_batch, C, E;
  Geometry g;
  bool shifted;  // x1p, x2p hold centre planes and column-shifted copies (stride 1, narrow maps), not padded planes
  const T* row(int64_t n, int64_t ci, int64_t q0, int64_t m, T* scratch) const {
    const int64_t L = g.L(), P = g.K() * L, c0 = (g.k / 2) * g.d;
    if (ci >= C) return append + ((append_batch == 1 ? 0 : n) * E + ci - C) * P + q0;
    if (shifted) {  // x1p: the centre planes (L each); x2p: the column-shifted copies (see shift_columns)
      const T* cen = x1p + (n * C + ci) * L;
      const T* S = x2p + (n * C + ci) * g.k * g.Hp * g.Wo;
      int64_t tap = q0 / L, o = q0 % L;
      for (int64_t left = m, at = 0; left > 0; ++tap, o = 0) {
        const int64_t len = std::min(L - o, left);
        const T* src = S + ((tap % g.k) * g.Hp + (tap / g.k) * g.d) * g.Wo + o;
        const T* cr = cen + o;
        T* out = scratch + at;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) out[i] = cr[i] - src[i];
        at += len;
        left -= len;
      }
      return scratch;
    }
    const T* p1 = x1p + (n * C + ci) * g.plane();
    const T* p2 = x2p + (n * C + ci) * g.plane();
    // Runs along one output row of one tap; (tap, ho, wo) advance without divisions (short rows on small maps).
    const int64_t tap = q0 / L;
    int64_t ho = (q0 % L) / g.Wo, wo = (q0 % L) % g.Wo, kh = tap / g.k, kw = tap % g.k;
    T* out = scratch;
    for (int64_t left = m; left > 0;) {
      const int64_t len = std::min(g.Wo - wo, left);
      const T* crow = p1 + (ho * g.s + c0) * g.Wp + c0 + wo * g.s;
      const T* xrow = p2 + (ho * g.s + kh * g.d) * g.Wp + kw * g.d + wo * g.s;
      if (g.s == 1) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) out[i] = crow[i] - xrow[i];
      } else {
        for (int64_t i = 0; i < len; ++i) out[i] = crow[i * g.s] - xrow[i * g.s];
      }
      out += len;
      left -= len;
      wo = 0;
      if (++ho == g.Ho) {
        ho = 0;
        if (++kw == g.k) kw = 0, ++kh;
      }
    }
    return scratch;
  }
};

// rr[0 .. kSub) <- relu(a * x + b) for the m values of x, zero tail.
template <typename T>
inline void stage_relu_row(const T* xr, T a, T b, T* rr, int64_t m) {
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) {
    const T pre = xr[i] * a + b;
    rr[i] = pre <= 0 ? T(0) : pre;  // NaN passes through, like torch.relu
  }
  std::fill(rr + m, rr + kSub, T(0));
}

template <typename T, int R, typename Rows>
void brc_forward_kernel(const Rows& src, const T* scale, const T* shift, const T* w, const T* bias, T* y, int64_t N,
                        int64_t Cin, int64_t Cout, int64_t P) {
  const int64_t chunks = (P + kPixelChunk - 1) / kPixelChunk, blocks = round_up(Cout, R) / R;
  const std::vector<T> wp = pack_rows<T, R>(w, Cout, Cin, false);
  parallel_range(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> r(Cin * kSub), scratch(kSub);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, p0 = (t % chunks) * kPixelChunk, p1 = std::min(P, p0 + kPixelChunk);
      for (int64_t q0 = p0; q0 < p1; q0 += kSub) {
        const int64_t m = std::min(kSub, p1 - q0);
        for (int64_t ci = 0; ci < Cin; ++ci)
          stage_relu_row(src.row(n, ci, q0, m, scratch.data()), scale[ci], shift[ci], r.data() + ci * kSub, m);
        for (int64_t b = 0; b < blocks; ++b) {
          gemm_block<T, R>(wp.data() + b * Cin * R, Cin, r.data(), m, [&](int64_t j, int64_t q, const V<T>* acc) {
            const int64_t co = b * R + j;
            if (co >= Cout) return;
            const T bv = bias ? bias[co] : T(0);
            V<T> out[kCols];
            for (int64_t c = 0; c < kCols; ++c) out[c] = acc[c] + bv;
            store_cols<T>(y + (n * Cout + co) * P + q0, q, m, out);
          });
        }
      }
    }
  });
}

// Gradients: gx (N, Cin, P); and per-task partial sums of gscale, gshift (Cin), gw (Cout x Cin), gbias (Cout),
// reduced in task order at the end. Per sub-block: stage relu(pre) and grad rows, then
//   gw += G R^T (register blocks of R x kInTile channel pairs), gR = W^T G (gemm_block), gpre = gR * (pre > 0).
template <typename T, int R, int RI, typename Rows>
void brc_backward_kernel(const T* gy, const Rows& src, const T* scale, const T* shift, const T* w, T* gx, T* gscale,
                         T* gshift, T* gw, T* gbias, int64_t N, int64_t Cin, int64_t Cout, int64_t P) {
  const int64_t chunks = (P + kPixelChunk - 1) / kPixelChunk, tasks = N * chunks;
  const int64_t cin_pad = round_up(Cin, kInTile), cout_pad = round_up(Cout, R), in_blocks = round_up(Cin, RI) / RI;
  const int64_t width = 2 * Cin + Cout * Cin + Cout;  // partial sums of one task
  const std::vector<T> wtp = pack_rows<T, RI>(w, Cin, Cout, true);
  std::vector<T> partial(tasks * width, T(0));
  parallel_range(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> r(cin_pad * kSub, T(0)), g(cout_pad * kSub, T(0));  // padding rows stay zero
    std::vector<V<T>> acc_w(cout_pad * cin_pad), acc_s(Cin), acc_b(Cin), acc_bias(Cout);
    std::vector<T> scratch(Cin * kSub);  // raw input rows that src computes (not read in place)
    std::vector<const T*> xrows(Cin);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, p0 = (t % chunks) * kPixelChunk, p1 = std::min(P, p0 + kPixelChunk);
      std::fill(acc_w.begin(), acc_w.end(), V<T>{});
      std::fill(acc_s.begin(), acc_s.end(), V<T>{});
      std::fill(acc_b.begin(), acc_b.end(), V<T>{});
      std::fill(acc_bias.begin(), acc_bias.end(), V<T>{});
      for (int64_t q0 = p0; q0 < p1; q0 += kSub) {
        const int64_t m = std::min(kSub, p1 - q0), mv = round_up(m, VW<T>);
        for (int64_t ci = 0; ci < Cin; ++ci) {
          xrows[ci] = src.row(n, ci, q0, m, scratch.data() + ci * kSub);
          stage_relu_row(xrows[ci], scale[ci], shift[ci], r.data() + ci * kSub, m);
        }
        for (int64_t co = 0; co < Cout; ++co) {
          const T* src = gy + (n * Cout + co) * P + q0;
          T* gr = g.data() + co * kSub;
          std::copy(src, src + m, gr);
          std::fill(gr + m, gr + kSub, T(0));
          V<T> s = {};
          for (int64_t q = 0; q < mv; q += VW<T>) s += load_part(gr + q, VW<T>);
          acc_bias[co] += s;
        }
        // gw[co][ci] += sum_q g[co][q] * r[ci][q]
        for (int64_t cb = 0; cb < cout_pad; cb += R) {
          for (int64_t ib = 0; ib < cin_pad; ib += kInTile) {
            V<T> acc[R][kInTile] = {};
            for (int64_t q = 0; q < mv; q += VW<T>) {
              V<T> rv[kInTile];
              for (int64_t i = 0; i < kInTile; ++i) rv[i] = load_part(r.data() + (ib + i) * kSub + q, VW<T>);
              for (int64_t j = 0; j < R; ++j) {
                const V<T> gv = load_part(g.data() + (cb + j) * kSub + q, VW<T>);
                for (int64_t i = 0; i < kInTile; ++i) acc[j][i] += gv * rv[i];
              }
            }
            for (int64_t j = 0; j < R; ++j)
              for (int64_t i = 0; i < kInTile; ++i) acc_w[(cb + j) * cin_pad + ib + i] += acc[j][i];
          }
        }
        // gR = W^T g, then the ReLU mask, the BN-affine gradients and gx.
        for (int64_t b = 0; b < in_blocks; ++b) {
          gemm_block<T, RI>(wtp.data() + b * Cout * RI, Cout, g.data(), m, [&](int64_t j, int64_t q, const V<T>* acc) {
            const int64_t ci = b * RI + j;
            if (ci >= Cin) return;
            const T* rr = r.data() + ci * kSub + q;
            const T* xr = xrows[ci] + q;
            V<T> gpre[kCols];
            for (int64_t c = 0; c < kCols; ++c) {
              const int64_t nv = std::max<int64_t>(0, std::min(VW<T>, m - q - c * VW<T>));
              const V<T> rv = load_part(rr + c * VW<T>, VW<T>);
              const V<T> xv = nv > 0 ? load_part(xr + c * VW<T>, nv) : V<T>{};
              gpre[c] = rv <= 0 ? V<T>{} : acc[c];  // zero past m: g rows are zero there
              acc_s[ci] += gpre[c] * xv;
              acc_b[ci] += gpre[c];
              gpre[c] *= scale[ci];
            }
            store_cols<T>(gx + (n * Cin + ci) * P + q0, q, m, gpre);
          });
        }
      }
      T* out = partial.data() + t * width;
      for (int64_t ci = 0; ci < Cin; ++ci) {
        out[ci] = hsum<T>(acc_s[ci]);
        out[Cin + ci] = hsum<T>(acc_b[ci]);
      }
      for (int64_t co = 0; co < Cout; ++co)
        for (int64_t ci = 0; ci < Cin; ++ci) out[2 * Cin + co * Cin + ci] = hsum<T>(acc_w[co * cin_pad + ci]);
      for (int64_t co = 0; co < Cout; ++co) out[2 * Cin + Cout * Cin + co] = hsum<T>(acc_bias[co]);
    }
  });
  for (int64_t t = 0; t < tasks; ++t) {
    const T* in = partial.data() + t * width;
    for (int64_t ci = 0; ci < Cin; ++ci) {
      gscale[ci] += in[ci];
      gshift[ci] += in[Cin + ci];
    }
    for (int64_t i = 0; i < Cout * Cin; ++i) gw[i] += in[2 * Cin + i];
    for (int64_t co = 0; co < Cout; ++co) gbias[co] += in[2 * Cin + Cout * Cin + co];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// y = maxpool2x2(relu(scale * x + shift)), stride 2, floor mode: a BatchNorm (as its per-channel affine map), ReLU
// and the max-pool that follow each other at every SAN stage boundary, in one pass; the BN and ReLU outputs (4x the
// pooled size) are never written. Ties and NaN follow PyTorch's max-pool: the window is scanned row by row, a value
// replaces the best so far if it is larger or NaN.
template <typename T>
inline T relu_affine(T v, T a, T b) {
  const T pre = v * a + b;
  return pre <= 0 ? T(0) : pre;
}

// The window's maximum of relu(a * x + b) over (r0[0], r0[1], r1[0], r1[1]), its index (0..3) and its raw x.
// Branch-free selects, so that loops over windows vectorise.
template <typename T>
inline T pool_max(const T* r0, const T* r1, T a, T b, T& arg, T& xarg) {  // arg: 0..3 as T, for uniform vectors
  const T x[4] = {r0[0], r0[1], r1[0], r1[1]};
  T best = relu_affine(x[0], a, b);
  arg = 0;
  xarg = x[0];
  for (int i = 1; i < 4; ++i) {
    const T v = relu_affine(x[i], a, b);
    const bool take = v > best || v != v;  // v != v: NaN
    best = take ? v : best;
    arg = take ? T(i) : arg;
    xarg = take ? x[i] : xarg;
  }
  return best;
}

template <typename T>
void brp_forward_kernel(const T* x, const T* scale, const T* shift, T* y, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t Ho = H / 2, Wo = W / 2;
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T a = scale[t % C], b = shift[t % C];
      for (int64_t i = 0; i < Ho; ++i) {
        const T* r0 = x + t * H * W + 2 * i * W;
        T* yr = y + t * Ho * Wo + i * Wo;
#pragma omp simd
        for (int64_t j = 0; j < Wo; ++j) {
          T arg, xarg;
          yr[j] = pool_max(r0 + 2 * j, r0 + W + 2 * j, a, b, arg, xarg);
        }
      }
    }
  });
}

// gx (zero but at each window's argmax), and gscale, gshift (C): per-plane sums, reduced in plane order.
template <typename T>
void brp_backward_kernel(const T* gy, const T* x, const T* scale, const T* shift, T* gx, T* gscale, T* gshift,
                         int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t Ho = H / 2, Wo = W / 2;
  std::vector<T> partial(2 * N * C);
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> w(4 * Wo);  // one output row's gradient for each of the 4 window positions
    for (int64_t t = begin; t < end; ++t) {
      const T a = scale[t % C], b = shift[t % C];
      const T* xp = x + t * H * W;
      T* gp = gx + t * H * W;
      if (H % 2) std::fill(gp + (H - 1) * W, gp + H * W, T(0));  // the rows and columns no window covers
      T s = 0, sb = 0;
      for (int64_t i = 0; i < Ho; ++i) {
        const T* r0 = xp + 2 * i * W;
        const T* g = gy + t * Ho * Wo + i * Wo;
        T* q0 = gp + 2 * i * W;
        T* q1 = q0 + W;
        T *w0 = w.data(), *w1 = w0 + Wo, *w2 = w1 + Wo, *w3 = w2 + Wo;
#pragma omp simd reduction(+ : s, sb)
        for (int64_t j = 0; j < Wo; ++j) {
          T arg, xarg;
          const T best = pool_max(r0 + 2 * j, r0 + W + 2 * j, a, b, arg, xarg);
          const T gpre = best <= 0 ? T(0) : g[j];  // ReLU's backward: zero where its output is <= 0
          const T v = gpre * a;
          w0[j] = arg == T(0) ? v : T(0);
          w1[j] = arg == T(1) ? v : T(0);
          w2[j] = arg == T(2) ? v : T(0);
          w3[j] = arg == T(3) ? v : T(0);
          s += gpre * xarg;
          sb += gpre;
        }
        for (int64_t j = 0; j < Wo; ++j) {
          q0[2 * j] = w0[j];
          q0[2 * j + 1] = w1[j];
        }
        for (int64_t j = 0; j < Wo; ++j) {
          q1[2 * j] = w2[j];
          q1[2 * j + 1] = w3[j];
        }
        if (W % 2) q0[W - 1] = q1[W - 1] = T(0);
      }
      partial[2 * t] = s;
      partial[2 * t + 1] = sb;
    }
  });
  for (int64_t t = 0; t < N * C; ++t) {
    gscale[t % C] += partial[2 * t];
    gshift[t % C] += partial[2 * t + 1];
  }
}

// Per-channel biased variance and mean of x (N, C, P), as torch.var_mean(x, [0, 2], correction=0).
// Each chunk of kPixelChunk values gets an exact two-pass mean and sum of squared deviations (in double); chunks
// are merged in a fixed order with Chan et al.'s pairwise formula: deterministic for any thread count, and free of
// the cancellation of E[x^2] - E[x]^2 when the mean is large against the spread.
template <typename T, typename Rows>
void channel_stats_kernel(const Rows& src, T* var, T* mean, int64_t N, int64_t C, int64_t P) {
  const int64_t chunks = (P + kPixelChunk - 1) / kPixelChunk;
  std::vector<double> cmean(N * C * chunks), cm2(N * C * chunks);
  parallel_range(0, N * C * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(kPixelChunk);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = (t % chunks) * kPixelChunk, p1 = std::min(P, p0 + kPixelChunk), m = p1 - p0;
      const T* xr = src.row(t / (C * chunks), (t / chunks) % C, p0, m, scratch.data());
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t p = 0; p < m; ++p) s += double(xr[p]);
      const double mu = s / double(m);
      double m2 = 0;
#pragma omp simd reduction(+ : m2)
      for (int64_t p = 0; p < m; ++p) {
        const double d = double(xr[p]) - mu;
        m2 += d * d;
      }
      cmean[t] = mu;
      cm2[t] = m2;
    }
  });
  parallel_range(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double count = 0, mu = 0, m2 = 0;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t ch = 0; ch < chunks; ++ch) {
          const int64_t t = (n * C + c) * chunks + ch;
          const double nb = double(std::min(P, (ch + 1) * kPixelChunk) - ch * kPixelChunk), tot = count + nb;
          const double delta = cmean[t] - mu;
          mu += delta * nb / tot;
          m2 += cm2[t] + delta * delta * count * nb / tot;
          count = tot;
        }
      }
      mean[c] = T(mu);
      var[c] = T(m2 / count);
    }
  });
}

// gx = base + grad_mean / n + (2 grad_var / n) * (x - mean), per channel of x (N, C, P), n = N * P: var_mean's
// backward, added to the gradient that reaches x by another path (base, may be null) in the same pass.
template <typename T>
void channel_stats_backward_kernel(const T* x, const T* mean, const T* gvar, const T* gmean, const T* base, T* gx,
                                   int64_t N, int64_t C, int64_t P) {
  const T inv = T(1) / T(N * P);
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t % C;
      const T a = gmean[c] * inv, b = 2 * gvar[c] * inv, mu = mean[c];
      const T* xr = x + t * P;
      T* gr = gx + t * P;
      if (base) {
        const T* br = base + t * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) gr[p] = br[p] + a + b * (xr[p] - mu);
      } else {
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) gr[p] = a + b * (xr[p] - mu);
      }
    }
  });
}

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name, " must be float32 or float64");
}

void check_geometry(const Geometry& g) {
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "torchsan: the footprint does not fit the input (output size ", g.Ho, "x", g.Wo,
              ")");
  TORCH_CHECK(!g.reflect || (g.p < g.H && g.p < g.W), "torchsan: reflect padding ", g.p,
              " must be smaller than the input size ", g.H, "x", g.W);
}

// The register-block sizes of brc_backward_kernel for these channel counts.
template <typename T, typename Rows>
auto brc_backward_for(int64_t Cin, int64_t Cout) {
  const bool out6 = pick_rows(Cout) == 6, in6 = pick_rows(Cin) == 6;
  return out6 ? (in6 ? brc_backward_kernel<T, 6, 6, Rows> : brc_backward_kernel<T, 6, 4, Rows>)
              : (in6 ? brc_backward_kernel<T, 4, 6, Rows> : brc_backward_kernel<T, 4, 4, Rows>);
}

// x (N, C, H, W) -> its padded planes (N, C, Hp, Wp).
torch::Tensor pad_planes(const torch::Tensor& x, const Geometry& g) {
  auto out = torch::empty({x.size(0), x.size(1), g.Hp, g.Wp}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pad_planes", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    parallel_range(0, x.size(0) * x.size(1), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) pad_plane(src + t * g.H * g.W, dst + t * g.plane(), g);
    });
  });
  return out;
}

constexpr int64_t kShiftedMaxWidth = 16;  // output width up to which RelationRows reads shifted copies

// Stride 1: x (N, C, H, W) -> the column-shifted copies of its padded planes (N, C, k * Hp * Wo), or its centre
// planes (N, C, Ho * Wo) (see shift_columns, centre_plane).
torch::Tensor shifted_planes(const torch::Tensor& x, const Geometry& g, bool centres) {
  const int64_t size = centres ? g.L() : g.k * g.Hp * g.Wo;
  auto out = torch::empty({x.size(0), x.size(1), size}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shifted_planes", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    parallel_range(0, x.size(0) * x.size(1), 1, [&](int64_t begin, int64_t end) {
      // Built in a private buffer (shift_columns may spill past a plane's copies), then copied out.
      std::vector<scalar_t> xp(g.plane() + kSlack<scalar_t>), S(size + kSlack<scalar_t>);
      for (int64_t t = begin; t < end; ++t) {
        if (centres) {
          pad_plane(src + t * g.H * g.W, xp.data(), g);
          centre_plane(xp.data(), dst + t * size, g);
        } else {
          shifted_copies(src + t * g.H * g.W, xp.data(), S.data(), g);
          std::memcpy(dst + t * size, S.data(), sizeof(scalar_t) * size);
        }
      }
    });
  });
  return out;
}

// The inputs of subtraction2 with append, checked, with what RelationRows reads.
struct Relation {
  torch::Tensor x1, x2, x1p, x2p, append;
  Geometry g;
  int64_t N, C, E, Ct, P;
  bool shifted;
  Relation(torch::Tensor a, torch::Tensor b, c10::optional<torch::Tensor> app, int64_t k, int64_t s, int64_t p,
           int64_t d, bool reflect)
      : x1(a.contiguous()), x2(b.contiguous()), g(a.size(2), a.size(3), k, s, p, d, reflect) {
    check_cpu(x1, "x1");
    check_cpu(x2, "x2");
    check_geometry(g);
    TORCH_CHECK(x1.sizes() == x2.sizes() && x1.scalar_type() == x2.scalar_type(), "x1 and x2 must match");
    N = x1.size(0);
    C = x1.size(1);
    P = g.K() * g.L();
    E = 0;
    if (app.has_value() && app->defined()) {
      append = app->contiguous();
      TORCH_CHECK(append.dim() == 4 && (append.size(0) == 1 || append.size(0) == N) && append.size(2) == g.K() &&
                      append.size(3) == g.L() && append.scalar_type() == x1.scalar_type(),
                  "append must be (1 or N, E, K, L) of x1's dtype");
      E = append.size(1);
    }
    Ct = C + E;
    // One run per tap pays for building the shifted copies only where rows are short: x1.17 on 14 and 7 px maps,
    // x0.85-0.94 on 28 to 112 px (the fused relation op, forward + backward, SAN10's shapes).
    shifted = g.s == 1 && g.Wo <= kShiftedMaxWidth;
    if (shifted) {  // see RelationRows
      x1p = g.p == (g.k / 2) * g.d ? x1 : shifted_planes(x1, g, true);
      x2p = shifted_planes(x2, g, false);
    } else {
      x1p = pad_planes(x1, g);
      x2p = pad_planes(x2, g);
    }
  }
  template <typename T>
  RelationRows<T> rows() const {
    return RelationRows<T>{x1p.data_ptr<T>(), x2p.data_ptr<T>(), E ? append.data_ptr<T>() : nullptr,
                           E ? append.size(0) : 1, C, E, g, shifted};
  }
};

}  // namespace

// softmax: w holds logits; returns {y, softmax(w, dim=2)} (else {y}).
std::vector<torch::Tensor> aggregation_forward(torch::Tensor x, torch::Tensor w, int64_t k, int64_t s, int64_t p,
                                               int64_t d, bool reflect, bool softmax) {
  check_cpu(x, "x");
  check_cpu(w, "weight");
  x = x.contiguous();
  w = w.contiguous();
  const Geometry g(x.size(2), x.size(3), k, s, p, d, reflect);
  check_geometry(g);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "weight dtype must match x");
  const int64_t N = x.size(0), C = x.size(1), Cw = w.size(1);
  TORCH_CHECK(w.size(0) == N && C % Cw == 0 && w.size(2) == g.K() && w.size(3) == g.L(), "weight shape mismatch");
  auto y = torch::empty({N, C, g.Ho, g.Wo}, x.options());
  auto wsm = softmax ? torch::empty_like(w) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aggregation_forward", [&] {
    // A task's softmax plane is reused from cache only if it fits in L2 (per core, with room for the x planes):
    // larger planes (SAN stage 1: 49 x 3136 floats, 600 KB) are normalised in a separate pass first (same values).
    const bool per_task = softmax && g.K() * g.L() * int64_t(sizeof(scalar_t)) <= 256 * 1024;
    if (softmax && !per_task)
      tap_softmax_kernel<scalar_t>(w.data_ptr<scalar_t>(), wsm.data_ptr<scalar_t>(), N * Cw, g.K(), g.L());
    aggregation_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(),
                                         softmax && !per_task ? wsm.data_ptr<scalar_t>() : w.data_ptr<scalar_t>(),
                                         y.data_ptr<scalar_t>(), N, C, Cw, g,
                                         per_task ? wsm.data_ptr<scalar_t>() : nullptr);
  });
  if (softmax) return {y, wsm};
  return {y};
}

std::vector<torch::Tensor> aggregation_backward(torch::Tensor gy, torch::Tensor x, torch::Tensor w, int64_t k,
                                                int64_t s, int64_t p, int64_t d, bool reflect, bool need_x,
                                                bool need_w, bool softmax) {
  check_cpu(gy, "grad");
  gy = gy.contiguous();
  x = x.contiguous();
  w = w.contiguous();
  const Geometry g(x.size(2), x.size(3), k, s, p, d, reflect);
  const int64_t N = x.size(0), C = x.size(1), Cw = w.size(1);
  auto gx = need_x ? torch::empty_like(x) : torch::Tensor();
  auto gw = need_w ? torch::empty_like(w) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aggregation_backward", [&] {
    aggregation_backward_kernel<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                          need_x ? gx.data_ptr<scalar_t>() : nullptr,
                                          need_w ? gw.data_ptr<scalar_t>() : nullptr, N, C, Cw, g, softmax);
  });
  return {gx, gw};
}

// subtraction2 (x1 defined) or unfold (x1 undefined): (N, C, H, W) -> (N, C, K, L)
// out (N, C + E, K, L): the C gathered channels, then `append` (B, E, K, L), B = 1 (broadcast over N) or N, if given.
torch::Tensor gather_forward(c10::optional<torch::Tensor> x1, torch::Tensor x2, int64_t k, int64_t s, int64_t p,
                             int64_t d, bool reflect, c10::optional<torch::Tensor> append) {
  check_cpu(x2, "x");
  x2 = x2.contiguous();
  torch::Tensor c1, ap;
  if (x1.has_value()) c1 = x1->contiguous();
  const Geometry g(x2.size(2), x2.size(3), k, s, p, d, reflect);
  check_geometry(g);
  TORCH_CHECK(!c1.defined() || (c1.sizes() == x2.sizes() && c1.scalar_type() == x2.scalar_type()),
              "x1 and x2 must have the same shape and dtype");
  const int64_t N = x2.size(0), C = x2.size(1);
  int64_t E = 0;
  if (append.has_value()) {
    ap = append->contiguous();
    TORCH_CHECK(ap.dim() == 4 && (ap.size(0) == 1 || ap.size(0) == N) && ap.size(2) == g.K() && ap.size(3) == g.L() &&
                    ap.scalar_type() == x2.scalar_type() && ap.device().is_cpu(),
                "append must be a CPU tensor (1 or N, E, K, L) of x's dtype, got ", ap.sizes());
    E = ap.size(1);
  }
  auto out = torch::empty({N, C + E, g.K(), g.L()}, x2.options());
  AT_DISPATCH_FLOATING_TYPES(x2.scalar_type(), "gather_forward", [&] {
    const scalar_t sign = c1.defined() ? scalar_t(1) : scalar_t(-1);
    gather_forward_kernel<scalar_t>(c1.defined() ? c1.data_ptr<scalar_t>() : nullptr, x2.data_ptr<scalar_t>(),
                                    out.data_ptr<scalar_t>(), sign, N, C, C + E, g);
    if (E > 0) {
      const int64_t block = E * g.K() * g.L();
      const scalar_t* src = ap.data_ptr<scalar_t>();
      scalar_t* dst = out.data_ptr<scalar_t>();
      parallel_range(0, N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
          std::copy(src + (ap.size(0) == 1 ? 0 : n) * block, src + (ap.size(0) == 1 ? 1 : n + 1) * block,
                    dst + (n * (C + E) + C) * g.K() * g.L());
      });
    }
  });
  return out;
}

// channels: how many of gout's leading channels are the gathered ones (the rest, `append` in the forward, are skipped).
std::vector<torch::Tensor> gather_backward(torch::Tensor gout, int64_t H, int64_t W, int64_t k, int64_t s, int64_t p,
                                           int64_t d, bool reflect, bool subtraction, bool need_x1, bool need_x2,
                                           int64_t channels) {
  check_cpu(gout, "grad");
  gout = gout.contiguous();
  const Geometry g(H, W, k, s, p, d, reflect);
  const int64_t N = gout.size(0), Ct = gout.size(1), C = channels;
  TORCH_CHECK(0 <= C && C <= Ct, "gather_backward: channels must be in [0, ", Ct, "]");
  TORCH_CHECK(gout.size(2) == g.K() && gout.size(3) == g.L(), "gather_backward: grad does not match the footprint");
  auto opts = gout.options();
  auto gx1 = (subtraction && need_x1) ? torch::empty({N, C, H, W}, opts) : torch::Tensor();
  auto gx2 = need_x2 ? torch::empty({N, C, H, W}, opts) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(gout.scalar_type(), "gather_backward", [&] {
    const scalar_t sign = subtraction ? scalar_t(1) : scalar_t(-1);
    gather_backward_kernel<scalar_t>(gout.data_ptr<scalar_t>(), gx1.defined() ? gx1.data_ptr<scalar_t>() : nullptr,
                                     gx2.defined() ? gx2.data_ptr<scalar_t>() : nullptr, sign, N, C, Ct, g);
  });
  return {gx1, gx2};
}

// x (N, Cin, *) -> (N, Cout, *); scale, shift (Cin); weight (Cout, Cin); bias (Cout) or undefined.
torch::Tensor bn_relu_conv_forward(torch::Tensor x, torch::Tensor scale, torch::Tensor shift, torch::Tensor weight,
                                   c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "x must be a CPU tensor (N, Cin, ...)");
  x = x.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  weight = weight.contiguous();
  torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  const int64_t N = x.size(0), Cin = x.size(1), Cout = weight.size(0), P = x.numel() / std::max<int64_t>(1, N * Cin);
  TORCH_CHECK(weight.size(1) == Cin && scale.numel() == Cin && shift.numel() == Cin, "bn_relu_conv: shape mismatch");
  auto sizes = x.sizes().vec();
  sizes[1] = Cout;
  auto y = torch::empty(sizes, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_conv_forward", [&] {
    using Rows = DenseRows<scalar_t>;
    auto kernel = pick_rows(Cout) == 6 ? brc_forward_kernel<scalar_t, 6, Rows> : brc_forward_kernel<scalar_t, 4, Rows>;
    kernel(Rows{x.data_ptr<scalar_t>(), Cin, P}, scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(),
           weight.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), N, Cin,
           Cout, P);
  });
  return y;
}

std::vector<torch::Tensor> bn_relu_conv_backward(torch::Tensor gy, torch::Tensor x, torch::Tensor scale,
                                                 torch::Tensor shift, torch::Tensor weight) {
  gy = gy.contiguous();
  x = x.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  weight = weight.contiguous();
  const int64_t N = x.size(0), Cin = x.size(1), Cout = weight.size(0), P = x.numel() / std::max<int64_t>(1, N * Cin);
  auto gx = torch::empty_like(x);
  auto gscale = torch::zeros_like(scale), gshift = torch::zeros_like(shift), gw = torch::zeros_like(weight);
  auto gbias = torch::zeros({Cout}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_conv_backward", [&] {
    using Rows = DenseRows<scalar_t>;
    auto kernel = brc_backward_for<scalar_t, Rows>(Cin, Cout);
    kernel(gy.data_ptr<scalar_t>(), Rows{x.data_ptr<scalar_t>(), Cin, P}, scale.data_ptr<scalar_t>(),
           shift.data_ptr<scalar_t>(),
           weight.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), gscale.data_ptr<scalar_t>(), gshift.data_ptr<scalar_t>(),
           gw.data_ptr<scalar_t>(), gbias.data_ptr<scalar_t>(), N, Cin, Cout, P);
  });
  return {gx, gscale, gshift, gw, gbias};
}

// x (N, C, H, W) -> (N, C, H / 2, W / 2): maxpool2x2(relu(scale * x + shift)); scale, shift (C).
torch::Tensor bn_relu_maxpool_forward(torch::Tensor x, torch::Tensor scale, torch::Tensor shift) {
  check_cpu(x, "x");
  x = x.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(scale.numel() == C && shift.numel() == C, "bn_relu_maxpool: scale and shift need C values");
  TORCH_CHECK(H >= 2 && W >= 2, "bn_relu_maxpool: a 2x2 max-pool needs at least 2x2 pixels, got ", H, "x", W);
  auto y = torch::empty({N, C, H / 2, W / 2}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_maxpool_forward", [&] {
    brp_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(),
                                 y.data_ptr<scalar_t>(), N, C, H, W);
  });
  return y;
}

std::vector<torch::Tensor> bn_relu_maxpool_backward(torch::Tensor gy, torch::Tensor x, torch::Tensor scale,
                                                    torch::Tensor shift) {
  gy = gy.contiguous();
  x = x.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(gy.size(0) == N && gy.size(1) == C && gy.size(2) == H / 2 && gy.size(3) == W / 2,
              "bn_relu_maxpool_backward: grad shape mismatch");
  auto gx = torch::empty_like(x);
  auto gscale = torch::zeros_like(scale), gshift = torch::zeros_like(shift);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_maxpool_backward", [&] {
    brp_backward_kernel<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                                  shift.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), gscale.data_ptr<scalar_t>(),
                                  gshift.data_ptr<scalar_t>(), N, C, H, W);
  });
  return {gx, gscale, gshift};
}

// x (N, C, ...) -> (var, mean), each (C): biased, over every dimension but 1.
std::vector<torch::Tensor> channel_var_mean(torch::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "x must be a CPU tensor (N, C, ...)");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), P = x.numel() / std::max<int64_t>(1, N * C);
  TORCH_CHECK(N * P > 0, "channel_var_mean: no values per channel");
  auto var = torch::empty({C}, x.options()), mean = torch::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_var_mean", [&] {
    channel_stats_kernel<scalar_t>(DenseRows<scalar_t>{x.data_ptr<scalar_t>(), C, P}, var.data_ptr<scalar_t>(),
                                   mean.data_ptr<scalar_t>(), N, C, P);
  });
  return {var, mean};
}

torch::Tensor channel_var_mean_backward(torch::Tensor x, torch::Tensor mean, torch::Tensor gvar, torch::Tensor gmean,
                                        c10::optional<torch::Tensor> base, bool in_place) {
  x = x.contiguous();
  torch::Tensor b = base.has_value() ? base->contiguous() : torch::Tensor();
  TORCH_CHECK(!b.defined() || (b.sizes() == x.sizes() && b.scalar_type() == x.scalar_type()),
              "channel_var_mean_backward: base must match x");
  mean = mean.contiguous();
  gvar = gvar.contiguous();
  gmean = gmean.contiguous();
  const int64_t N = x.size(0), C = x.size(1), P = x.numel() / std::max<int64_t>(1, N * C);
  TORCH_CHECK(mean.numel() == C && gvar.numel() == C && gmean.numel() == C, "channel_var_mean_backward: shape mismatch");
  // in_place: the result overwrites base (a gradient buffer of the caller's), two streams instead of three.
  auto gx = in_place ? b : torch::empty_like(x);
  TORCH_CHECK(!in_place || (b.defined() && base->is_contiguous()), "channel_var_mean_backward: in place needs a "
              "contiguous base");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_var_mean_backward", [&] {
    channel_stats_backward_kernel<scalar_t>(x.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), gvar.data_ptr<scalar_t>(),
                                            gmean.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                                            gx.data_ptr<scalar_t>(), N, C, P);
  });
  return gx;
}


torch::Tensor tap_softmax(torch::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "tap_softmax: x must be a 4-D CPU tensor (N, C, K, L)");
  x = x.contiguous();
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tap_softmax", [&] {
    tap_softmax_kernel<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.size(0) * x.size(1), x.size(2),
                                 x.size(3));
  });
  return y;
}

torch::Tensor tap_softmax_backward(torch::Tensor g, torch::Tensor y) {
  TORCH_CHECK(g.device().is_cpu() && g.dim() == 4 && g.sizes() == y.sizes() && g.scalar_type() == y.scalar_type(),
              "tap_softmax_backward: grad and output must be 4-D CPU tensors of the same shape and dtype");
  g = g.contiguous();
  y = y.contiguous();
  auto gx = torch::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "tap_softmax_backward", [&] {
    tap_softmax_backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
                                          y.size(0) * y.size(1), y.size(2), y.size(3));
  });
  return gx;
}

// The channel statistics, BN-ReLU-conv forward and backward of z = cat([subtraction2(x1, x2), append]) (N, C + E, K, L)
// without writing z: each reads z's rows through RelationRows. Same results as the dense ops on the written z.
std::vector<torch::Tensor> relation_var_mean(torch::Tensor x1, torch::Tensor x2, c10::optional<torch::Tensor> append,
                                             int64_t k, int64_t s, int64_t p, int64_t d, bool reflect) {
  const Relation rel(x1, x2, append, k, s, p, d, reflect);
  auto var = torch::empty({rel.Ct}, rel.x1.options()), mean = torch::empty({rel.Ct}, rel.x1.options());
  AT_DISPATCH_FLOATING_TYPES(rel.x1.scalar_type(), "relation_var_mean", [&] {
    channel_stats_kernel<scalar_t>(rel.rows<scalar_t>(), var.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rel.N,
                                   rel.Ct, rel.P);
  });
  return {var, mean};
}

torch::Tensor relation_bn_relu_conv_forward(torch::Tensor x1, torch::Tensor x2, c10::optional<torch::Tensor> append,
                                            torch::Tensor scale, torch::Tensor shift, torch::Tensor weight,
                                            c10::optional<torch::Tensor> bias, int64_t k, int64_t s, int64_t p,
                                            int64_t d, bool reflect) {
  const Relation rel(x1, x2, append, k, s, p, d, reflect);
  scale = scale.contiguous();
  shift = shift.contiguous();
  weight = weight.contiguous();
  torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  const int64_t Cout = weight.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == rel.Ct && scale.numel() == rel.Ct && shift.numel() == rel.Ct,
              "relation_bn_relu_conv: shape mismatch");
  auto y = torch::empty({rel.N, Cout, rel.g.K(), rel.g.L()}, rel.x1.options());
  AT_DISPATCH_FLOATING_TYPES(rel.x1.scalar_type(), "relation_bn_relu_conv_forward", [&] {
    using Rows = RelationRows<scalar_t>;
    auto kernel = pick_rows(Cout) == 6 ? brc_forward_kernel<scalar_t, 6, Rows> : brc_forward_kernel<scalar_t, 4, Rows>;
    kernel(rel.rows<scalar_t>(), scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
           b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), rel.N, rel.Ct, Cout, rel.P);
  });
  return y;
}

// Returns {grad z (holding scale and shift fixed) (N, C + E, K, L), grad scale, grad shift, grad weight, grad bias}.
std::vector<torch::Tensor> relation_bn_relu_conv_backward(torch::Tensor gy, torch::Tensor x1, torch::Tensor x2,
                                                          c10::optional<torch::Tensor> append, torch::Tensor scale,
                                                          torch::Tensor shift, torch::Tensor weight, int64_t k,
                                                          int64_t s, int64_t p, int64_t d, bool reflect) {
  const Relation rel(x1, x2, append, k, s, p, d, reflect);
  gy = gy.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  weight = weight.contiguous();
  const int64_t Cin = rel.Ct, Cout = weight.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == Cin && scale.numel() == Cin && shift.numel() == Cin &&
                  gy.dim() == 4 && gy.size(0) == rel.N && gy.size(1) == Cout && gy.size(2) * gy.size(3) == rel.P,
              "relation_bn_relu_conv_backward: shape mismatch");
  auto gz = torch::empty({rel.N, Cin, rel.g.K(), rel.g.L()}, rel.x1.options());
  auto gscale = torch::zeros_like(scale), gshift = torch::zeros_like(shift), gw = torch::zeros_like(weight);
  auto gbias = torch::zeros({Cout}, rel.x1.options());
  AT_DISPATCH_FLOATING_TYPES(rel.x1.scalar_type(), "relation_bn_relu_conv_backward", [&] {
    auto kernel = brc_backward_for<scalar_t, RelationRows<scalar_t>>(Cin, Cout);
    kernel(gy.data_ptr<scalar_t>(), rel.rows<scalar_t>(), scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(),
           weight.data_ptr<scalar_t>(), gz.data_ptr<scalar_t>(), gscale.data_ptr<scalar_t>(), gshift.data_ptr<scalar_t>(),
           gw.data_ptr<scalar_t>(), gbias.data_ptr<scalar_t>(), rel.N, Cin, Cout, rel.P);
  });
  return {gz, gscale, gshift, gw, gbias};
}

// Gradients w.r.t. x1, x2 of subtraction2 from the first C channels of gz0 plus a training BatchNorm's statistics
// share, gz = gz0 + a + b * (z - mean) per channel (a, b, mean: (C)), z recomputed from x1 and x2.
std::vector<torch::Tensor> relation_stats_backward(torch::Tensor gz0, torch::Tensor x1, torch::Tensor x2,
                                                   torch::Tensor a, torch::Tensor b, torch::Tensor mean, int64_t k,
                                                   int64_t s, int64_t p, int64_t d, bool reflect) {
  check_cpu(gz0, "grad");
  check_cpu(x1, "x1");
  gz0 = gz0.contiguous();
  x1 = x1.contiguous();
  x2 = x2.contiguous();
  a = a.contiguous();
  b = b.contiguous();
  mean = mean.contiguous();
  const Geometry g(x1.size(2), x1.size(3), k, s, p, d, reflect);
  check_geometry(g);
  const int64_t N = x1.size(0), C = x1.size(1), Ct = gz0.size(1);
  TORCH_CHECK(x1.sizes() == x2.sizes() && gz0.size(0) == N && Ct >= C && gz0.size(2) == g.K() &&
                  gz0.size(3) == g.L() && a.numel() >= C && b.numel() >= C && mean.numel() >= C,
              "relation_stats_backward: shape mismatch");
  auto gx1 = torch::empty_like(x1), gx2 = torch::empty_like(x1);
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "relation_stats_backward", [&] {
    const StatsCorrection<scalar_t> corr{x1.data_ptr<scalar_t>(), x2.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                                         b.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>()};
    gather_backward_kernel<scalar_t>(gz0.data_ptr<scalar_t>(), gx1.data_ptr<scalar_t>(), gx2.data_ptr<scalar_t>(),
                                     scalar_t(1), N, C, Ct, g, &corr);
  });
  return {gx1, gx2};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tap_softmax", &tap_softmax);
  m.def("tap_softmax_backward", &tap_softmax_backward);
  m.def("aggregation_forward", &aggregation_forward);
  m.def("aggregation_backward", &aggregation_backward);
  m.def("gather_forward", &gather_forward);
  m.def("gather_backward", &gather_backward);
  m.def("bn_relu_conv_forward", &bn_relu_conv_forward);
  m.def("bn_relu_conv_backward", &bn_relu_conv_backward);
  m.def("channel_var_mean", &channel_var_mean);
  m.def("bn_relu_maxpool_forward", &bn_relu_maxpool_forward);
  m.def("bn_relu_maxpool_backward", &bn_relu_maxpool_backward);
  m.def("channel_var_mean_backward", &channel_var_mean_backward);
  m.def("relation_var_mean", &relation_var_mean);
  m.def("relation_bn_relu_conv_forward", &relation_bn_relu_conv_forward);
  m.def("relation_bn_relu_conv_backward", &relation_bn_relu_conv_backward);
  m.def("relation_stats_backward", &relation_stats_backward);
}
