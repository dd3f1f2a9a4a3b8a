"""The aggregation and the softmax over the footprint taps (C++: ``csrc/cpu/softmax_aggregation.cpp``).

* ``aggregation``: y[n, c, o] = sum_k w[n, c % Cw, k, o] * x[n, c, nbr_k(o)], never unfolding x.
* ``softmax_aggregation``: the same with w = softmax(logits, dim=2), the pairwise attention's normalisation: each
  (n, weight channel) task normalises its (K, L) plane and aggregates with it while it is in cache, and the
  backward turns the plane's weight gradient into the logits' gradient in place. It returns the softmax too, except
  where no gradient is wanted (``softmax_aggregation_inference``: the softmax stays in a per-thread plane).
* ``tap_softmax``: that softmax alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._checks import Footprint
from ._register import custom_op, differentiable_backward, kernels


def _footprint(args: tuple) -> Footprint:
    return Footprint.from_kernel_args(*args)


def _output_like(x: Tensor, kernel_size: int, stride: int, padding: int, dilation: int, reflect: bool) -> Tensor:
    ho, wo = Footprint.from_kernel_args(kernel_size, stride, padding, dilation, reflect).out_hw(x.shape[2], x.shape[3])
    return x.new_empty((x.shape[0], x.shape[1], ho, wo))


def _contiguous_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# --- backward kernels (called with grad mode off; see differentiable_backward) --------------------------------------
def _aggregation_backward(grad: Tensor, x: Tensor, weight: Tensor, kernel_size: int, stride: int, padding: int,
                          dilation: int, reflect: bool, softmax: bool) -> tuple[Tensor, Tensor]:
    """(grad x, grad weight); with ``softmax``, weight is softmax(logits) and the second is grad logits."""
    gx, gw = kernels().aggregation_backward(grad, x, weight, kernel_size, stride, padding, dilation, reflect,
                                            True, True, softmax)
    return gx, gw


aggregation_backward_op = custom_op("aggregation_backward", _aggregation_backward,
                                    lambda grad, x, weight, *a: (_contiguous_like(x), _contiguous_like(weight)))


def _tap_softmax_backward(grad: Tensor, out: Tensor) -> Tensor:
    """out * (grad - sum_k out * grad): the softmax's gradient w.r.t. its input, from its output."""
    return kernels().tap_softmax_backward(grad, out)


tap_softmax_backward_op = custom_op("tap_softmax_backward", _tap_softmax_backward,
                                    lambda grad, out: _contiguous_like(out))


# --- aggregation ----------------------------------------------------------------------------------------------------
def _aggregation(x: Tensor, weight: Tensor, kernel_size: int, stride: int, padding: int, dilation: int,
                 reflect: bool) -> Tensor:
    """(N, C, H, W), (N, Cw, K, L) -> (N, C, H_out, W_out)."""
    return kernels().aggregation_forward(x, weight, kernel_size, stride, padding, dilation, reflect, False)[0]


def _aggregation_setup(ctx, inputs, output):
    x, weight, *args = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = tuple(args)


def _aggregation_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    if torch.is_grad_enabled():
        fp = _footprint(ctx.args)
        gx, gw = differentiable_backward(
            lambda x, w: reference.aggregation(x, w, fp, *fp.out_hw(x.shape[2], x.shape[3])), (x, weight), (grad,))
    else:
        gx, gw = aggregation_backward_op(grad, x, weight, *ctx.args, False)
    return gx, gw, None, None, None, None, None


aggregation_op = custom_op("aggregation", _aggregation, lambda x, weight, *a: _output_like(x, *a),
                           backward=_aggregation_grad, setup=_aggregation_setup)


# --- softmax over the taps, then the aggregation --------------------------------------------------------------------
def _softmax_aggregation(x: Tensor, logits: Tensor, kernel_size: int, stride: int, padding: int, dilation: int,
                         reflect: bool) -> tuple[Tensor, Tensor]:
    """(N, C, H, W), (N, Cw, K, L) -> (aggregation(x, softmax(logits, 2)), softmax(logits, 2))."""
    y, w = kernels().aggregation_forward(x, logits, kernel_size, stride, padding, dilation, reflect, True)
    return y, w


def _softmax_aggregation_setup(ctx, inputs, output):
    x, _, *args = inputs
    # The softmax is saved as an output of this node, so that a double backward reaches the logits through it.
    ctx.save_for_backward(x, output[1])
    ctx.args = tuple(args)
    ctx.set_materialize_grads(False)  # the returned softmax is usually unused: no zero gradient to allocate and add


def _softmax_aggregation_grad(ctx, grad, grad_softmax):
    x, w = ctx.saved_tensors
    fp = _footprint(ctx.args)
    if grad is None:
        grad = x.new_zeros((x.shape[0], x.shape[1], *fp.out_hw(x.shape[2], x.shape[3])))
    if torch.is_grad_enabled():
        gx, gw = differentiable_backward(
            lambda x, w: reference.aggregation(x, w, fp, *fp.out_hw(x.shape[2], x.shape[3])), (x, w), (grad,))
        gl = None if gw is None else reference.tap_softmax_backward(gw, w)
        extra = None if grad_softmax is None else reference.tap_softmax_backward(grad_softmax, w)
    else:
        gx, gl = aggregation_backward_op(grad, x, w, *ctx.args, True)
        extra = None if grad_softmax is None else tap_softmax_backward_op(grad_softmax, w)
    if extra is not None:  # the returned softmax was used too
        gl = extra if gl is None else gl + extra
    return gx, gl, None, None, None, None, None


softmax_aggregation_op = custom_op(
    "softmax_aggregation", _softmax_aggregation,
    lambda x, logits, *a: (_output_like(x, *a), _contiguous_like(logits)),
    backward=_softmax_aggregation_grad, setup=_softmax_aggregation_setup)


def _softmax_aggregation_inference(x: Tensor, logits: Tensor, kernel_size: int, stride: int, padding: int,
                                   dilation: int, reflect: bool) -> Tensor:
    """``softmax_aggregation``'s first output alone, for no gradient: the softmax is never written out."""
    return kernels().softmax_aggregation_inference(x, logits, kernel_size, stride, padding, dilation, reflect)


softmax_aggregation_inference_op = custom_op("softmax_aggregation_inference", _softmax_aggregation_inference,
                                             lambda x, logits, *a: _output_like(x, *a))


# --- softmax over the taps ------------------------------------------------------------------------------------------
def _tap_softmax(x: Tensor) -> Tensor:
    """(N, C, K, L) -> softmax over dim 2."""
    return kernels().tap_softmax_forward(x)


def _tap_softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _tap_softmax_grad(ctx, grad):
    (out,) = ctx.saved_tensors
    if torch.is_grad_enabled():
        return reference.tap_softmax_backward(grad, out)
    return tap_softmax_backward_op(grad, out)


tap_softmax_op = custom_op("tap_softmax", _tap_softmax, _contiguous_like, backward=_tap_softmax_grad,
                           setup=_tap_softmax_setup)


# --- backend interface ----------------------------------------------------------------------------------------------
def aggregation(x: Tensor, weight: Tensor, fp: Footprint, h_out: int, w_out: int) -> Tensor:
    return aggregation_op(x, weight, *fp.kernel_args())


def softmax_aggregation(x: Tensor, logits: Tensor, fp: Footprint, h_out: int, w_out: int) -> Tensor:
    if not (torch.is_grad_enabled() and (x.requires_grad or logits.requires_grad)):
        return softmax_aggregation_inference_op(x, logits, *fp.kernel_args())
    return softmax_aggregation_op(x, logits, *fp.kernel_args())[0]


def tap_softmax(x: Tensor) -> Tensor:
    return tap_softmax_op(x)
