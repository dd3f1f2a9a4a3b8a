"""Values a layer derives from its parameters alone (stacked weights, the position encoding), kept between calls for
inference.

Recomputing them costs little in training, where they take part in the gradient, but at batch 1 they are a
noticeable share of a forward. :func:`reuse` keeps one value per slot of a module and rebuilds it when any parameter
it came from has changed: another tensor (``load_state_dict(assign=True)``, ``.to()``, ``.data = ...``), an in-place
update (an optimizer step, ``load_state_dict``, ``copy_``: each bumps the tensor's version counter), another autocast
setting, or another ``extra`` key (say the input's size). The cache holds its source tensors, so that no other tensor
can take their addresses while the entry lives.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
from torch import nn

from ..ops._dispatch import exporting

__all__ = ["reuse"]

Value = TypeVar("Value")


def _cacheable(sources: Sequence[torch.Tensor]) -> bool:
    """No gradient flows from the value, and the sources are plain tensors of an eager run (not a trace's fakes,
    nor inference-mode tensors, which keep no version counter)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or exporting():
        return False
    return all(type(t) in (torch.Tensor, nn.Parameter) and not t.is_inference() for t in sources)


def reuse(module: nn.Module, slot: str, sources: Sequence[torch.Tensor | None], build: Callable[[], Value],
          extra: Hashable = None) -> Value:
    """``build()``, or the value it returned for ``module``'s ``slot`` last time if no gradient is wanted from it and
    neither ``sources`` (the tensors it is computed from; None entries ignored) nor ``extra`` have changed since."""
    tensors = [t for t in sources if t is not None]
    if not _cacheable(tensors):
        return build()
    autocast = tuple((device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
                     for device in sorted({t.device.type for t in tensors}))
    key = (tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors), autocast,
           torch.is_inference_mode_enabled(), extra)  # (an inference-mode value cannot be saved for a backward)
    cache = module.__dict__.setdefault("_torchsan_reuse", {})
    entry = cache.get(slot)
    if entry is not None and entry[0] == key:
        return entry[2]
    value = build()
    cache[slot] = (key, [t.detach() for t in tensors], value)
    return value
