// y = maxpool2x2(relu(scale * x + shift)), stride 2, floor mode: a BatchNorm (as its per-channel affine map), ReLU
// and the max-pool that follow each other at every SAN stage boundary, in one pass; the BN and ReLU outputs (4x the
// pooled size) are never written. Ties and NaN follow PyTorch's max-pool: the window is scanned row by row, a value
// replaces the best so far if it is larger or NaN. SAN's stem puts a 1x1 convolution of the image in front
// (conv1x1_affine_relu_maxpool2x2): its full-resolution output is never written either, forward or backward.
#include "common.h"
#include "memory_pool.h"
#include "ops.h"

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {
namespace {

template <typename T>
inline T affine_relu(T v, T a, T b) {
  const T pre = v * a + b;
  return pre <= 0 ? T(0) : pre;
}

// The window's maximum of relu(a * x + b) over (r0[0], r0[1], r1[0], r1[1]), its index (0..3) and its raw x.
// Branch-free selects, so that loops over windows vectorise.
template <typename T>
inline T window_max(const T* r0, const T* r1, T a, T b, T& arg, T& xarg) {  // arg: 0..3 as T, for uniform vectors
  const T x[4] = {r0[0], r0[1], r1[0], r1[1]};
  T best = affine_relu(x[0], a, b);
  arg = 0;
  xarg = x[0];
  for (int i = 1; i < 4; ++i) {
    const T v = affine_relu(x[i], a, b);
    const bool take = v > best || v != v;  // v != v: NaN
    best = take ? v : best;
    arg = take ? T(i) : arg;
    xarg = take ? x[i] : xarg;
  }
  return best;
}

// The lane indices that take the even and the odd values of two vectors side by side (__builtin_shuffle's masks).
template <typename T>
struct Deinterleave {
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I VI __attribute__((vector_size(kVectorBytes)));
  VI even, odd;
  Deinterleave() {
    for (int64_t i = 0; i < VW<T>; ++i) even[i] = I(2 * i), odd[i] = I(2 * i + 1);
  }
};

// One pooled row: yr[0 .. Wo) = the windows' maxima of relu(a * x + b) over rows r0 and r1 (2 Wo values each), a
// vector of windows at a time with a partial last one (a loop over windows would leave the last Wo % VW to scalar
// code: most of a 28-wide row). The same values as window_max.
template <typename T>
inline void pool_row(const T* r0, const T* r1, T a, T b, T* yr, int64_t Wo, const Deinterleave<T>& lanes) {
  for (int64_t j = 0; j < Wo; j += VW<T>) {
    const int64_t n = std::min(VW<T>, Wo - j), lo = std::min(VW<T>, 2 * n), hi = 2 * n - lo;
    const V<T> r0lo = load_partial(r0 + 2 * j, lo), r0hi = hi ? load_partial(r0 + 2 * j + VW<T>, hi) : V<T>{};
    const V<T> r1lo = load_partial(r1 + 2 * j, lo), r1hi = hi ? load_partial(r1 + 2 * j + VW<T>, hi) : V<T>{};
    const V<T> x4[4] = {__builtin_shuffle(r0lo, r0hi, lanes.even), __builtin_shuffle(r0lo, r0hi, lanes.odd),
                        __builtin_shuffle(r1lo, r1hi, lanes.even), __builtin_shuffle(r1lo, r1hi, lanes.odd)};
    V<T> best = {};
    for (int q = 0; q < 4; ++q) {
      V<T> v = x4[q] * a + b;
      v = v <= 0 ? V<T>{} : v;  // NaN passes through, like torch.relu
      best = q == 0 ? v : ((v > best) | (v != v)) ? v : best;  // larger or NaN replaces, as window_max
    }
    store_partial(yr + j, best, n);
  }
}

template <typename T>
void affine_relu_maxpool2x2_forward_kernel(const T* x, const T* scale, const T* shift, T* y, int64_t N, int64_t C,
                                           int64_t H, int64_t W) {
  const int64_t Ho = H / 2, Wo = W / 2;
  const Deinterleave<T> lanes;
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T a = scale[t % C], b = shift[t % C];
      for (int64_t i = 0; i < Ho; ++i) {
        const T* r0 = x + t * H * W + 2 * i * W;
        pool_row(r0, r0 + W, a, b, y + t * Ho * Wo + i * Wo, Wo, lanes);
      }
    }
  });
}

// gx (zero but at each window's argmax), and gscale, gshift (C): per-plane sums, reduced in plane order.
template <typename T>
void affine_relu_maxpool2x2_backward_kernel(const T* gy, const T* x, const T* scale, const T* shift, T* gx, T* gscale,
                                            T* gshift, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t Ho = H / 2, Wo = W / 2;
  std::vector<T> partial(2 * N * C);
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> window_grads(4 * Wo);  // one output row's gradient for each of the 4 window positions
    for (int64_t t = begin; t < end; ++t) {
      const T a = scale[t % C], b = shift[t % C];
      const T* x_plane = x + t * H * W;
      T* gx_plane = gx + t * H * W;
      if (H % 2) std::fill(gx_plane + (H - 1) * W, gx_plane + H * W, T(0));  // the rows and columns no window covers
      T sum_gscale = 0, sum_gshift = 0;
      for (int64_t i = 0; i < Ho; ++i) {
        const T* r0 = x_plane + 2 * i * W;
        const T* gy_row = gy + t * Ho * Wo + i * Wo;
        T* gx_row0 = gx_plane + 2 * i * W;
        T* gx_row1 = gx_row0 + W;
        T *grad0 = window_grads.data(), *grad1 = grad0 + Wo, *grad2 = grad1 + Wo, *grad3 = grad2 + Wo;
#pragma omp simd reduction(+ : sum_gscale, sum_gshift)
        for (int64_t j = 0; j < Wo; ++j) {
          T arg, xarg;
          const T best = window_max(r0 + 2 * j, r0 + W + 2 * j, a, b, arg, xarg);
          const T grad_pre = best <= 0 ? T(0) : gy_row[j];  // ReLU's backward: zero where its output is <= 0
          const T v = grad_pre * a;
          grad0[j] = arg == T(0) ? v : T(0);
          grad1[j] = arg == T(1) ? v : T(0);
          grad2[j] = arg == T(2) ? v : T(0);
          grad3[j] = arg == T(3) ? v : T(0);
          sum_gscale += grad_pre * xarg;
          sum_gshift += grad_pre;
        }
        for (int64_t j = 0; j < Wo; ++j) {
          gx_row0[2 * j] = grad0[j];
          gx_row0[2 * j + 1] = grad1[j];
        }
        for (int64_t j = 0; j < Wo; ++j) {
          gx_row1[2 * j] = grad2[j];
          gx_row1[2 * j + 1] = grad3[j];
        }
        if (W % 2) gx_row0[W - 1] = gx_row1[W - 1] = T(0);
      }
      partial[2 * t] = sum_gscale;
      partial[2 * t + 1] = sum_gshift;
    }
  });
  for (int64_t t = 0; t < N * C; ++t) {
    gscale[t % C] += partial[2 * t];
    gshift[t % C] += partial[2 * t + 1];
  }
}

// The stem: y = maxpool2x2(relu(scale * (W x) + shift)), W a 1x1 convolution (C, Cin) with a
// narrow input (an image's channels). Per output row, each channel's conv values for the two input rows it pools
// are computed into a buffer and pooled at once; the full-resolution conv, BN and ReLU outputs are never written.
template <typename T>
void conv1x1_affine_relu_maxpool2x2_forward_kernel(const T* x, const T* w, const T* scale, const T* shift, T* y,
                                                   int64_t N, int64_t Cin, int64_t C, int64_t H, int64_t W) {
  const int64_t Ho = H / 2, Wo = W / 2, span = 2 * Wo, plane = H * W;
  const Deinterleave<T> lanes;
  parallel_range(0, N * Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(2 * span);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / Ho, i = t % Ho;
      const T* x0 = x + n * Cin * plane + 2 * i * W;  // channel ci's two rows: x0 + ci * plane (+ W)
      T* r0 = rows.data();
      T* r1 = r0 + span;
      for (int64_t c = 0; c < C; ++c) {
        const T* wc = w + c * Cin;
        std::fill(rows.begin(), rows.end(), T(0));  // (Cin = 0: the conv is 0)
        for (int64_t ci = 0; ci < Cin; ++ci) {
          const T a = wc[ci];
          const T* xc = x0 + ci * plane;
#pragma omp simd
          for (int64_t j = 0; j < span; ++j) {
            r0[j] += a * xc[j];
            r1[j] += a * xc[W + j];
          }
        }
        pool_row(r0, r1, scale[c], shift[c], y + ((n * C + c) * Ho + i) * Wo, Wo, lanes);
      }
    }
  });
}

// The stem's backward, per output row as in the forward: each channel's conv rows are recomputed, the window's
// argmax found again, and its gradient grad_pre * scale placed at the argmax of two full-resolution rows q0, q1.
// From those, gw (C, Cin) sums q * x over the rows, and gx (if wanted) sums weight * q over the channels; gscale and
// gshift sum grad_pre * conv value and grad_pre. Per-row partial sums, reduced in row order.
template <typename T>
void conv1x1_affine_relu_maxpool2x2_backward_kernel(const T* gy, const T* x, const T* w, const T* scale,
                                                    const T* shift, T* gx, T* gw, T* gscale, T* gshift, int64_t N,
                                                    int64_t Cin, int64_t C, int64_t H, int64_t W) {
  const int64_t Ho = H / 2, Wo = W / 2, span = 2 * Wo, plane = H * W, width = C * (Cin + 2);
  std::vector<T> partial(N * Ho * width);
  parallel_range(0, N * Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(2 * span), grads(2 * span), window_grads(4 * Wo), gx_rows(gx ? 2 * Cin * span : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / Ho, i = t % Ho;
      const T* x0 = x + n * Cin * plane + 2 * i * W;  // channel ci's two rows: x0 + ci * plane (+ W)
      T *r0 = rows.data(), *r1 = r0 + span, *q0 = grads.data(), *q1 = q0 + span;
      T *g0 = window_grads.data(), *g1 = g0 + Wo, *g2 = g1 + Wo, *g3 = g2 + Wo;
      T* out = partial.data() + t * width;
      std::fill(gx_rows.begin(), gx_rows.end(), T(0));
      for (int64_t c = 0; c < C; ++c) {
        const T* wc = w + c * Cin;
        std::fill(rows.begin(), rows.end(), T(0));
        for (int64_t ci = 0; ci < Cin; ++ci) {
          const T a = wc[ci];
          const T* xc = x0 + ci * plane;
#pragma omp simd
          for (int64_t j = 0; j < span; ++j) {
            r0[j] += a * xc[j];
            r1[j] += a * xc[W + j];
          }
        }
        const T a = scale[c], b = shift[c];
        const T* gy_row = gy + ((n * C + c) * Ho + i) * Wo;
        T sum_gscale = 0, sum_gshift = 0;
#pragma omp simd reduction(+ : sum_gscale, sum_gshift)
        for (int64_t j = 0; j < Wo; ++j) {
          T arg, yarg;
          const T best = window_max(r0 + 2 * j, r1 + 2 * j, a, b, arg, yarg);
          const T grad_pre = best <= 0 ? T(0) : gy_row[j];  // ReLU's backward: zero where its output is <= 0
          const T v = grad_pre * a;
          g0[j] = arg == T(0) ? v : T(0);
          g1[j] = arg == T(1) ? v : T(0);
          g2[j] = arg == T(2) ? v : T(0);
          g3[j] = arg == T(3) ? v : T(0);
          sum_gscale += grad_pre * yarg;
          sum_gshift += grad_pre;
        }
        for (int64_t j = 0; j < Wo; ++j) {
          q0[2 * j] = g0[j];
          q0[2 * j + 1] = g1[j];
          q1[2 * j] = g2[j];
          q1[2 * j + 1] = g3[j];
        }
        for (int64_t ci = 0; ci < Cin; ++ci) {
          const T* xc = x0 + ci * plane;
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < span; ++j) sum += q0[j] * xc[j] + q1[j] * xc[W + j];
          out[c * Cin + ci] = sum;
          if (gx) {
            const T wv = wc[ci];
            T* gr = gx_rows.data() + ci * 2 * span;
#pragma omp simd
            for (int64_t j = 0; j < span; ++j) {
              gr[j] += wv * q0[j];
              gr[span + j] += wv * q1[j];
            }
          }
        }
        out[C * Cin + c] = sum_gscale;
        out[C * Cin + C + c] = sum_gshift;
      }
      if (gx) {
        for (int64_t ci = 0; ci < Cin; ++ci) {
          T* gx0 = gx + (n * Cin + ci) * plane + 2 * i * W;
          const T* gr = gx_rows.data() + ci * 2 * span;
          std::copy(gr, gr + span, gx0);
          std::copy(gr + span, gr + 2 * span, gx0 + W);
          if (W % 2) gx0[W - 1] = gx0[2 * W - 1] = T(0);  // the column no window covers
          if (H % 2 && i == Ho - 1) std::fill(gx0 + 2 * W, gx0 + 3 * W, T(0));  // the row no window covers
        }
      }
    }
  });
  for (int64_t t = 0; t < N * Ho; ++t) {
    const T* in = partial.data() + t * width;
    for (int64_t k = 0; k < C * Cin; ++k) gw[k] += in[k];
    for (int64_t c = 0; c < C; ++c) {
      gscale[c] += in[C * Cin + c];
      gshift[c] += in[C * Cin + C + c];
    }
  }
}

}  // namespace

at::Tensor affine_relu_maxpool2x2_forward(at::Tensor x, at::Tensor scale, at::Tensor shift) {
  check_cpu(x, "x");
  x = x.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(scale.numel() == C && shift.numel() == C, "affine_relu_maxpool2x2: scale and shift need C values");
  TORCH_CHECK(H >= 2 && W >= 2, "affine_relu_maxpool2x2: a 2x2 max-pool needs at least 2x2 pixels, got ", H, "x", W);
  auto y = pooled_empty({N, C, H / 2, W / 2}, x.options(), !x.requires_grad());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "affine_relu_maxpool2x2_forward", [&] {
    affine_relu_maxpool2x2_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                                                    shift.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, C, H, W);
  });
  return y;
}

std::vector<at::Tensor> affine_relu_maxpool2x2_backward(at::Tensor gy, at::Tensor x, at::Tensor scale,
                                                        at::Tensor shift) {
  gy = gy.contiguous();
  x = x.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(gy.size(0) == N && gy.size(1) == C && gy.size(2) == H / 2 && gy.size(3) == W / 2,
              "affine_relu_maxpool2x2_backward: grad shape mismatch");
  auto gx = at::empty_like(x);
  auto gscale = at::zeros_like(scale), gshift = at::zeros_like(shift);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "affine_relu_maxpool2x2_backward", [&] {
    affine_relu_maxpool2x2_backward_kernel<scalar_t>(
        gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(),
        gx.data_ptr<scalar_t>(), gscale.data_ptr<scalar_t>(), gshift.data_ptr<scalar_t>(), N, C, H, W);
  });
  return {gx, gscale, gshift};
}

at::Tensor conv1x1_affine_relu_maxpool2x2_forward(at::Tensor x, at::Tensor weight, at::Tensor scale,
                                                  at::Tensor shift) {
  check_cpu(x, "x");
  x = x.contiguous();
  weight = weight.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 2, "conv1x1_affine_relu_maxpool2x2: x (N, Cin, H, W), weight (C, Cin)");
  const int64_t N = x.size(0), Cin = x.size(1), C = weight.size(0), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.size(1) == Cin && scale.numel() == C && shift.numel() == C,
              "conv1x1_affine_relu_maxpool2x2: shape mismatch");
  TORCH_CHECK(H >= 2 && W >= 2, "conv1x1_affine_relu_maxpool2x2: a 2x2 max-pool needs at least 2x2 pixels, got ", H,
              "x", W);
  auto y = pooled_empty({N, C, H / 2, W / 2}, x.options(), !x.requires_grad());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1x1_affine_relu_maxpool2x2_forward", [&] {
    conv1x1_affine_relu_maxpool2x2_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                                            scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(),
                                                            y.data_ptr<scalar_t>(), N, Cin, C, H, W);
  });
  return y;
}

std::vector<at::Tensor> conv1x1_affine_relu_maxpool2x2_backward(at::Tensor gy, at::Tensor x, at::Tensor weight,
                                                                at::Tensor scale, at::Tensor shift, bool input_grad) {
  check_cpu(x, "x");
  gy = gy.contiguous();
  x = x.contiguous();
  weight = weight.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  const int64_t N = x.size(0), Cin = x.size(1), C = weight.size(0), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == Cin && scale.numel() == C && shift.numel() == C,
              "conv1x1_affine_relu_maxpool2x2_backward: shape mismatch");
  TORCH_CHECK(H >= 2 && W >= 2, "conv1x1_affine_relu_maxpool2x2_backward: a 2x2 max-pool needs at least 2x2 pixels, "
              "got ", H, "x", W);
  TORCH_CHECK(gy.dim() == 4 && gy.size(0) == N && gy.size(1) == C && gy.size(2) == H / 2 && gy.size(3) == W / 2,
              "conv1x1_affine_relu_maxpool2x2_backward: grad shape mismatch");
  auto gx = input_grad ? at::empty_like(x) : at::Tensor();
  auto gw = at::zeros_like(weight), gscale = at::zeros_like(scale), gshift = at::zeros_like(shift);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1x1_affine_relu_maxpool2x2_backward", [&] {
    conv1x1_affine_relu_maxpool2x2_backward_kernel<scalar_t>(
        gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
        shift.data_ptr<scalar_t>(), input_grad ? gx.data_ptr<scalar_t>() : nullptr, gw.data_ptr<scalar_t>(),
        gscale.data_ptr<scalar_t>(), gshift.data_ptr<scalar_t>(), N, Cin, C, H, W);
  });
  return {input_grad ? gx : at::zeros({0}, x.options()), gw, gscale, gshift};
}

}  // namespace cpu
}  // namespace torchsan
