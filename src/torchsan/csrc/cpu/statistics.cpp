// Per-channel var_mean of dense input (N, C, ...) and its backward.
#include "statistics.h"

#include "ops.h"

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {
namespace {

// gx = base + grad_mean / n + (2 grad_var / n) * (x - mean), per channel of x (N, C, P), n = N * P: var_mean's
// backward, added to the gradient that reaches x by another path (base, may be null) in the same pass.
template <typename T>
void channel_var_mean_backward_kernel(const T* x, const T* mean, const T* gvar, const T* gmean, const T* base, T* gx,
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

}  // namespace

std::vector<at::Tensor> channel_var_mean(at::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "x must be a CPU tensor (N, C, ...)");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), P = x.numel() / std::max<int64_t>(1, N * C);
  TORCH_CHECK(N * P > 0, "channel_var_mean: no values per channel");
  auto var = at::empty({C}, x.options()), mean = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_var_mean", [&] {
    channel_var_mean_kernel<scalar_t>(DenseRows<scalar_t>{x.data_ptr<scalar_t>(), C, P}, var.data_ptr<scalar_t>(),
                                      mean.data_ptr<scalar_t>(), N, C, P);
  });
  return {var, mean};
}

at::Tensor channel_var_mean_backward(at::Tensor x, at::Tensor mean, at::Tensor gvar, at::Tensor gmean,
                                     c10::optional<at::Tensor> base, bool in_place) {
  x = x.contiguous();
  at::Tensor b = base.has_value() ? base->contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.sizes() == x.sizes() && b.scalar_type() == x.scalar_type()),
              "channel_var_mean_backward: base must match x");
  mean = mean.contiguous();
  gvar = gvar.contiguous();
  gmean = gmean.contiguous();
  const int64_t N = x.size(0), C = x.size(1), P = x.numel() / std::max<int64_t>(1, N * C);
  TORCH_CHECK(mean.numel() == C && gvar.numel() == C && gmean.numel() == C,
              "channel_var_mean_backward: shape mismatch");
  // in_place: the result overwrites base (a gradient buffer of the caller's), two streams instead of three.
  auto gx = in_place ? b : at::empty_like(x);
  TORCH_CHECK(!in_place || (b.defined() && base->is_contiguous()),
              "channel_var_mean_backward: in place needs a contiguous base");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_var_mean_backward", [&] {
    channel_var_mean_backward_kernel<scalar_t>(
        x.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), gvar.data_ptr<scalar_t>(), gmean.data_ptr<scalar_t>(),
        b.defined() ? b.data_ptr<scalar_t>() : nullptr, gx.data_ptr<scalar_t>(), N, C, P);
  });
  return gx;
}

}  // namespace cpu
}  // namespace torchsan
