"""BatchNorm, ReLU and a 1x1 convolution as one op (C++: ``csrc/cpu/conv1x1.cpp``).

``affine_relu_conv1x1``: ``weight @ relu(scale * x + shift) + bias`` at every position, a BatchNorm given as its
per-channel affine map (eval mode), plus a residual where one is given (added in the product's epilogue where no
gradient is wanted); ``batchnorm_relu_conv1x1``: the same with a training-mode BatchNorm (batch
statistics, gradients through them). The building block of the mapping gamma, and of the block's BN-ReLU-conv pairs:
the BN and ReLU outputs are never written. ``conv1x1``: a plain 1x1 convolution ``weight @ x + bias`` through the same
register-blocked product, for inference (with a gradient wanted, the reference's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ._register import custom_op, differentiable_backward, kernels
from .statistics import batchnorm_op


def _output_like(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:]))


def _conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(N, Cin, ...) -> (N, Cout, ...): weight @ x + bias, per position. No backward: only for calls that need no
    gradient."""
    return kernels().conv1x1_forward(x, weight, bias)


conv1x1_inference_op = custom_op("conv1x1_inference", _conv1x1, lambda x, weight, bias: _output_like(x, weight))


def _affine_relu_conv1x1_backward(grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor,
                                  weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad x, grad scale, grad shift, grad weight, grad bias) in one fused pass (grad mode off)."""
    gx, gscale, gshift, gw, gbias = kernels().affine_relu_conv1x1_backward(grad, x, scale, shift, weight)
    return gx, gscale, gshift, gw, gbias


affine_relu_conv1x1_backward_op = custom_op(
    "affine_relu_conv1x1_backward", _affine_relu_conv1x1_backward,
    lambda grad, x, scale, shift, weight: (torch.empty_like(x, memory_format=torch.contiguous_format),
                                           torch.empty_like(scale), torch.empty_like(shift),
                                           torch.empty_like(weight), weight.new_empty(weight.shape[0])))


def _affine_relu_conv1x1(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(N, Cin, ...) -> (N, Cout, ...): weight @ relu(scale * x + shift) + bias, per position."""
    return kernels().affine_relu_conv1x1_forward(x, scale, shift, weight, bias, None)


def _affine_relu_conv1x1_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _affine_relu_conv1x1_grad(ctx, grad):
    x, scale, shift, weight, bias = ctx.saved_tensors
    if torch.is_grad_enabled():
        return tuple(differentiable_backward(reference.affine_relu_conv1x1, (x, scale, shift, weight, bias), (grad,)))
    gx, gscale, gshift, gw, gbias = affine_relu_conv1x1_backward_op(grad, x, scale, shift, weight)
    return gx, gscale, gshift, gw, gbias if bias is not None else None


affine_relu_conv1x1_op = custom_op(
    "affine_relu_conv1x1", _affine_relu_conv1x1, lambda x, scale, shift, weight, bias: _output_like(x, weight),
    backward=_affine_relu_conv1x1_grad, setup=_affine_relu_conv1x1_setup)



def _affine_relu_conv1x1_add(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, bias: Tensor | None,
                             residual: Tensor) -> Tensor:
    """weight @ relu(scale * x + shift) + bias + residual, the residual added in the product's epilogue. No
    backward: only for calls that need no gradient."""
    return kernels().affine_relu_conv1x1_forward(x, scale, shift, weight, bias, residual)


affine_relu_conv1x1_add_op = custom_op(
    "affine_relu_conv1x1_add", _affine_relu_conv1x1_add,
    lambda x, scale, shift, weight, bias, residual: _output_like(x, weight))

batchnorm_relu_conv1x1_op = batchnorm_op(
    "batchnorm_relu_conv1x1", "Tensor conv_weight, Tensor? conv_bias",
    lambda x, scale, shift, w, b: kernels().affine_relu_conv1x1_forward(x, scale, shift, w, b, None),
    lambda grad, x, scale, shift, w, b: affine_relu_conv1x1_backward_op(grad, x, scale, shift, w),
    reference.batchnorm_relu_conv1x1,
    lambda x, weight, bias, eps, w, b: (_output_like(x, w), x.new_empty(x.shape[1]), x.new_empty(x.shape[1])))


# --- backend interface ----------------------------------------------------------------------------------------------
def conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return reference.conv1x1(x, weight, bias)
    return conv1x1_inference_op(x.contiguous(), weight, bias)


def affine_relu_conv1x1(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, bias: Tensor | None,
                        residual: Tensor | None = None) -> Tensor:
    x = x.contiguous()  # the kernels read NCHW rows: a strided view is copied once here, not in each kernel
    if residual is None:
        return affine_relu_conv1x1_op(x, scale, shift, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, scale, shift, weight, bias, residual)):
        return affine_relu_conv1x1_op(x, scale, shift, weight, bias) + residual
    return affine_relu_conv1x1_add_op(x, scale, shift, weight, bias, residual)


def batchnorm_relu_conv1x1(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, conv_weight: Tensor,
                           conv_bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    x = x.contiguous()  # as above
    return batchnorm_relu_conv1x1_op(x, weight, bias, eps, conv_weight, conv_bias)
