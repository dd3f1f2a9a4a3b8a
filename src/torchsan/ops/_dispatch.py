"""Backend selection, in one place.

Backends:
    ``reference``  plain PyTorch (unfold), any device, the ground truth for tests.
    (later: ``cpu`` fused C++/OpenMP kernels, ``cuda`` Triton/CUDA kernels.)

``auto`` (the default) picks the fastest backend available for the input's device.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

from . import reference

_BACKENDS: dict[str, ModuleType] = {"reference": reference}
_CHOICES = ("auto", *_BACKENDS)
_state = threading.local()


def available_backends() -> tuple[str, ...]:
    """Names accepted by :func:`set_backend` and :func:`use_backend`."""
    return _CHOICES


def get_backend() -> str:
    """The backend requested for this thread ("auto" unless changed)."""
    return getattr(_state, "name", "auto")


def set_backend(name: str) -> None:
    """Select the backend for this thread: one of :func:`available_backends`."""
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {_CHOICES}")
    _state.name = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ``with torchsan.ops.use_backend("reference"): ...``."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state.name = previous


def implementation(device: torch.device) -> ModuleType:
    """The backend module that serves a tensor on ``device`` under the current selection."""
    name = get_backend()
    if name == "auto":
        # Only the reference exists so far; fused kernels register themselves here.
        return _BACKENDS["reference"]
    return _BACKENDS[name]
