// The affine-ReLU-1x1-conv, and the plain 1x1 conv, on dense input (N, Cin, *): see conv1x1.h for the kernels.
#include "conv1x1.h"

#include "ops.h"

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {

// Positions per image and channel: the product of x's spatial sizes (not numel / (N * Cin), which is 0 when N or Cin
// is: with Cin = 0 the output, bias only, still has them).
static int64_t positions(const at::Tensor& x) {
  int64_t p = 1;
  for (int64_t d = 2; d < x.dim(); ++d) p *= x.size(d);
  return p;
}

// x's rows as they are, staged for the product: a plain 1x1 convolution through the affine-ReLU kernels (a, b unused).
template <typename T>
struct PlainRows : DenseRows<T> {
  void stage_affine_relu(int64_t n, int64_t ci, int64_t q0, int64_t m, T, T, T* staged, T*, int64_t fill_to) const {
    std::memcpy(staged, this->row(n, ci, q0, m, nullptr), sizeof(T) * m);
    std::fill(staged + m, staged + std::max(m, fill_to), T(0));
  }
};

at::Tensor conv1x1_forward(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "x must be a CPU tensor (N, Cin, ...)");
  x = x.contiguous();
  weight = weight.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t N = x.size(0), Cin = x.size(1), Cout = weight.size(0), P = positions(x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == Cin && (!b.defined() || b.numel() == Cout),
              "conv1x1: shape mismatch");
  auto sizes = x.sizes().vec();
  sizes[1] = Cout;
  auto y = pooled_empty(sizes, x.options(), !x.requires_grad());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1x1_forward", [&] {
    using Rows = PlainRows<scalar_t>;
    static_assert(StagesRows<Rows>::value, "the kernel must stage the rows through PlainRows, which skips the map");
    const std::vector<scalar_t> unused(Cin, scalar_t(0));  // the affine map the kernel reads and Rows ignores
    auto kernel = affine_relu_conv1x1_forward_for<scalar_t, Rows>(Cout);
    kernel(Rows{{x.data_ptr<scalar_t>(), Cin, P}}, unused.data(), unused.data(), weight.data_ptr<scalar_t>(),
           b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), N, Cin, Cout, P, nullptr);
  });
  return y;
}

at::Tensor affine_relu_conv1x1_forward(at::Tensor x, at::Tensor scale, at::Tensor shift, at::Tensor weight,
                                       c10::optional<at::Tensor> bias, c10::optional<at::Tensor> residual) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "x must be a CPU tensor (N, Cin, ...)");
  x = x.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  weight = weight.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t N = x.size(0), Cin = x.size(1), Cout = weight.size(0), P = positions(x);
  TORCH_CHECK(weight.size(1) == Cin && scale.numel() == Cin && shift.numel() == Cin,
              "affine_relu_conv1x1: shape mismatch");
  auto sizes = x.sizes().vec();
  sizes[1] = Cout;
  auto y = pooled_empty(sizes, x.options(), !x.requires_grad());
  at::Tensor r = residual.has_value() ? residual->contiguous() : at::Tensor();
  TORCH_CHECK(!r.defined() || (r.sizes() == y.sizes() && r.scalar_type() == y.scalar_type() && r.device().is_cpu()),
              "affine_relu_conv1x1: the residual must be a CPU tensor of the output's shape and dtype");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "affine_relu_conv1x1_forward", [&] {
    using Rows = DenseRows<scalar_t>;
    auto kernel = affine_relu_conv1x1_forward_for<scalar_t, Rows>(Cout);
    kernel(Rows{x.data_ptr<scalar_t>(), Cin, P}, scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(),
           weight.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), N, Cin,
           Cout, P, r.defined() ? r.data_ptr<scalar_t>() : nullptr);
  });
  return y;
}

std::vector<at::Tensor> affine_relu_conv1x1_backward(at::Tensor gy, at::Tensor x, at::Tensor scale, at::Tensor shift,
                                                     at::Tensor weight) {
  gy = gy.contiguous();
  x = x.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  weight = weight.contiguous();
  const int64_t N = x.size(0), Cin = x.size(1), Cout = weight.size(0), P = positions(x);
  auto gx = at::empty_like(x);
  auto gscale = at::zeros_like(scale), gshift = at::zeros_like(shift), gw = at::zeros_like(weight);
  auto gbias = at::zeros({Cout}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "affine_relu_conv1x1_backward", [&] {
    using Rows = DenseRows<scalar_t>;
    auto kernel = affine_relu_conv1x1_backward_for<scalar_t, Rows>(Cin, Cout);
    kernel(gy.data_ptr<scalar_t>(), Rows{x.data_ptr<scalar_t>(), Cin, P}, scale.data_ptr<scalar_t>(),
           shift.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
           gscale.data_ptr<scalar_t>(), gshift.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(),
           gbias.data_ptr<scalar_t>(), N, Cin, Cout, P);
  });
  return {gx, gscale, gshift, gw, gbias};
}

}  // namespace cpu
}  // namespace torchsan
