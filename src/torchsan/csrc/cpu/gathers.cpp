// The gathers: subtraction2 out[n, c, k, o] = x1[n, c, centre(o)] - x2[n, c, nbr_k(o)] and unfold
// out[n, c, k, o] = x[n, c, nbr_k(o)], (N, C, H, W) -> (N, C, K, L), forward (with channels appended) and backward.
#include "gathers.h"

#include "ops.h"

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {
namespace {

// The gathers write K = 9 to 49 times their input. An output that would leave the caches before it is read is
// written with streaming stores (see stream_store): tap by tap where taps are long, else a small plane at a time
// through a private buffer (short taps streamed one by one leave lines partly written).

// A quarter of the L3: outputs this large are evicted before they are read, so long taps are streamed.
inline int64_t stream_bytes() { return cache_sizes().l3_bytes / 4; }
// The shortest taps streamed one by one: shorter runs leave lines partly written.
constexpr int64_t kStreamRunBytes = 2048;
// The L3: smaller outputs are read faster from the cache than staging them saves.
inline int64_t staged_stream_bytes() { return cache_sizes().l3_bytes; }
// The shortest taps staged: staging shorter ones costs more than streaming saves.
constexpr int64_t kStagedRunBytes = 512;

// out[i] = (centre ? centre[i] : 0) - sign * src[i] for i < n, the whole vectors with streaming stores.
// (sign = +-1: exact products, so the same values as the plain loops.)
template <typename T>
void stream_gather_row(T* out, const T* centre, const T* src, T sign, int64_t n) {
  int64_t i = 0;
  for (; i < n && reinterpret_cast<std::uintptr_t>(out + i) % sizeof(V<T>) != 0; ++i)
    out[i] = centre ? centre[i] - sign * src[i] : -sign * src[i];
  for (; i + VW<T> <= n; i += VW<T>) {
    V<T> x;
    std::memcpy(&x, src + i, sizeof(x));
    V<T> v = -sign * x;
    if (centre) {
      V<T> c;
      std::memcpy(&c, centre + i, sizeof(c));
      v = c - sign * x;
    }
    stream_store(out + i, v);
  }
  for (; i < n; ++i) out[i] = centre ? centre[i] - sign * src[i] : -sign * src[i];
}

// Stride 1: every tap is one run of the column-shifted copies (see shift_columns), written plainly, streamed, or
// staged in a plane buffer and streamed out.
template <typename T>
void gather_forward_stride1(const T* x1, const T* x2, T* out, T sign, int64_t N, int64_t C, int64_t Ct,
                            const Geometry& g) {
  const int64_t K = g.K(), L = g.L(), HW = g.H * g.W;
  const bool same = centres_are_input(g);  // the centres are x1's own plane
  const int64_t bytes = N * Ct * K * L * int64_t(sizeof(T));
  const bool stream = kHaveStreamStores && bytes >= stream_bytes() && L * int64_t(sizeof(T)) >= kStreamRunBytes;
  const bool staged = kHaveStreamStores && !stream && bytes > staged_stream_bytes() &&
                      L * int64_t(sizeof(T)) >= kStagedRunBytes && K * L * int64_t(sizeof(T)) <= kSmallPlaneBytes;
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    const T local_sign = sign;  // the task's copy (captured by reference): not reloaded after each store
    std::vector<T> xp(g.plane() + kBufferSlack<T>), S(g.k * g.Hp * g.Wo + kBufferSlack<T>);
    std::vector<T> centre_buffer(x1 && !same ? L : 0), staged_plane(staged ? K * L : 0);
    for (int64_t t = begin; t < end; ++t) {
      shifted_copies(x2 + t * HW, xp.data(), S.data(), g);
      const T* centre_values = x1 ? centres(x1 + t * HW, xp.data(), centre_buffer.data(), g) : nullptr;
      T* const out_plane = out + ((t / C) * Ct + t % C) * K * L;  // out has Ct >= C channels
      T* write_plane = staged ? staged_plane.data() : out_plane;
      for (int64_t kh = 0; kh < g.k; ++kh) {
        for (int64_t kw = 0; kw < g.k; ++kw) {
          const T* src = S.data() + (kw * g.Hp + kh * g.d) * g.Wo;
          T* out_tap = write_plane + (kh * g.k + kw) * L;
          if (stream) {
            stream_gather_row(out_tap, centre_values, src, local_sign, L);
          } else if (centre_values) {
#pragma omp simd
            for (int64_t i = 0; i < L; ++i) out_tap[i] = centre_values[i] - local_sign * src[i];
          } else {
#pragma omp simd
            for (int64_t i = 0; i < L; ++i) out_tap[i] = -local_sign * src[i];
          }
        }
      }
      if (staged)  // a copy
        stream_copy(out_plane, staged_plane.data(), K * L);
    }
    if (stream || staged) stream_fence();  // the streamed values are visible to whoever reads the output next
  });
}

// out[n, c, k, o] = (x1 ? x1[n, c, centre(o)] : 0) - sign * x2[n, c, nbr_k(o)]; unfold is x1 = null, sign = -1.
// Stride 1 runs gather_forward_stride1; the rows below are strided.
template <typename T>
void gather_forward_kernel(const T* x1, const T* x2, T* out, T sign, int64_t N, int64_t C, int64_t Ct,
                           const Geometry& g) {
  if (g.s == 1) return gather_forward_stride1(x1, x2, out, sign, N, C, Ct, g);
  const int64_t K = g.K(), L = g.L(), HW = g.H * g.W, c0 = (g.k / 2) * g.d;
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> x1_padded(x1 ? g.plane() : 0), x2_padded(g.plane());
    for (int64_t t = begin; t < end; ++t) {
      if (x1) pad_plane(x1 + t * HW, x1_padded.data(), g);
      pad_plane(x2 + t * HW, x2_padded.data(), g);
      for (int64_t kh = 0; kh < g.k; ++kh) {
        for (int64_t kw = 0; kw < g.k; ++kw) {
          T* out_tap = out + (((t / C) * Ct + t % C) * K + kh * g.k + kw) * L;  // out has Ct >= C channels
          for (int64_t ho = 0; ho < g.Ho; ++ho) {
            T* out_row = out_tap + ho * g.Wo;
            const T* xrow = x2_padded.data() + (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
            const T* crow = x1 ? x1_padded.data() + (ho * g.s + c0) * g.Wp + c0 : nullptr;
            if (crow) {
              for (int64_t wo = 0; wo < g.Wo; ++wo) out_row[wo] = crow[wo * g.s] - sign * xrow[wo * g.s];
            } else {
              for (int64_t wo = 0; wo < g.Wo; ++wo) out_row[wo] = -sign * xrow[wo * g.s];
            }
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor gather_forward(c10::optional<at::Tensor> x1, at::Tensor x2, int64_t k, int64_t s, int64_t p, int64_t d,
                          bool reflect, c10::optional<at::Tensor> append) {
  check_cpu(x2, "x");
  x2 = x2.contiguous();
  at::Tensor centre_input, appended;
  if (x1.has_value()) centre_input = x1->contiguous();
  const Geometry g(x2.size(2), x2.size(3), k, s, p, d, reflect);
  check_geometry(g);
  TORCH_CHECK(
      !centre_input.defined() || (centre_input.sizes() == x2.sizes() && centre_input.scalar_type() == x2.scalar_type()),
      "x1 and x2 must have the same shape and dtype");
  const int64_t N = x2.size(0), C = x2.size(1);
  int64_t E = 0;
  if (append.has_value()) {
    appended = append->contiguous();
    TORCH_CHECK(appended.dim() == 4 && (appended.size(0) == 1 || appended.size(0) == N) && appended.size(2) == g.K() &&
                    appended.size(3) == g.L() && appended.scalar_type() == x2.scalar_type() &&
                    appended.device().is_cpu(),
                "append must be a CPU tensor (1 or N, E, K, L) of x's dtype, got ", appended.sizes());
    E = appended.size(1);
  }
  auto out = at::empty({N, C + E, g.K(), g.L()}, x2.options());
  AT_DISPATCH_FLOATING_TYPES(x2.scalar_type(), "gather_forward", [&] {
    const scalar_t sign = centre_input.defined() ? scalar_t(1) : scalar_t(-1);
    gather_forward_kernel<scalar_t>(centre_input.defined() ? centre_input.data_ptr<scalar_t>() : nullptr,
                                    x2.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), sign, N, C, C + E, g);
    if (E > 0) {
      const int64_t block = E * g.K() * g.L();
      const bool broadcast = appended.size(0) == 1;
      const scalar_t* src = appended.data_ptr<scalar_t>();
      scalar_t* dst = out.data_ptr<scalar_t>();
      parallel_range(0, N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
          std::copy(src + (broadcast ? 0 : n) * block, src + (broadcast ? 1 : n + 1) * block,
                    dst + (n * (C + E) + C) * g.K() * g.L());
      });
    }
  });
  return out;
}

std::vector<at::Tensor> gather_backward(at::Tensor gout, int64_t H, int64_t W, int64_t k, int64_t s, int64_t p,
                                        int64_t d, bool reflect, bool subtraction, bool need_x1, bool need_x2,
                                        int64_t channels) {
  check_cpu(gout, "grad");
  gout = gout.contiguous();
  const Geometry g(H, W, k, s, p, d, reflect);
  const int64_t N = gout.size(0), Ct = gout.size(1), C = channels;
  TORCH_CHECK(0 <= C && C <= Ct, "gather_backward: channels must be in [0, ", Ct, "]");
  TORCH_CHECK(gout.size(2) == g.K() && gout.size(3) == g.L(), "gather_backward: grad does not match the footprint");
  auto opts = gout.options();
  auto gx1 = (subtraction && need_x1) ? at::empty({N, C, H, W}, opts) : at::Tensor();
  auto gx2 = need_x2 ? at::empty({N, C, H, W}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(gout.scalar_type(), "gather_backward", [&] {
    const scalar_t sign = subtraction ? scalar_t(1) : scalar_t(-1);
    gather_backward_kernel<scalar_t>(gout.data_ptr<scalar_t>(), gx1.defined() ? gx1.data_ptr<scalar_t>() : nullptr,
                                     gx2.defined() ? gx2.data_ptr<scalar_t>() : nullptr, sign, N, C, Ct, g);
  });
  return {gx1, gx2};
}

void add_gather_constants(KernelConstants& constants) {
  constants["stream_bytes"] = stream_bytes();
  constants["stream_run_bytes"] = kStreamRunBytes;
  constants["small_plane_bytes"] = kSmallPlaneBytes;
  constants["staged_stream_bytes"] = staged_stream_bytes();
  constants["staged_run_bytes"] = kStagedRunBytes;
  constants["stream_stores"] = kHaveStreamStores ? 1 : 0;
}

}  // namespace cpu
}  // namespace torchsan
