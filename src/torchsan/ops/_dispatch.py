"""Backend selection, in one place.

Backends:
    ``cpu``        fused C++/OpenMP kernels (float32/float64 CPU tensors), registered as torch custom ops.
    ``triton``     Triton kernels for CUDA tensors (float16/bfloat16/float32/float64), registered as the same
                   custom ops' CUDA kernels; on CPU tensors too under ``TRITON_INTERPRET=1`` (tests).
    ``reference``  plain PyTorch (unfold), any device and dtype, the ground truth for tests.

``auto`` (the default) picks the fastest backend that serves the input: ``cpu`` for float32/float64
CPU tensors when the kernels could be built, ``triton`` for CUDA tensors when triton imports, else
``reference``. While a model is exported (``torch.export``, ``torch.onnx.export``) ``auto`` picks ``reference``,
so the exported program holds only standard operators and runs where torchsan is not installed; a backend
selected by name is kept (its ops stay in the graph as ``torchsan.*`` custom ops). The environment variable
``TORCHSAN_BACKEND`` sets the initial choice for every thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

from . import _cpu, _triton, reference

_BACKENDS: dict[str, ModuleType] = {"cpu": _cpu, "triton": _triton, "reference": reference}
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


def exporting() -> bool:
    """Whether the call is being traced for export: ``torch.export`` (hence ``torch.onnx.export(dynamo=True)``) or
    the TorchScript-based ``torch.onnx.export``."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # (torch >= 2.6)
    return bool(is_exporting is not None and is_exporting()) or torch.onnx.is_in_onnx_export()


def implementation(x: torch.Tensor) -> ModuleType:
    """The backend module that serves input ``x`` under the current selection."""
    name = get_backend()
    if name == "auto":
        if exporting():
            return reference
        if x.device.type == "cpu" and x.dtype in _cpu.DTYPES and _cpu.available():
            return _cpu
        if x.device.type == "cuda" and x.dtype in _triton.DTYPES and _triton.available():
            return _triton
        return reference
    if name == "cpu":
        if x.device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got a tensor on {x.device}")
        if x.dtype not in _cpu.DTYPES:
            raise TypeError(f"backend 'cpu' supports float32 and float64, got {x.dtype}")
        if not _cpu.available():
            raise RuntimeError(f"backend 'cpu' is unavailable: {_cpu.unavailable_reason()}")
    if name == "triton":
        if not _triton.available():
            raise RuntimeError(f"backend 'triton' is unavailable: {_triton.unavailable_reason()}")
        if not _triton.serves(x):
            raise ValueError(f"backend 'triton' serves CUDA tensors (CPU tensors under TRITON_INTERPRET=1) of "
                             f"{', '.join(str(d) for d in _triton.DTYPES)}; got a {x.dtype} tensor on {x.device}")
    return _BACKENDS[name]


def backend_for(x: torch.Tensor) -> str:
    """The name of the backend that serves input ``x`` under the current selection."""
    impl = implementation(x)
    return next(name for name, module in _BACKENDS.items() if module is impl)
