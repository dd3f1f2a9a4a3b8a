"""The pairwise relation z = [subtraction2(x1, x2), append] and gamma's first training-mode BatchNorm-ReLU-conv1x1
as one op that never writes z; and, for inference, the whole of gamma as one op (``pairwise_logits``) that writes
only the logits, and the same for the patchwise concatenation relation (``patchwise_weights``) (C++:
``csrc/cpu/subtraction2_conv1x1.cpp``).

z (N, C + E, K, L) is K times the size of x1 and x2. Its batch statistics, the fused BN-ReLU-conv and their
backward gather z's values from x1, x2 and append as they go, and z is not kept for backward; the statistics'
share of grad z is added inside the scatter back onto x1 and x2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._checks import Footprint
from ..reference import batchnorm_scale_shift
from ._register import custom_op, differentiable_backward, kernels
from .policy import ATTENTION_MAX_ROW
from .softmax_aggregation import aggregation, softmax_aggregation
from .statistics import batchnorm_statistics_grads


def _subtraction2_affine_relu_conv1x1_backward(
        grad: Tensor, x1: Tensor, x2: Tensor, append: Tensor | None, scale: Tensor, shift: Tensor,
        conv_weight: Tensor, kernel_size: int, stride: int, padding: int, dilation: int,
        reflect: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The affine-ReLU-conv1x1 backward on the gathered z, holding scale and shift fixed:
    (grad z (N, C + E, K, L), grad scale, grad shift, grad conv_weight, grad conv_bias)."""
    return tuple(kernels().subtraction2_affine_relu_conv1x1_backward(
        grad, x1, x2, append, scale, shift, conv_weight, kernel_size, stride, padding, dilation, reflect))


subtraction2_affine_relu_conv1x1_backward_op = custom_op(
    "subtraction2_affine_relu_conv1x1_backward", _subtraction2_affine_relu_conv1x1_backward,
    lambda grad, x1, x2, append, scale, shift, conv_weight, *a: (
        grad.new_empty((grad.shape[0], scale.shape[0], *grad.shape[2:])), torch.empty_like(scale),
        torch.empty_like(shift), torch.empty_like(conv_weight), grad.new_empty(grad.shape[1])))


def _subtraction2_var_mean_backward(grad: Tensor, x1: Tensor, x2: Tensor, append: Tensor | None, grad_mean: Tensor,
                                    grad_var: Tensor, mean: Tensor, kernel_size: int, stride: int, padding: int,
                                    dilation: int, reflect: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of z = [subtraction2(x1, x2), append] from grad z plus the share of z's batch mean and
    variance: grad z + grad_mean / n + 2 grad_var / n * (z - mean), n = N K L, z recomputed.
    Returns (grad x1, grad x2, grad append (empty if append is None))."""
    inv = 1.0 / (grad.numel() // grad.shape[1])
    a, b = grad_mean * inv, grad_var * (2 * inv)
    g1, g2 = kernels().subtraction2_var_mean_backward(grad, x1, x2, a, b, mean, kernel_size, stride, padding,
                                                      dilation, reflect)
    if append is None:
        return g1, g2, grad.new_empty(0)
    c, view = x1.shape[1], (1, -1, 1, 1)
    g_append = grad[:, c:] + a[c:].view(view) + b[c:].view(view) * (append - mean[c:].view(view))
    if append.shape[0] == 1 and x1.shape[0] != 1:
        g_append = g_append.sum(0, keepdim=True)
    return g1, g2, g_append


subtraction2_var_mean_backward_op = custom_op(
    "subtraction2_var_mean_backward", _subtraction2_var_mean_backward,
    lambda grad, x1, x2, append, *a: (torch.empty_like(x1), torch.empty_like(x1),
                                      grad.new_empty(0) if append is None else torch.empty_like(append)))


def _subtraction2_batchnorm_relu_conv1x1(x1: Tensor, x2: Tensor, append: Tensor | None, weight: Tensor | None,
                                         bias: Tensor | None, eps: float, conv_weight: Tensor,
                                         conv_bias: Tensor | None, kernel_size: int, stride: int, padding: int,
                                         dilation: int, reflect: bool) -> tuple[Tensor, Tensor, Tensor]:
    """batchnorm_relu_conv1x1(subtraction2(x1, x2, append=append), ...) -> (y (N, Cout, K, L), mean, var (C + E))."""
    geometry = (kernel_size, stride, padding, dilation, reflect)
    var, mean = kernels().subtraction2_var_mean(x1, x2, append, *geometry)
    scale, shift = batchnorm_scale_shift(weight, bias, mean, var, eps)
    y = kernels().subtraction2_affine_relu_conv1x1_forward(x1, x2, append, scale, shift, conv_weight, conv_bias,
                                                           *geometry)
    return y, mean, var


def _fake(x1, x2, append, weight, bias, eps, conv_weight, conv_bias, kernel_size, stride, padding, dilation, reflect):
    fp = Footprint.from_kernel_args(kernel_size, stride, padding, dilation, reflect)
    ho, wo = fp.out_hw(x1.shape[2], x1.shape[3])
    c = x1.shape[1] + (0 if append is None else append.shape[1])
    y = x1.new_empty((x1.shape[0], conv_weight.shape[0], fp.area, ho * wo))
    return y, x1.new_empty(c), x1.new_empty(c)


def _setup(ctx, inputs, output):
    x1, x2, append, weight, bias, eps, conv_weight, conv_bias, *geometry = inputs
    _, mean, var = output
    ctx.save_for_backward(x1, x2, append, weight, bias, conv_weight, conv_bias, mean, var)
    ctx.eps, ctx.geometry = eps, tuple(geometry)


def _reference(x1, x2, append, weight, bias, conv_weight, conv_bias, eps, geometry):
    return reference.subtraction2_batchnorm_relu_conv1x1(x1, x2, append, weight, bias, eps, conv_weight, conv_bias,
                                                         Footprint.from_kernel_args(*geometry))


def _grad(ctx, grad, grad_mean_out, grad_var_out):
    x1, x2, append, weight, bias, conv_weight, conv_bias, mean, var = ctx.saved_tensors
    if torch.is_grad_enabled():
        g = differentiable_backward(lambda *t: _reference(*t, ctx.eps, ctx.geometry),
                                    (x1, x2, append, weight, bias, conv_weight, conv_bias),
                                    (grad, grad_mean_out, grad_var_out))
        return (*g[:5], None, *g[5:], None, None, None, None, None)
    scale, shift = batchnorm_scale_shift(weight, bias, mean, var, ctx.eps)
    gz, grad_scale, grad_shift, gcw, gcb = subtraction2_affine_relu_conv1x1_backward_op(
        grad, x1, x2, append, scale, shift, conv_weight, *ctx.geometry)
    grad_weight, grad_mean, grad_var = batchnorm_statistics_grads(weight, mean, var, ctx.eps, grad_scale, grad_shift,
                                                                  grad_mean_out, grad_var_out)
    g1, g2, g_append = subtraction2_var_mean_backward_op(gz, x1, x2, append, grad_mean, grad_var, mean, *ctx.geometry)
    return (g1, g2, None if append is None else g_append, grad_weight, grad_shift if bias is not None else None, None,
            gcw, gcb if conv_bias is not None else None, None, None, None, None, None)


subtraction2_batchnorm_relu_conv1x1_op = custom_op(
    "subtraction2_batchnorm_relu_conv1x1", _subtraction2_batchnorm_relu_conv1x1, _fake, backward=_grad, setup=_setup)


# --- backend interface ----------------------------------------------------------------------------------------------
def subtraction2_batchnorm_relu_conv1x1(x1: Tensor, x2: Tensor, append: Tensor | None, weight: Tensor | None,
                                        bias: Tensor | None, eps: float, conv_weight: Tensor,
                                        conv_bias: Tensor | None, fp: Footprint) -> tuple[Tensor, Tensor, Tensor]:
    return subtraction2_batchnorm_relu_conv1x1_op(x1, x2, append, weight, bias, eps, conv_weight, conv_bias,
                                                  *fp.kernel_args())


# --- inference: shared by the kernels below --------------------------------------------------------------------------
def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _affine_maps(norm1: tuple, norm2: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both BNs (running statistics) as their affine maps: scale1, shift1, scale2, shift2."""
    (w1, b1, eps1, mean1, var1), (w2, b2, eps2, mean2, var2) = norm1, norm2
    return (*batchnorm_scale_shift(w1, b1, mean1, var1, eps1), *batchnorm_scale_shift(w2, b2, mean2, var2, eps2))


# --- inference: the whole mapping gamma ------------------------------------------------------------------------------
def _pairwise_logits_inference(x1: Tensor, x2: Tensor, append: Tensor | None, scale1: Tensor, shift1: Tensor,
                               conv1_weight: Tensor, scale2: Tensor, shift2: Tensor, conv2_weight: Tensor,
                               conv2_bias: Tensor | None, kernel_size: int, stride: int, padding: int, dilation: int,
                               reflect: bool) -> Tensor:
    """conv2(relu(scale2 * conv1(relu(scale1 * z + shift1)) + shift2)) of the gathered z: (N, Cw, K, L). Neither z
    nor the hidden layer is written. No backward: only for calls that need no gradient."""
    return kernels().subtraction2_affine_relu_conv1x1_twice_forward(
        x1, x2, append, scale1, shift1, conv1_weight, scale2, shift2, conv2_weight, conv2_bias, kernel_size, stride,
        padding, dilation, reflect)


def _pairwise_logits_inference_fake(x1, x2, append, scale1, shift1, conv1_weight, scale2, shift2, conv2_weight,
                                    conv2_bias, kernel_size, stride, padding, dilation, reflect):
    fp = Footprint.from_kernel_args(kernel_size, stride, padding, dilation, reflect)
    ho, wo = fp.out_hw(x1.shape[2], x1.shape[3])
    return x1.new_empty((x1.shape[0], conv2_weight.shape[0], fp.area, ho * wo))


pairwise_logits_inference_op = custom_op("pairwise_logits_inference", _pairwise_logits_inference,
                                         _pairwise_logits_inference_fake)


def pairwise_logits(x1: Tensor, x2: Tensor, append: Tensor | None, norm1: tuple, conv1_weight: Tensor, norm2: tuple,
                    conv2_weight: Tensor, conv2_bias: Tensor | None,
                    fp: Footprint) -> tuple[Tensor, None, None, None, None] | tuple:
    """``ops.pairwise_logits`` on this backend: one inference kernel where both BNs apply running statistics and
    nothing needs a gradient; else the reference composition (the layers fuse only gamma's first triple there)."""
    needs_grad = _needs_grad(x1, x2, append, *norm1[:2], conv1_weight, *norm2[:2], conv2_weight, conv2_bias)
    if needs_grad or norm1[3] is None or norm2[3] is None:
        return reference.pairwise_logits(x1, x2, append, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp)
    scale1, shift1, scale2, shift2 = _affine_maps(norm1, norm2)
    logits = pairwise_logits_inference_op(x1, x2, append, scale1, shift1, conv1_weight, scale2, shift2, conv2_weight,
                                          conv2_bias, *fp.kernel_args())
    return logits, None, None, None, None


# --- inference: the pairwise layer after its transforms ----------------------------------------------------------
def _pairwise_attention_inference(x1: Tensor, x2: Tensor, append: Tensor | None, values: Tensor, scale1: Tensor,
                                  shift1: Tensor, conv1_weight: Tensor, scale2: Tensor, shift2: Tensor,
                                  conv2_weight: Tensor, conv2_bias: Tensor | None, kernel_size: int, stride: int,
                                  padding: int, dilation: int, reflect: bool) -> Tensor:
    """aggregation(values, softmax_K(logits)) with the logits of ``pairwise_logits_inference``, stride 1: (N, Cv,
    Ho, Wo). Per block of output rows, the logits live in a per-thread buffer only. No backward."""
    return kernels().pairwise_attention_inference(
        x1, x2, append, values, scale1, shift1, conv1_weight, scale2, shift2, conv2_weight, conv2_bias, kernel_size,
        stride, padding, dilation, reflect)


def _pairwise_attention_inference_fake(x1, x2, append, values, scale1, shift1, conv1_weight, scale2, shift2,
                                       conv2_weight, conv2_bias, kernel_size, stride, padding, dilation, reflect):
    fp = Footprint.from_kernel_args(kernel_size, stride, padding, dilation, reflect)
    return values.new_empty((values.shape[0], values.shape[1], *fp.out_hw(x1.shape[2], x1.shape[3])))


pairwise_attention_inference_op = custom_op("pairwise_attention_inference", _pairwise_attention_inference,
                                            _pairwise_attention_inference_fake)


def pairwise_attention(x1: Tensor, x2: Tensor, values: Tensor, append: Tensor | None, norm1: tuple,
                       conv1_weight: Tensor, norm2: tuple, conv2_weight: Tensor, conv2_bias: Tensor | None,
                       fp: Footprint) -> Tensor:
    """``ops.pairwise_attention`` on this backend: the inference kernel where nothing needs a gradient and the
    footprint has stride 1 with output rows of at most ``ATTENTION_MAX_ROW`` positions; else the composition of this
    backend's ``pairwise_logits`` and ``softmax_aggregation``."""
    needs_grad = _needs_grad(x1, x2, values, append, *norm1[:2], conv1_weight, *norm2[:2], conv2_weight, conv2_bias)
    h_out, w_out = fp.out_hw(x1.shape[2], x1.shape[3])
    if needs_grad or fp.stride != 1 or w_out > ATTENTION_MAX_ROW:
        logits = pairwise_logits(x1, x2, append, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp)[0]
        return softmax_aggregation(values, logits, fp, h_out, w_out)
    scale1, shift1, scale2, shift2 = _affine_maps(norm1, norm2)
    return pairwise_attention_inference_op(x1, x2, append, values, scale1, shift1, conv1_weight, scale2, shift2,
                                           conv2_weight, conv2_bias, *fp.kernel_args())


# --- inference: the patchwise concatenation relation's whole mapping ------------------------------------------------
def _patchwise_weights_inference(x1: Tensor, x2: Tensor, scale1: Tensor, shift1: Tensor, conv1_weight: Tensor,
                                 scale2: Tensor, shift2: Tensor, conv2_weight: Tensor, conv2_bias: Tensor | None,
                                 kernel_size: int, stride: int, padding: int, dilation: int, reflect: bool) -> Tensor:
    """gamma of the gathered z = [centre(x1), unfold(x2)]: (N, Cout, 1, L); neither z nor the hidden layer is
    written. No backward: only for calls that need no gradient."""
    return kernels().patchwise_concat_affine_relu_conv1x1_twice_forward(
        x1, x2, scale1, shift1, conv1_weight, scale2, shift2, conv2_weight, conv2_bias, kernel_size, stride, padding,
        dilation, reflect)


def _patchwise_weights_inference_fake(x1, x2, scale1, shift1, conv1_weight, scale2, shift2, conv2_weight, conv2_bias,
                                      kernel_size, stride, padding, dilation, reflect):
    fp = Footprint.from_kernel_args(kernel_size, stride, padding, dilation, reflect)
    ho, wo = fp.out_hw(x1.shape[2], x1.shape[3])
    return x1.new_empty((x1.shape[0], conv2_weight.shape[0], 1, ho * wo))


patchwise_weights_inference_op = custom_op("patchwise_weights_inference", _patchwise_weights_inference,
                                           _patchwise_weights_inference_fake)


def patchwise_weights(x1: Tensor, x2: Tensor, norm1: tuple, conv1_weight: Tensor, norm2: tuple, conv2_weight: Tensor,
                      conv2_bias: Tensor | None, fp: Footprint) -> tuple:
    """``ops.patchwise_weights`` on this backend: one inference kernel where both BNs apply running statistics and
    nothing needs a gradient; else the reference composition."""
    needs_grad = _needs_grad(x1, x2, *norm1[:2], conv1_weight, *norm2[:2], conv2_weight, conv2_bias)
    if needs_grad or norm1[3] is None or norm2[3] is None:
        return reference.patchwise_weights(x1, x2, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp)
    scale1, shift1, scale2, shift2 = _affine_maps(norm1, norm2)
    weights = patchwise_weights_inference_op(x1, x2, scale1, shift1, conv1_weight, scale2, shift2, conv2_weight,
                                             conv2_bias, *fp.kernel_args())
    return weights, None, None, None, None


# --- inference: the patchwise layer (concatenation relation) after its transforms -----------------------------------
def _patchwise_attention_inference(x1: Tensor, x2: Tensor, values: Tensor, scale1: Tensor, shift1: Tensor,
                                   conv1_weight: Tensor, scale2: Tensor, shift2: Tensor, conv2_weight: Tensor,
                                   conv2_bias: Tensor | None, kernel_size: int, stride: int, padding: int,
                                   dilation: int, reflect: bool) -> Tensor:
    """aggregation(values, w) with the weights w of ``patchwise_weights_inference`` as (N, Cout / K, K, L), stride 1:
    (N, Cv, Ho, Wo). Per block of output rows, the weights live in a per-thread buffer only. No backward."""
    return kernels().patchwise_attention_inference(
        x1, x2, values, scale1, shift1, conv1_weight, scale2, shift2, conv2_weight, conv2_bias, kernel_size, stride,
        padding, dilation, reflect)


def _patchwise_attention_inference_fake(x1, x2, values, scale1, shift1, conv1_weight, scale2, shift2, conv2_weight,
                                        conv2_bias, kernel_size, stride, padding, dilation, reflect):
    fp = Footprint.from_kernel_args(kernel_size, stride, padding, dilation, reflect)
    return values.new_empty((values.shape[0], values.shape[1], *fp.out_hw(x1.shape[2], x1.shape[3])))


patchwise_attention_inference_op = custom_op("patchwise_attention_inference", _patchwise_attention_inference,
                                             _patchwise_attention_inference_fake)


def patchwise_attention(x1: Tensor, x2: Tensor, values: Tensor, norm1: tuple, conv1_weight: Tensor, norm2: tuple,
                        conv2_weight: Tensor, conv2_bias: Tensor | None, fp: Footprint) -> Tensor:
    """``ops.patchwise_attention`` on this backend: the inference kernel where nothing needs a gradient and the
    footprint has stride 1 with output rows of at most ``ATTENTION_MAX_ROW`` positions; else the composition of this
    backend's ``patchwise_weights`` and ``aggregation``."""
    needs_grad = _needs_grad(x1, x2, values, *norm1[:2], conv1_weight, *norm2[:2], conv2_weight, conv2_bias)
    h_out, w_out = fp.out_hw(x1.shape[2], x1.shape[3])
    if needs_grad or fp.stride != 1 or w_out > ATTENTION_MAX_ROW:
        w = patchwise_weights(x1, x2, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp)[0]
        return aggregation(values, w.view(w.shape[0], w.shape[1] // fp.area, fp.area, w.shape[3]), fp, h_out, w_out)
    scale1, shift1, scale2, shift2 = _affine_maps(norm1, norm2)
    return patchwise_attention_inference_op(x1, x2, values, scale1, shift1, conv1_weight, scale2, shift2,
                                            conv2_weight, conv2_bias, *fp.kernel_args())
