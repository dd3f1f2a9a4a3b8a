"""How the ``cpu`` backend registers its kernels: one helper for every custom op, one route for double backward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._build import kernels

__all__ = ["custom_op", "differentiable_backward", "kernels"]


def custom_op(
    name: str,
    forward: Callable[..., Any],
    fake: Callable[..., Any],
    *,
    backward: Callable[..., Any] | None = None,
    setup: Callable[[Any, tuple, Any], None] | None = None,
    mutates: Sequence[str] = (),
    schema: str | None = None,
) -> Any:
    """Register ``forward`` as ``torch.ops.torchsan.<name>`` for CPU tensors, with ``fake`` for shape inference
    (meta tensors, torch.compile) and, if given, ``backward`` and ``setup`` as its autograd formula (see
    ``torch.library.register_autograd``). The schema comes from ``forward``'s annotations unless given."""
    op = torch.library.custom_op(f"torchsan::{name}", forward, mutates_args=tuple(mutates), device_types="cpu",
                                 schema=schema)
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup)
    return op


def differentiable_backward(reference: Callable[..., Any], inputs: Sequence[Tensor | None],
                            grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The backward pass as a graph autograd can differentiate again (``create_graph=True``, double backward).

    Every op's fused backward kernel runs with grad mode off; with grad mode on, the op's backward calls this
    instead: the gradient of ``reference(*inputs)``, the op written in the reference backend's plain PyTorch,
    w.r.t. the inputs that require grad, given the gradients of its outputs (None where an output got none).
    Returns one entry per input, None where no gradient is needed.
    """
    if not any(t is not None and t.requires_grad for t in inputs):
        return [None] * len(inputs)
    with torch.enable_grad():
        # Aliases stop the search for gradients at them: a saved output (say a softmax) would otherwise lead it back
        # into this very node. The aliases keep the inputs' graph, so the result is differentiable w.r.t. them.
        inputs = [t.view_as(t) if t is not None and t.requires_grad else t for t in inputs]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        outputs = reference(*inputs)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        if not pairs:
            return [None] * len(inputs)
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                         allow_unused=True))
    return [next(found) if t is not None and t.requires_grad else None for t in inputs]
