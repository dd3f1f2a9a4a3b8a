"""Backend selection, in one place.

Backends:
    ``cpu``        fused C++/OpenMP kernels (float32/float64 CPU tensors), registered as torch custom ops.
    ``reference``  plain PyTorch (unfold), any device and dtype, the ground truth for tests.
    (later: ``cuda`` Triton/CUDA kernels.)

``auto`` (the default) picks the fastest backend that serves the input: ``cpu`` for float32/float64
CPU tensors when the kernels could be built, else ``reference``. The environment variable
``TORCHSAN_BACKEND`` sets the initial choice for every thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

from . import _cpu, reference

_BACKENDS: dict[str, ModuleType] = {"cpu": _cpu, "reference": reference}
_CHOICES = ("auto", *_BACKENDS)
_state = threading.local()
_DEFAULT = os.environ.get("TORCHSAN_BACKEND", "auto")
if _DEFAULT not in _CHOICES:
    raise ValueError(f"TORCHSAN_BACKEND={_DEFAULT!r} is not one of {_CHOICES}")


def available_backends() -> tuple[str, ...]:
    """Names accepted by :func:`set_backend` and :func:`use_backend`."""
    return _CHOICES


def get_backend() -> str:
    """The backend requested for this thread ("auto" unless changed)."""
    return getattr(_state, "name", _DEFAULT)


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


def implementation(x: torch.Tensor) -> ModuleType:
    """The backend module that serves input ``x`` under the current selection."""
    name = get_backend()
    if name == "auto":
        if x.device.type == "cpu" and x.dtype in _cpu.DTYPES and _cpu.available():
            return _cpu
        return reference
    if name == "cpu":
        if x.device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got a tensor on {x.device}")
        if x.dtype not in _cpu.DTYPES:
            raise TypeError(f"backend 'cpu' supports float32 and float64, got {x.dtype}")
        if not _cpu.available():
            raise RuntimeError(f"backend 'cpu' is unavailable: {_cpu.unavailable_reason()}")
    return _BACKENDS[name]


def backend_for(x: torch.Tensor) -> str:
    """The name of the backend that serves input ``x`` under the current selection."""
    impl = implementation(x)
    return next(name for name, module in _BACKENDS.items() if module is impl)
