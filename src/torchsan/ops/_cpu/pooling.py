"""BatchNorm, ReLU and a 2x2 stride-2 max-pool as one op, as at every SAN stage boundary
(C++: ``csrc/cpu/pooling.cpp``).

``affine_relu_maxpool2x2``: ``max_pool2d(relu(scale * x + shift), 2, 2)``, a BatchNorm given as its per-channel
affine map (eval mode); ``batchnorm_relu_maxpool2x2``: the same with a training-mode BatchNorm. Only the pooled
output is written; ties and NaN follow ``torch.nn.functional.max_pool2d``. ``conv1x1_affine_relu_maxpool2x2``
puts a 1x1 convolution of the image before them too (SAN's stem), and ``conv1x1_batchnorm_relu_maxpool2x2`` is the
stem in training: its full-resolution output is written neither forward nor backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ._register import custom_op, differentiable_backward, kernels
from .statistics import batchnorm_op, channel_var_mean_op


def _pooled_like(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2))


def _affine_relu_maxpool2x2_backward(grad: Tensor, x: Tensor, scale: Tensor,
                                     shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(grad x, grad scale, grad shift) in one fused pass (grad mode off)."""
    gx, gscale, gshift = kernels().affine_relu_maxpool2x2_backward(grad, x, scale, shift)
    return gx, gscale, gshift


affine_relu_maxpool2x2_backward_op = custom_op(
    "affine_relu_maxpool2x2_backward", _affine_relu_maxpool2x2_backward,
    lambda grad, x, scale, shift: (torch.empty_like(x, memory_format=torch.contiguous_format),
                                   torch.empty_like(scale), torch.empty_like(shift)))


def _affine_relu_maxpool2x2(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, H // 2, W // 2): max_pool2d(relu(scale * x + shift), 2, 2)."""
    return kernels().affine_relu_maxpool2x2_forward(x, scale, shift)


def _affine_relu_maxpool2x2_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _affine_relu_maxpool2x2_grad(ctx, grad):
    x, scale, shift = ctx.saved_tensors
    if torch.is_grad_enabled():
        return tuple(differentiable_backward(reference.affine_relu_maxpool2x2, (x, scale, shift), (grad,)))
    return affine_relu_maxpool2x2_backward_op(grad, x, scale, shift)


affine_relu_maxpool2x2_op = custom_op(
    "affine_relu_maxpool2x2", _affine_relu_maxpool2x2, lambda x, scale, shift: _pooled_like(x),
    backward=_affine_relu_maxpool2x2_grad, setup=_affine_relu_maxpool2x2_setup)

batchnorm_relu_maxpool2x2_op = batchnorm_op(
    "batchnorm_relu_maxpool2x2", "",
    lambda x, scale, shift: kernels().affine_relu_maxpool2x2_forward(x, scale, shift),
    affine_relu_maxpool2x2_backward_op,
    reference.batchnorm_relu_maxpool2x2,
    lambda x, weight, bias, eps: (_pooled_like(x), x.new_empty(x.shape[1]), x.new_empty(x.shape[1])))


# --- backend interface ----------------------------------------------------------------------------------------------
def affine_relu_maxpool2x2(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return affine_relu_maxpool2x2_op(x, scale, shift)


def batchnorm_relu_maxpool2x2(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                              eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return batchnorm_relu_maxpool2x2_op(x, weight, bias, eps)


def _conv1x1_affine_relu_maxpool2x2(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """(N, Cin, H, W) -> (N, C, H // 2, W // 2): max_pool2d(relu(scale * conv1x1(x, weight) + shift), 2, 2)."""
    return kernels().conv1x1_affine_relu_maxpool2x2_forward(x, weight, scale, shift)


def _conv1x1_affine_relu_maxpool2x2_backward(grad: Tensor, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor,
                                             input_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad x (empty unless input_grad), grad weight, grad scale, grad shift) in one pass (grad mode off)."""
    gx, gw, gscale, gshift = kernels().conv1x1_affine_relu_maxpool2x2_backward(grad, x, weight, scale, shift,
                                                                               input_grad)
    return gx, gw, gscale, gshift


conv1x1_affine_relu_maxpool2x2_backward_op = custom_op(
    "conv1x1_affine_relu_maxpool2x2_backward", _conv1x1_affine_relu_maxpool2x2_backward,
    lambda grad, x, weight, scale, shift, input_grad: (
        torch.empty_like(x, memory_format=torch.contiguous_format) if input_grad else x.new_zeros(0),
        torch.empty_like(weight), torch.empty_like(scale), torch.empty_like(shift)))


def _conv1x1_affine_relu_maxpool2x2_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv1x1_affine_relu_maxpool2x2_grad(ctx, grad):
    x, weight, scale, shift = ctx.saved_tensors
    if torch.is_grad_enabled():
        return tuple(differentiable_backward(reference.conv1x1_affine_relu_maxpool2x2, (x, weight, scale, shift),
                                             (grad,)))
    input_grad = ctx.needs_input_grad[0]
    gx, gw, gscale, gshift = conv1x1_affine_relu_maxpool2x2_backward_op(grad, x, weight, scale, shift, input_grad)
    return gx if input_grad else None, gw, gscale, gshift


conv1x1_affine_relu_maxpool2x2_op = custom_op(
    "conv1x1_affine_relu_maxpool2x2", _conv1x1_affine_relu_maxpool2x2,
    lambda x, weight, scale, shift: x.new_empty((x.shape[0], weight.shape[0], x.shape[2] // 2, x.shape[3] // 2)),
    backward=_conv1x1_affine_relu_maxpool2x2_grad, setup=_conv1x1_affine_relu_maxpool2x2_setup)


def conv1x1_affine_relu_maxpool2x2(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return conv1x1_affine_relu_maxpool2x2_op(x, weight, scale, shift)


def conv1x1_batch_var_mean(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The batch statistics (biased var (C,), mean (C,)) of the 1x1 convolution y = weight x, x (N, Cin, H, W),
    from x's own: mean W x_mean and variance diag(W cov(x) W^T). For an image (Cin = 3) that reads x, never the
    C-channel y; differentiable w.r.t. x and weight.

    cov(x) is taken in float64 by the fixed-order statistics kernel, each covariance from a variance of a sum
    (var(a + b) = var(a) + var(b) + 2 cov(a, b)): an image's channels are strongly correlated, so W cov W^T loses
    digits to cancellation, and the result is the same for any number of threads."""
    cin = x.shape[1]
    if cin == 0:  # the convolution is 0 (a sum over no weights: zeros that still belong to weight's graph)
        return weight.sum(dim=1), weight.sum(dim=1)
    wide = x.double()
    pairs = [(a, b) for a in range(cin) for b in range(a + 1, cin)]
    sums = [wide[:, a:a + 1] + wide[:, b:b + 1] for a, b in pairs]
    var, mean = channel_var_mean_op(torch.cat([wide, *sums], 1) if sums else wide)
    cov = {(a, a): var[a] for a in range(cin)}
    for i, (a, b) in enumerate(pairs):
        cov[a, b] = cov[b, a] = (var[cin + i] - var[a] - var[b]) / 2
    cov_matrix = torch.stack([torch.stack([cov[a, b] for b in range(cin)]) for a in range(cin)])
    w = weight.double()
    y_var = ((w @ cov_matrix) * w).sum(dim=1).clamp_min(0)
    return y_var.to(x.dtype), (w @ mean[:cin]).to(x.dtype)


def conv1x1_batchnorm_relu_maxpool2x2(x: Tensor, conv_weight: Tensor, weight: Tensor | None, bias: Tensor | None,
                                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """SAN's stem in training: the conv's batch statistics from x's (:func:`conv1x1_batch_var_mean`), then the
    fused op with the BN as their affine map; autograd carries the gradients through the statistics."""
    var, mean = conv1x1_batch_var_mean(x, conv_weight)
    scale, shift = reference.batchnorm_scale_shift(weight, bias, mean, var, eps)
    return conv1x1_affine_relu_maxpool2x2_op(x, conv_weight, scale, shift), mean, var
