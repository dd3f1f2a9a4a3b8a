"""How the ``cpu`` backend registers its kernels: one helper for every custom op, one route for double backward."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._build import kernels

__all__ = ["custom_op", "differentiable_backward", "kernels", "register_interpreted"]

# The triton backend's kernels by op name: a CPU tensor runs them, through Triton's interpreter, while the triton
# backend is selected (``use_backend("triton")`` with ``TRITON_INTERPRET=1``): how CI tests the GPU kernels.
_INTERPRETED: dict[str, Callable[..., Any]] = {}


def register_interpreted(name: str, kernel: Callable[..., Any]) -> None:
    """Run ``kernel`` instead of the C++ kernel of op ``name`` on CPU tensors while the triton backend is selected."""
    _INTERPRETED[name] = kernel


def _interpreting() -> bool:
    """Whether CPU tensors run the triton backend's kernels now (see ``_INTERPRETED``)."""
    if not _INTERPRETED:
        return False
    from .._dispatch import get_backend

    return get_backend() == "triton"


def _remembering_backend(backward: Callable[..., Any], setup: Callable[..., Any] | None) -> tuple:
    """(backward, setup) such that the backward runs on the kernels the forward ran on: a backward pass usually
    runs after the ``use_backend("triton")`` block of its forward has ended."""

    def remember(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.interpreted = _interpreting()
        if setup is not None:
            setup(ctx, inputs, output)

    def replay(ctx: Any, *grads: Any) -> Any:
        if not getattr(ctx, "interpreted", False):
            return backward(ctx, *grads)
        from .._dispatch import use_backend

        with use_backend("triton"):
            return backward(ctx, *grads)

    return replay, remember


def _or_interpreted(name: str, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward``, or the triton backend's kernel for op ``name`` when that backend is selected (see above)."""

    @functools.wraps(forward)
    def kernel(*args: Any) -> Any:
        if name in _INTERPRETED and _interpreting():
            return _INTERPRETED[name](*args)
        return forward(*args)

    return kernel


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
    op = torch.library.custom_op(f"torchsan::{name}", _or_interpreted(name, forward), mutates_args=tuple(mutates),
                                 device_types="cpu", schema=schema)
    op.register_fake(fake)
    if backward is not None:
        replay, remember = _remembering_backend(backward, setup)
        op.register_autograd(replay, setup_context=remember)
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
