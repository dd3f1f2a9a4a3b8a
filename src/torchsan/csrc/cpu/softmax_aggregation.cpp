// The softmax over the K taps of (N, C, K, L), the pairwise attention's normalisation, and the aggregation
// y[n, c, o] = sum_k w[n, c % Cw, k, o] * x[n, c, nbr_k(o)], forward and backward, optionally fused with the softmax.
// The unfolded (N, C, K, L) value tensor is never allocated.
#include "memory_pool.h"
#include "ops.h"
#include "softmax_aggregation.h"

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {
namespace {

template <typename T>
void tap_softmax_forward_kernel(const T* x, T* y, int64_t planes, int64_t K, int64_t L) {
  parallel_range(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tap_softmax_forward_plane(x + t * K * L, y + t * K * L, K, L);
  });
}

// gx = y * (g - sum_k y * g), per position; blocks as in the forward. Tap k of g, y and gx starts k * gs, k * ys
// and k * os values after the first; n positions.
template <typename T, int64_t B, bool FULL>
inline void tap_softmax_backward_block(const T* g, int64_t gs, const T* y, int64_t ys, T* gx, int64_t os, int64_t K,
                                       int64_t n, int64_t q0) {
  int64_t lanes[B];
  block_lanes<T, B, FULL>(lanes, n, q0);
  auto load = [&](const T* p, int64_t b) { return FULL ? load_partial(p, VW<T>) : load_partial(p, lanes[b]); };
  V<T> s[B] = {};
  for (int64_t k = 0; k < K; ++k) {
    if (FULL) {  // 2K strided streams: fetch the next block's lines ahead
      const T* yn = y + k * ys + q0 + B * VW<T>;
      const T* gn = g + k * gs + q0 + B * VW<T>;
      __builtin_prefetch(yn);
      __builtin_prefetch(gn);
      __builtin_prefetch(yn + 64 / sizeof(T));
      __builtin_prefetch(gn + 64 / sizeof(T));
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t i = q0 + b * VW<T>;
      s[b] += load(y + k * ys + i, b) * load(g + k * gs + i, b);
    }
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t i = q0 + b * VW<T>;
      const V<T> v = load(y + k * ys + i, b) * (load(g + k * gs + i, b) - s[b]);
      FULL ? store_partial(gx + k * os + i, v, VW<T>) : store_partial(gx + k * os + i, v, lanes[b]);
    }
}

// K strided rows of n positions (see the block above); gx may be g (in place: each value is read before it is
// written).
template <typename T>
void tap_softmax_backward_rows(const T* g, int64_t gs, const T* y, int64_t ys, T* gx, int64_t os, int64_t K,
                               int64_t n) {
  constexpr int64_t B = kSoftmaxBlockVectors;
  int64_t q0 = 0;
  for (; q0 + B * VW<T> <= n; q0 += B * VW<T>) tap_softmax_backward_block<T, B, true>(g, gs, y, ys, gx, os, K, n, q0);
  for (; q0 < n; q0 += VW<T>) tap_softmax_backward_block<T, 1, false>(g, gs, y, ys, gx, os, K, n, q0);
}

// One (K, L) plane.
template <typename T>
void tap_softmax_backward_plane(const T* g, const T* y, T* gx, int64_t K, int64_t L) {
  tap_softmax_backward_rows(g, L, y, L, gx, L, K, L);
}

template <typename T>
void tap_softmax_backward_kernel(const T* g, const T* y, T* gx, int64_t planes, int64_t K, int64_t L) {
  parallel_range(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      tap_softmax_backward_plane(g + t * K * L, y + t * K * L, gx + t * K * L, K, L);
  });
}

// A quarter of the L2 (the rest holds the x planes): larger softmax planes get a separate pass first (same values).
inline int64_t softmax_plane_bytes() { return cache_sizes().l2_bytes / 4; }

// Output rows per block of the strided aggregation: each tap's weights for a block are one contiguous run of
// kRowBlock * W_out values, which streams far better than one short row per tap, while the block's outputs stay in L1.
constexpr int64_t kRowBlock = 8;

// Backward of the block above: gw[tap] = sum_j gy_j * x_j(tap) (G loads and FMAs, one store per tap, into
// gw_rows + tap * gw_stride), and gxp_j(tap) += w[tap] * gy_j into the padded gradient planes. Lanes past `lanes`
// add exact zeros (gy and w are zero-filled there), so full-width read-modify-writes of gxp are safe.
template <typename T, int G, bool FULL>
inline void aggregation_backward_block(const T* gy0, int64_t gystride, const T* xp, T* gxp, int64_t plane,
                                       const T* w_plane, T* gw_rows, int64_t gw_stride, bool first, int64_t ho,
                                       int64_t q, int64_t lanes, const Geometry& g) {
  const int64_t L = g.L();
  if (FULL) lanes = VW<T>;
  V<T> gv[G];
  for (int j = 0; j < G; ++j) gv[j] = load_partial(gy0 + j * gystride + ho * g.Wo + q, lanes);
  // With wide rows and footprints, taps go column by column: consecutive read-modify-writes of gxp then hit
  // different rows, whereas along a row each overlaps the previous tap's store by all but one lane and the load
  // waits on store forwarding. Each gxp value sums its taps in the same order either way (by kw within its row).
  const bool by_column = g.k >= 5 && g.Wo >= 2 * VW<T>;
  auto tap = [&](int64_t kh, int64_t kw) {
    const int64_t x_offset = (ho + kh * g.d) * g.Wp + q + kw * g.d, w_offset = (kh * g.k + kw) * L + ho * g.Wo + q;
    T* gwp = gw_rows + (kh * g.k + kw) * gw_stride;
    __builtin_prefetch(w_plane + w_offset + 4 * VW<T>);  // K strided streams each of w and gw: fetch ahead explicitly
    __builtin_prefetch(gwp + 4 * VW<T>, 1);
    const V<T> wv = load_partial(w_plane + w_offset, lanes);
    V<T> acc = first ? V<T>{} : load_partial(gwp, lanes);
    for (int j = 0; j < G; ++j) {
      acc += gv[j] * load_partial(xp + j * plane + x_offset, VW<T>);
      T* gq = gxp + j * plane + x_offset;
      store_partial(gq, load_partial(gq, VW<T>) + wv * gv[j], VW<T>);
    }
    store_partial(gwp, acc, lanes);
  };
  if (by_column) {
    for (int64_t kw = 0; kw < g.k; ++kw)
      for (int64_t kh = 0; kh < g.k; ++kh) tap(kh, kw);
  } else {
    for (int64_t kh = 0; kh < g.k; ++kh)
      for (int64_t kw = 0; kw < g.k; ++kw) tap(kh, kw);
  }
}

// The stride-1 backward's gw buffer: blocks of at least this many output positions (runs long enough to stream whole
// lines), used from this many taps on (k >= 5).
constexpr int64_t kGradBlockPositions = 256;
constexpr int64_t kBufferedMinTaps = 25;

// y[n, c, o] = sum_k w[n, c % Cw, k, o] * x[n, c, nbr_k(o)]
// softmax_out: if given, w holds logits; each task first writes the softmax over K of its (K, L) plane into
// softmax_out and then aggregates with it while it is in cache. softmax_scratch: the same, the softmax written into a
// per-thread plane instead (inference: nobody reads it, and an output of that size is faulted in on every call).
template <typename T>
void aggregation_forward_kernel(const T* x, const T* w, T* y, int64_t N, int64_t C, int64_t Cw, const Geometry& g,
                                T* softmax_out = nullptr, bool softmax_scratch = false) {
  const int64_t S = C / Cw, K = g.K(), L = g.L(), HW = g.H * g.W;
  parallel_range(0, N * Cw, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xp(S * g.plane() + VW<T>, T(0));  // slack: full-width loads at the end of the last row
    // (not zero-filled: the softmax writes every value before the aggregation reads it)
    // inference at stride 1: the softmax folded into the aggregation (only the taps' max computed ahead)
    const bool folded = softmax_scratch && g.s == 1 && folds_softmax(S);
    const std::unique_ptr<T[]> scratch(softmax_scratch ? new T[folded ? L : K * L] : nullptr);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / Cw, cw = t % Cw;
      const T* w_plane = w + (n * Cw + cw) * K * L;
      if (folded) {
        tap_max_plane(w_plane, K, L, scratch.get());
        for (int64_t j = 0; j < S; ++j) pad_plane(x + (n * C + j * Cw + cw) * HW, xp.data() + j * g.plane(), g);
        for (int64_t ho = 0; ho < g.Ho; ++ho)
          aggregation_forward_row<T, true>(xp.data(), g.plane(), S, w_plane + ho * g.Wo, L, scratch.get() + ho * g.Wo,
                                           y + (n * C + cw) * L, Cw * L, ho, g);
        continue;
      }
      T* softmax_plane = softmax_scratch ? scratch.get() : softmax_out ? softmax_out + (n * Cw + cw) * K * L : nullptr;
      if (softmax_plane) {
        tap_softmax_forward_plane(w_plane, softmax_plane, K, L);
        w_plane = softmax_plane;
      }
      for (int64_t j = 0; j < S; ++j) pad_plane(x + (n * C + j * Cw + cw) * HW, xp.data() + j * g.plane(), g);
      if (g.s == 1) {
        for (int64_t ho = 0; ho < g.Ho; ++ho)
          aggregation_forward_row<T, false>(xp.data(), g.plane(), S, w_plane + ho * g.Wo, L, nullptr,
                                            y + (n * C + cw) * L, Cw * L, ho, g);
        continue;
      }
      for (int64_t j = 0; j < S; ++j) std::fill(y + (n * C + j * Cw + cw) * L, y + (n * C + j * Cw + cw + 1) * L, T(0));
      for (int64_t hb = 0; hb < g.Ho; hb += kRowBlock) {
        const int64_t he = std::min(g.Ho, hb + kRowBlock);
        for (int64_t kh = 0; kh < g.k; ++kh) {
          for (int64_t kw = 0; kw < g.k; ++kw) {
            for (int64_t ho = hb; ho < he; ++ho) {
              const T* wrow = w_plane + (kh * g.k + kw) * L + ho * g.Wo;
              const int64_t x_offset = (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
              for (int64_t j = 0; j < S; ++j) {
                const T* xrow = xp.data() + j * g.plane() + x_offset;
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

// softmax: w is the output of a softmax over K (see the forward's softmax_out); each task turns its finished (K, L)
// plane of gw into the gradient w.r.t. the logits, in place, while it is in cache.
template <typename T>
void aggregation_backward_kernel(const T* gy, const T* x, const T* w, T* gx, T* gw, int64_t N, int64_t C, int64_t Cw,
                                 const Geometry& g, bool softmax = false) {
  const int64_t S = C / Cw, K = g.K(), L = g.L(), HW = g.H * g.W;
  // Stride 1 with many taps: gw is computed for a block of output rows (at least kGradBlockPositions positions) in a
  // private buffer, finished there (the softmax's gradient) and written out tap by tap as whole runs with streaming
  // stores. Stored straight into the plane, each position's K taps are K scattered writes into lines read in first,
  // more strided streams than the prefetchers follow; with few taps or short runs the direct stores are faster.
  const int64_t rows = std::max<int64_t>(1, std::min(g.Ho, ceil_div(kGradBlockPositions, std::max<int64_t>(1, g.Wo))));
  const int64_t block_stride = rows * g.Wo;
  const bool buffered = g.s == 1 && gx && gw && K >= kBufferedMinTaps && block_stride >= kGradBlockPositions;
  parallel_range(0, N * Cw, 1, [&](int64_t begin, int64_t end) {
    // (slack after the last plane: full-width vector loads and read-modify-writes at the end of its last row)
    std::vector<T> xp(gw ? S * g.plane() + VW<T> : 0, T(0)), gxp(gx ? S * g.plane() + VW<T> : 0);
    std::vector<T> gw_block(buffered ? K * block_stride : 0);  // gw of a block of output rows, all K taps
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / Cw, cw = t % Cw;
      if (g.s == 1 && gx && gw) {
        for (int64_t j = 0; j < S; ++j) pad_plane(x + (n * C + j * Cw + cw) * HW, xp.data() + j * g.plane(), g);
        std::fill(gxp.begin(), gxp.end(), T(0));
        const T* w_plane = w + (n * Cw + cw) * K * L;
        T* gw_plane = gw + (n * Cw + cw) * K * L;
        const int64_t step = buffered ? rows : g.Ho, stride = buffered ? block_stride : L;
        for (int64_t hb = 0; hb < g.Ho; hb += step) {
          const int64_t he = std::min(g.Ho, hb + step), span = (he - hb) * g.Wo;
          for (int64_t ho = hb; ho < he; ++ho) {
            for (int64_t q = 0; q < g.Wo; q += VW<T>) {
              const int64_t lanes = std::min(VW<T>, g.Wo - q);
              T* gw_rows = buffered ? gw_block.data() + (ho - hb) * g.Wo + q : gw_plane + ho * g.Wo + q;
              const T* gyq = gy + (n * C + cw) * L;
              int64_t j = 0;
              for (; j + 8 <= S; j += 8) {
                if (lanes == VW<T>)
                  aggregation_backward_block<T, 8, true>(gyq + j * Cw * L, Cw * L, xp.data() + j * g.plane(),
                                                         gxp.data() + j * g.plane(), g.plane(), w_plane, gw_rows,
                                                         stride, j == 0, ho, q, lanes, g);
                else
                  aggregation_backward_block<T, 8, false>(gyq + j * Cw * L, Cw * L, xp.data() + j * g.plane(),
                                                          gxp.data() + j * g.plane(), g.plane(), w_plane, gw_rows,
                                                          stride, j == 0, ho, q, lanes, g);
              }
              for (; j < S; ++j)
                aggregation_backward_block<T, 1, false>(gyq + j * Cw * L, Cw * L, xp.data() + j * g.plane(),
                                                        gxp.data() + j * g.plane(), g.plane(), w_plane, gw_rows,
                                                        stride, j == 0, ho, q, lanes, g);
            }
          }
          if (!buffered) continue;
          // the block's softmax gradient while its w rows are in cache, then each tap's run of gw written once
          if (softmax)
            tap_softmax_backward_rows(gw_block.data(), block_stride, w_plane + hb * g.Wo, L, gw_block.data(),
                                      block_stride, K, span);
          for (int64_t tap = 0; tap < K; ++tap)
            stream_copy(gw_plane + tap * L + hb * g.Wo, gw_block.data() + tap * block_stride, span);
        }
        if (softmax && !buffered) tap_softmax_backward_plane(gw_plane, w_plane, gw_plane, K, L);
        for (int64_t j = 0; j < S; ++j) {
          T* dst = gx + (n * C + j * Cw + cw) * HW;
          std::fill(dst, dst + HW, T(0));
          fold_plane(gxp.data() + j * g.plane(), dst, g);
        }
        continue;
      }
      if (gw) {
        for (int64_t j = 0; j < S; ++j) pad_plane(x + (n * C + j * Cw + cw) * HW, xp.data() + j * g.plane(), g);
        std::fill(gw + (n * Cw + cw) * K * L, gw + (n * Cw + cw + 1) * K * L, T(0));
      }
      if (gx) std::fill(gxp.begin(), gxp.end(), T(0));
      const T* w_plane = w + (n * Cw + cw) * K * L;
      T* gw_plane = gw ? gw + (n * Cw + cw) * K * L : nullptr;
      for (int64_t hb = 0; hb < g.Ho; hb += kRowBlock) {
        const int64_t he = std::min(g.Ho, hb + kRowBlock);
        for (int64_t kh = 0; kh < g.k; ++kh) {
          for (int64_t kw = 0; kw < g.k; ++kw) {
            for (int64_t ho = hb; ho < he; ++ho) {
              const int64_t tap_offset = (kh * g.k + kw) * L + ho * g.Wo;
              const int64_t x_offset = (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
              for (int64_t j = 0; j < S; ++j) {
                const T* gyrow = gy + (n * C + j * Cw + cw) * L + ho * g.Wo;
                if (gw) {
                  const T* xrow = xp.data() + j * g.plane() + x_offset;
                  T* gwrow = gw_plane + tap_offset;
                  if (g.s == 1) {
#pragma omp simd
                    for (int64_t wo = 0; wo < g.Wo; ++wo) gwrow[wo] += gyrow[wo] * xrow[wo];
                  } else {
                    for (int64_t wo = 0; wo < g.Wo; ++wo) gwrow[wo] += gyrow[wo] * xrow[wo * g.s];
                  }
                }
                if (gx) {
                  const T* wrow = w_plane + tap_offset;
                  T* gxrow = gxp.data() + j * g.plane() + x_offset;
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
      if (softmax && gw_plane) tap_softmax_backward_plane(gw_plane, w_plane, gw_plane, K, L);
    }
    if (buffered) stream_fence();  // the streamed values are visible to whoever reads gw next
  });
}

}  // namespace

at::Tensor tap_softmax_forward(at::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "tap_softmax_forward: x must be a 4-D CPU tensor (N, C, K, L)");
  x = x.contiguous();
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tap_softmax_forward", [&] {
    tap_softmax_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.size(0) * x.size(1),
                                         x.size(2), x.size(3));
  });
  return y;
}

at::Tensor tap_softmax_backward(at::Tensor g, at::Tensor y) {
  TORCH_CHECK(g.device().is_cpu() && g.dim() == 4 && g.sizes() == y.sizes() && g.scalar_type() == y.scalar_type(),
              "tap_softmax_backward: grad and output must be 4-D CPU tensors of the same shape and dtype");
  g = g.contiguous();
  y = y.contiguous();
  auto gx = at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "tap_softmax_backward", [&] {
    tap_softmax_backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
                                          y.size(0) * y.size(1), y.size(2), y.size(3));
  });
  return gx;
}

// The forward's operands, checked and contiguous: x (N, C, H, W), w (N, Cw, K, L) with C % Cw == 0.
static Geometry aggregation_operands(at::Tensor& x, at::Tensor& w, int64_t k, int64_t s, int64_t p, int64_t d, bool reflect) {
  check_cpu(x, "x");
  check_cpu(w, "weight");
  x = x.contiguous();
  w = w.contiguous();
  const Geometry g(x.size(2), x.size(3), k, s, p, d, reflect);
  check_geometry(g);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "weight dtype must match x");
  TORCH_CHECK(w.dim() == 4 && w.size(0) == x.size(0) && w.size(1) > 0 && x.size(1) % w.size(1) == 0 &&
                  w.size(2) == g.K() && w.size(3) == g.L(),
              "weight shape mismatch");
  return g;
}

std::vector<at::Tensor> aggregation_forward(at::Tensor x, at::Tensor w, int64_t k, int64_t s, int64_t p, int64_t d,
                                            bool reflect, bool softmax) {
  const Geometry g = aggregation_operands(x, w, k, s, p, d, reflect);
  const int64_t N = x.size(0), C = x.size(1), Cw = w.size(1);
  auto y = pooled_empty({N, C, g.Ho, g.Wo}, x.options(), !x.requires_grad());
  auto softmax_out = softmax ? at::empty_like(w) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aggregation_forward", [&] {
    const bool per_task = softmax && g.K() * g.L() * int64_t(sizeof(scalar_t)) <= softmax_plane_bytes();
    if (softmax && !per_task)
      tap_softmax_forward_kernel<scalar_t>(w.data_ptr<scalar_t>(), softmax_out.data_ptr<scalar_t>(), N * Cw, g.K(),
                                           g.L());
    aggregation_forward_kernel<scalar_t>(
        x.data_ptr<scalar_t>(), softmax && !per_task ? softmax_out.data_ptr<scalar_t>() : w.data_ptr<scalar_t>(),
        y.data_ptr<scalar_t>(), N, C, Cw, g, per_task ? softmax_out.data_ptr<scalar_t>() : nullptr);
  });
  if (softmax) return {y, softmax_out};
  return {y};
}

at::Tensor softmax_aggregation_inference(at::Tensor x, at::Tensor logits, int64_t k, int64_t s, int64_t p, int64_t d,
                                         bool reflect) {
  const Geometry g = aggregation_operands(x, logits, k, s, p, d, reflect);
  const int64_t N = x.size(0), C = x.size(1), Cw = logits.size(1);
  auto y = pooled_empty({N, C, g.Ho, g.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_aggregation_inference", [&] {
    aggregation_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                         N, C, Cw, g, nullptr, true);
  });
  return y;
}

std::vector<at::Tensor> aggregation_backward(at::Tensor gy, at::Tensor x, at::Tensor w, int64_t k, int64_t s, int64_t p,
                                             int64_t d, bool reflect, bool need_x, bool need_w, bool softmax) {
  check_cpu(gy, "grad");
  gy = gy.contiguous();
  x = x.contiguous();
  w = w.contiguous();
  const Geometry g(x.size(2), x.size(3), k, s, p, d, reflect);
  const int64_t N = x.size(0), C = x.size(1), Cw = w.size(1);
  auto gx = need_x ? at::empty_like(x) : at::Tensor();
  // (no value channels: nothing adds into gw, which is zero)
  auto gw = need_w ? (C == 0 ? at::zeros_like(w) : at::empty_like(w)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aggregation_backward", [&] {
    aggregation_backward_kernel<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                          need_x ? gx.data_ptr<scalar_t>() : nullptr,
                                          need_w ? gw.data_ptr<scalar_t>() : nullptr, N, C, Cw, g, softmax);
  });
  return {gx, gw};
}

void add_aggregation_constants(KernelConstants& constants) {
  constants["softmax_plane_bytes"] = softmax_plane_bytes();
  constants["aggregation_grad_block_positions"] = kGradBlockPositions;
  constants["aggregation_grad_block_min_taps"] = kBufferedMinTaps;
}

}  // namespace cpu
}  // namespace torchsan
