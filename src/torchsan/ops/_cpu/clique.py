"""The clique relation of patchwise self-attention (C++: ``csrc/cpu/clique.cpp``).

``out[n, j, k, l] = sum_c q[n, c, j, l] * k[n, c, k, l]``, (N, C, K, L) x 2 -> (N, K, K, L): the products of every
pair of taps, written in the layout the mapping gamma reads (``torch.einsum`` writes it as (N, L, K, K) and copies).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ._register import custom_op, differentiable_backward, kernels
from .policy import CLIQUE_MAX_CHANNELS


def _clique_products_backward(grad: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """(grad q, grad k) in one pass over grad (grad mode off)."""
    gq, gk = kernels().clique_backward(grad, q, k, True, True)
    return gq, gk


clique_products_backward_op = custom_op(
    "clique_products_backward", _clique_products_backward,
    lambda grad, q, k: (torch.empty_like(q, memory_format=torch.contiguous_format),
                        torch.empty_like(k, memory_format=torch.contiguous_format)))


def _clique_products(q: Tensor, k: Tensor) -> Tensor:
    """(N, C, K, L) x 2 -> (N, K, K, L)."""
    return kernels().clique_forward(q, k)


def _clique_products_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _clique_products_grad(ctx, grad):
    q, k = ctx.saved_tensors
    if torch.is_grad_enabled():
        return tuple(differentiable_backward(reference.clique_products, (q, k), (grad,)))
    return clique_products_backward_op(grad, q, k)


clique_products_op = custom_op(
    "clique_products", _clique_products,
    lambda q, k: q.new_empty((q.shape[0], q.shape[2], q.shape[2], q.shape[3])),
    backward=_clique_products_grad, setup=_clique_products_setup)


# --- backend interface ----------------------------------------------------------------------------------------------
def clique_products(q: Tensor, k: Tensor) -> Tensor:
    if q.shape[1] > CLIQUE_MAX_CHANNELS:
        return reference.clique_products(q, k)
    return clique_products_op(q, k)
