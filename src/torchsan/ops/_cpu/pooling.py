"""BatchNorm, ReLU and a 2x2 stride-2 max-pool as one op, as at every SAN stage boundary
(C++: ``csrc/cpu/pooling.cpp``).

``affine_relu_maxpool2x2``: ``max_pool2d(relu(scale * x + shift), 2, 2)``, a BatchNorm given as its per-channel
affine map (eval mode); ``batchnorm_relu_maxpool2x2``: the same with a training-mode BatchNorm. Only the pooled
output is written; ties and NaN follow ``torch.nn.functional.max_pool2d``. For inference,
``conv1x1_affine_relu_maxpool2x2`` puts the 1x1 convolution before them too (SAN's stem).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ._register import custom_op, differentiable_backward, kernels
from .statistics import batchnorm_op


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
    """(N, Cin, H, W) -> (N, C, H // 2, W // 2): max_pool2d(relu(scale * conv1x1(x, weight) + shift), 2, 2). No
    backward: only for calls that need no gradient."""
    return kernels().conv1x1_affine_relu_maxpool2x2_forward(x, weight, scale, shift)


conv1x1_affine_relu_maxpool2x2_op = custom_op(
    "conv1x1_affine_relu_maxpool2x2", _conv1x1_affine_relu_maxpool2x2,
    lambda x, weight, scale, shift: x.new_empty((x.shape[0], weight.shape[0], x.shape[2] // 2, x.shape[3] // 2)))


def conv1x1_affine_relu_maxpool2x2(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """The inference kernel where nothing needs a gradient; else the reference composition."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, scale, shift)):
        return reference.conv1x1_affine_relu_maxpool2x2(x, weight, scale, shift)
    return conv1x1_affine_relu_maxpool2x2_op(x, weight, scale, shift)
