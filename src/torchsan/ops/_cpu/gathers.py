"""The gathers: subtraction2, subtraction and unfold (C++: ``csrc/cpu/gathers.cpp``).

``out[n, c, k, o] = x1[n, c, centre(o)] - x2[n, c, nbr_k(o)]`` (subtraction2; subtraction is x1 = x2) or
``x[n, c, nbr_k(o)]`` (unfold), (N, C, H, W) -> (N, C, K, L). subtraction2 may append extra channels after its
output in the same pass (the pairwise position encoding p_i - p_j): torch.cat would write the (N, C, K, L)
difference a second time. The backward passes are linear in the gradient and need only the input's shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._checks import Footprint
from ._register import custom_op, differentiable_backward, kernels


def _gathered_like(x: Tensor, kernel_size: int, stride: int, padding: int, dilation: int, reflect: bool,
                   extra: int = 0) -> Tensor:
    fp = Footprint.from_kernel_args(kernel_size, stride, padding, dilation, reflect)
    ho, wo = fp.out_hw(x.shape[2], x.shape[3])
    return x.new_empty((x.shape[0], x.shape[1] + extra, fp.area, ho * wo))


def _input_like(grad: Tensor, channels: int, height: int, width: int) -> Tensor:
    return grad.new_empty((grad.shape[0], channels, height, width))


# --- backward kernels (called with grad mode off; see differentiable_backward) --------------------------------------
def _subtraction2_backward(grad: Tensor, channels: int, height: int, width: int, kernel_size: int, stride: int,
                           padding: int, dilation: int, reflect: bool) -> tuple[Tensor, Tensor]:
    """(grad x1, grad x2) from the first ``channels`` channels of grad (N, C + E, K, L)."""
    g1, g2 = kernels().gather_backward(grad, height, width, kernel_size, stride, padding, dilation, reflect,
                                       True, True, True, channels)
    return g1, g2


subtraction2_backward_op = custom_op(
    "subtraction2_backward", _subtraction2_backward,
    lambda grad, c, h, w, *a: (_input_like(grad, c, h, w), _input_like(grad, c, h, w)))


def _unfold_backward(grad: Tensor, height: int, width: int, kernel_size: int, stride: int, padding: int,
                     dilation: int, reflect: bool) -> Tensor:
    return kernels().gather_backward(grad, height, width, kernel_size, stride, padding, dilation, reflect,
                                     False, False, True, grad.shape[1])[1]


unfold_backward_op = custom_op("unfold_backward", _unfold_backward,
                               lambda grad, h, w, *a: _input_like(grad, grad.shape[1], h, w))


def _differentiable_gather_backward(grad: Tensor, unfold: bool, shape: tuple[int, ...], args: tuple,
                                    needs: tuple[bool, ...], append_shape: tuple[int, ...] | None = None) -> list:
    """(grad x1, grad x2, grad append) under create_graph: the gathers are linear, so their gradient does not
    depend on the inputs' values, and the reference at zeros gives it."""
    fp = Footprint.from_kernel_args(*args)
    x1 = grad.new_zeros(shape).requires_grad_(needs[0] and not unfold)
    x2 = grad.new_zeros(shape).requires_grad_(needs[1])
    append = None if append_shape is None else grad.new_zeros(append_shape).requires_grad_(needs[2])

    def gather(x1, x2, append):
        if unfold:
            return reference.unfold(x2, fp)
        return reference.subtraction2(x1, x2, fp, *fp.out_hw(shape[2], shape[3]), append=append)

    return differentiable_backward(gather, (x1, x2, append), (grad,))


# --- subtraction2 (with append) and unfold as custom ops ------------------------------------------------------------
def _subtraction2(x1: Tensor, x2: Tensor, append: Tensor | None, kernel_size: int, stride: int, padding: int,
                  dilation: int, reflect: bool) -> Tensor:
    """(N, C, H, W) x 2, append (1 or N, E, K, L) or None -> (N, C + E, K, L)."""
    return kernels().gather_forward(x1, x2, kernel_size, stride, padding, dilation, reflect, append)


def _subtraction2_setup(ctx, inputs, output):
    x1, _, append, *args = inputs
    ctx.shape, ctx.args = tuple(x1.shape), tuple(args)
    ctx.append_shape = None if append is None else tuple(append.shape)


def _subtraction2_grad(ctx, grad):
    if torch.is_grad_enabled():
        g1, g2, g_append = _differentiable_gather_backward(grad, False, ctx.shape, ctx.args, ctx.needs_input_grad,
                                                           ctx.append_shape)
    else:
        channels = ctx.shape[1]
        g1, g2 = subtraction2_backward_op(grad, channels, *ctx.shape[2:], *ctx.args)
        g_append = None
        if ctx.append_shape is not None:
            g_append = grad[:, channels:]
            if ctx.append_shape[0] == 1 and ctx.shape[0] != 1:  # broadcast over the batch
                g_append = g_append.sum(0, keepdim=True)
    return g1, g2, g_append, None, None, None, None, None


subtraction2_op = custom_op(
    "subtraction2", _subtraction2,
    lambda x1, x2, append, *a: _gathered_like(x1, *a, extra=0 if append is None else append.shape[1]),
    backward=_subtraction2_grad, setup=_subtraction2_setup)


def _unfold(x: Tensor, kernel_size: int, stride: int, padding: int, dilation: int, reflect: bool) -> Tensor:
    """(N, C, H, W) -> (N, C, K, L): the neighbours."""
    return kernels().gather_forward(None, x, kernel_size, stride, padding, dilation, reflect, None)


def _unfold_setup(ctx, inputs, output):
    ctx.shape, ctx.args = tuple(inputs[0].shape), tuple(inputs[1:])


def _unfold_grad(ctx, grad):
    if torch.is_grad_enabled():
        gx = _differentiable_gather_backward(grad, True, ctx.shape, ctx.args, (False, True))[1]
    else:
        gx = unfold_backward_op(grad, *ctx.shape[2:], *ctx.args)
    return gx, None, None, None, None, None


unfold_op = custom_op("unfold", _unfold, _gathered_like, backward=_unfold_grad, setup=_unfold_setup)


# --- the eager fast path --------------------------------------------------------------------------------------------
# A call through a Python custom op with registered autograd costs several times the kernel work of the position
# grid's subtraction (benchmarks/call_overhead.py). In plain eager mode the gathers therefore call the kernels from a
# torch.autograd.Function; anything that traces or transforms (torch.compile, export, a dispatch mode, vmap, tensor
# subclasses) gets the custom ops. Both run the same kernels: the tests check they agree bit for bit.
def _eager(*tensors: Tensor) -> bool:
    """Whether a call on these tensors may skip the dispatcher (see above)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.utils._python_dispatch._get_current_dispatch_mode() is not None):
        return False
    return all(type(t) is Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


class _GatherFunction(torch.autograd.Function):
    """subtraction2 (x1 given; subtraction is x1 = x2) or unfold (x1 None) on the kernels; see _eager."""

    @staticmethod
    def forward(ctx, x1: Tensor | None, x2: Tensor, k: int, s: int, p: int, d: int, reflect: bool) -> Tensor:
        ctx.unfold, ctx.shape, ctx.args = x1 is None, tuple(x2.shape), (k, s, p, d, reflect)
        return kernels().gather_forward(x1, x2, k, s, p, d, reflect, None)

    @staticmethod
    def backward(ctx, grad: Tensor):
        need1, need2 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            g1, g2, _ = _differentiable_gather_backward(grad, ctx.unfold, ctx.shape, ctx.args, (need1, need2, False))
        else:
            g1, g2 = kernels().gather_backward(grad, *ctx.shape[2:], *ctx.args, not ctx.unfold, need1, need2,
                                               grad.shape[1])
        return (g1 if need1 else None), (g2 if need2 else None), None, None, None, None, None


# --- backend interface ----------------------------------------------------------------------------------------------
def subtraction2(x1: Tensor, x2: Tensor, fp: Footprint, h_out: int, w_out: int, append: Tensor | None = None) -> Tensor:
    if append is None and _eager(x1, x2):
        return _GatherFunction.apply(x1, x2, *fp.kernel_args())
    return subtraction2_op(x1, x2, append, *fp.kernel_args())


def subtraction(x: Tensor, fp: Footprint, h_out: int, w_out: int) -> Tensor:
    if _eager(x):
        return _GatherFunction.apply(x, x, *fp.kernel_args())  # autograd adds the two inputs' gradients
    return subtraction2_op(x, x, None, *fp.kernel_args())


def unfold(x: Tensor, fp: Footprint) -> Tensor:
    if _eager(x):
        return _GatherFunction.apply(None, x, *fp.kernel_args())
    return unfold_op(x, *fp.kernel_args())


def centre(x: Tensor, fp: Footprint, h_out: int, w_out: int) -> Tensor:
    return reference.centre(x, fp, h_out, w_out)  # a strided slice: already cheap
