"""Per-channel batch statistics, and the gradients through them of every training-mode BatchNorm op
(C++: ``csrc/cpu/statistics.cpp``).

``channel_var_mean(x)`` is ``torch.var_mean(x, dim=[0, 2, ...], correction=0)``, exact and deterministic for any
thread count. The batchnorm ops (``batchnorm_relu_conv1x1``, ``batchnorm_relu_maxpool2x2``) compute
y, mean, var = f(x, scale, shift) with var, mean = var_mean(x), scale = weight * rsqrt(var + eps) and
shift = bias - mean * scale, as one autograd node: its backward runs f's fused backward, then adds the
statistics' share of grad x to that buffer in place, instead of a separate gradient that autograd would allocate
and add. :func:`batchnorm_op` builds such an op from f's kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import reference
from ..reference import batchnorm_scale_shift
from ._register import custom_op, differentiable_backward, kernels


# --- channel_var_mean -----------------------------------------------------------------------------------------------
def _channel_var_mean_backward(x: Tensor, mean: Tensor, grad_var: Tensor, grad_mean: Tensor) -> Tensor:
    """grad_mean / n + (2 grad_var / n) * (x - mean), per channel, n = values per channel; one pass over x."""
    return kernels().channel_var_mean_backward(x, mean, grad_var, grad_mean, None, False)


channel_var_mean_backward_op = custom_op(
    "channel_var_mean_backward", _channel_var_mean_backward,
    lambda x, *a: torch.empty_like(x, memory_format=torch.contiguous_format))


def _add_channel_var_mean_backward(x: Tensor, mean: Tensor, grad_var: Tensor, grad_mean: Tensor, base: Tensor) -> None:
    """base += grad_mean / n + (2 grad_var / n) * (x - mean), in place (base: contiguous, x's shape)."""
    kernels().channel_var_mean_backward(x, mean, grad_var, grad_mean, base, True)


add_channel_var_mean_backward_op = custom_op("add_channel_var_mean_backward", _add_channel_var_mean_backward,
                                             lambda *a: None, mutates=("base",))


def _channel_var_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C, ...) -> (var, mean), each (C,): biased, over every dimension but 1."""
    var, mean = kernels().channel_var_mean(x)
    return var, mean


def _channel_var_mean_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])


def _channel_var_mean_grad(ctx, grad_var, grad_mean):
    x, mean = ctx.saved_tensors
    if torch.is_grad_enabled():
        return differentiable_backward(reference.channel_var_mean, (x,), (grad_var, grad_mean))[0]
    grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
    return channel_var_mean_backward_op(x, mean, grad_var, grad_mean)


channel_var_mean_op = custom_op(
    "channel_var_mean", _channel_var_mean, lambda x: (x.new_empty(x.shape[1]), x.new_empty(x.shape[1])),
    backward=_channel_var_mean_grad, setup=_channel_var_mean_setup)


def channel_var_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    return channel_var_mean_op(x)


# --- gradients through a training BatchNorm's statistics ------------------------------------------------------------
def batchnorm_statistics_grads(weight: Tensor | None, mean: Tensor, var: Tensor, eps: float, grad_scale: Tensor,
                               grad_shift: Tensor, grad_mean_out: Tensor | None,
                               grad_var_out: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor]:
    """From f's gradients w.r.t. scale and shift (and the returned mean and var): grad weight, mean and var."""
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else weight * rstd
    grad_scale = grad_scale - grad_shift * mean  # shift = bias - mean * scale depends on scale too
    grad_mean = -grad_shift * scale
    grad_var = (grad_scale if weight is None else grad_scale * weight) * (-0.5 * rstd**3)
    if grad_mean_out is not None:
        grad_mean = grad_mean + grad_mean_out
    if grad_var_out is not None:
        grad_var = grad_var + grad_var_out
    return (None if weight is None else grad_scale * rstd), grad_mean, grad_var


def batchnorm_op(name: str, params: str, affine_forward: Callable[..., Tensor], affine_backward: Callable[..., tuple],
                 reference_fn: Callable[..., tuple], fake: Callable[..., tuple]):
    """A training-mode BatchNorm followed by f as one custom op ``(x, weight, bias, eps, *params) -> (y, mean, var)``.

    ``params``: the schema of f's own tensor arguments, e.g. ``"Tensor conv_weight, Tensor? conv_bias"``.
    ``affine_forward(x, scale, shift, *params)`` is f's kernel; ``affine_backward(grad, x, scale, shift, *params)``
    returns (grad x holding scale and shift fixed, grad scale, grad shift, *grad params), grad x a fresh buffer;
    ``reference_fn(x, weight, bias, eps, *params)`` is the whole op in plain PyTorch (for double backward).
    """

    def forward(x, weight, bias, eps, *params):
        var, mean = kernels().channel_var_mean(x)
        scale, shift = batchnorm_scale_shift(weight, bias, mean, var, eps)
        return affine_forward(x, scale, shift, *params), mean, var

    def setup(ctx, inputs, output):
        x, weight, bias, eps, *params = inputs
        ctx.save_for_backward(x, weight, bias, output[1], output[2], *params)
        ctx.eps = eps

    def backward(ctx, grad, grad_mean_out, grad_var_out):
        x, weight, bias, mean, var, *params = ctx.saved_tensors
        if torch.is_grad_enabled():
            grads = differentiable_backward(lambda x, w, b, *p: reference_fn(x, w, b, ctx.eps, *p),
                                            (x, weight, bias, *params), (grad, grad_mean_out, grad_var_out))
            return (*grads[:3], None, *grads[3:])
        scale, shift = batchnorm_scale_shift(weight, bias, mean, var, ctx.eps)
        gx, grad_scale, grad_shift, *grad_params = affine_backward(grad, x, scale, shift, *params)
        grad_weight, grad_mean, grad_var = batchnorm_statistics_grads(weight, mean, var, ctx.eps, grad_scale,
                                                                      grad_shift, grad_mean_out, grad_var_out)
        add_channel_var_mean_backward_op(x, mean, grad_var, grad_mean, gx)
        grad_params = [g if p is not None else None for g, p in zip(grad_params, params)]
        return gx, grad_weight, grad_shift if bias is not None else None, None, *grad_params

    args = "Tensor x, Tensor? weight, Tensor? bias, float eps" + (", " + params if params else "")
    schema = f"({args}) -> (Tensor, Tensor, Tensor)"
    return custom_op(name, forward, fake, backward=backward, setup=setup, schema=schema)
