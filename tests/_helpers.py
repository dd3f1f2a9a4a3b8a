"""What several test files share (one copy of each): running an op on a backend and comparing what comes out,
thread counts, counting calls of ``torchsan.ops`` functions, random module states, and the guarded allocator.

The oracles themselves are elsewhere: ``oracle.py`` (per-pixel loops) for the reference ops, and the reference
backend (``ops.use_backend("reference")``) for the fused kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from torchsan import ops
from torchsan.ops import _cpu

CPU_KERNELS = _cpu.available()
needs_cpu_kernels = pytest.mark.skipif(not CPU_KERNELS, reason=f"CPU kernels unavailable: {_cpu.unavailable_reason()}")

# Footprints on odd sizes: (kernel_size, stride, dilation, padding, H, W); padding None is the default.
CASES = [
    (3, 1, 1, None, 9, 7),
    (7, 1, 1, None, 13, 11),
    (7, 2, 1, None, 15, 9),
    (3, 2, 1, None, 8, 9),
    (5, 1, 2, None, 11, 12),
    (3, 3, 2, None, 10, 7),
    (3, 1, 1, 0, 6, 7),
    (3, 1, 1, 2, 6, 5),  # stride 1 with more padding than the half-span: centres are not the input plane
    (5, 1, 2, 3, 12, 11),
    (3, 2, 1, 2, 5, 7),
    (1, 1, 1, None, 4, 5),
]
MODES = ["reflect", "zeros"]
DTYPES = [torch.float32, torch.float64]


def case_id(case: tuple) -> str:
    k, s, d, p, h, w = case[:6]
    return f"k{k}s{s}d{d}p{p}_{h}x{w}"


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None, **tol: float) -> None:
    """assert_close at the tolerance of ``dtype`` (a's by default) unless one is given."""
    torch.testing.assert_close(a, b, **(tol or tolerance(dtype or a.dtype)))


# --- one op, forward and backward ------------------------------------------------------------------------------------
def run(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, backend: str = "cpu",
        seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """fn(*leaves) on ``backend``, leaves cloned from ``tensors``, then backward with a fixed random gradient:
    (output, the leaves' gradients)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    with ops.use_backend(backend):
        out = fn(*leaves)
    # randn(shape), not randn_like: the same logical gradient whatever the output's strides
    out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed)))
    return out.detach(), [leaf.grad for leaf in leaves]


def both(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> list[tuple[torch.Tensor, list]]:
    """:func:`run` on the cpu backend (the fused kernels) and on the reference backend (their oracle)."""
    return [run(fn, *tensors, backend=backend) for backend in ("cpu", "reference")]


def assert_matches_reference(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, dtype: torch.dtype | None = None,
                             grad_tol: dict[str, float] | None = None, **tol: float) -> None:
    """fn's output and every input gradient on the cpu backend equal the reference backend's."""
    dtype = dtype or tensors[0].dtype
    (yf, gf), (yr, gr) = both(fn, *tensors)
    assert_close(yf, yr, dtype, **tol)
    assert len(gf) == len(gr) == len(tensors)
    for a, b in zip(gf, gr, strict=True):
        assert a is not None and b is not None
        assert_close(a, b, dtype, **(grad_tol or tol))


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def per_thread_count(fn: Callable[[], object], counts: tuple[int, ...] = (1, 2)) -> list[object]:
    """fn() once with each intra-op thread count."""
    results = []
    for n in counts:
        with num_threads(n):
            results.append(fn())
    return results


def assert_identical(a: object, b: object) -> None:
    """Bit for bit, through nested tuples and lists of tensors (None where the other is None)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert a is None and b is None, (a, b)


# --- modules ---------------------------------------------------------------------------------------------------------
def randomise(module: nn.Module, scale: float = 0.3, stats: bool = True) -> nn.Module:
    """Random parameters and (with ``stats``) BN running statistics.

    Random BN shifts matter: at the default zero shift a pairwise layer's centre tap z = p_i - p_i = 0 sits on ReLU's
    kink, a rounding error away from 0, where two correct implementations may pick different subgradients."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
        if stats:
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.5)
                    m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return module


def count_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, list[tuple]]:
    """Wrap each ``torchsan.ops.<name>`` so that its calls are recorded (their positional and keyword arguments):
    the layers call the ops through the module attribute, so this sees every call a layer makes."""
    calls: dict[str, list[tuple]] = {name: [] for name in names}
    for name in names:
        real = getattr(ops, name)

        @functools.wraps(real)
        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls[_name].append((args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, wrapper)
    return calls


# --- the guarded allocator (tests/guarded_allocator.cpp) -------------------------------------------------------------
@functools.cache
def _guard_library() -> ctypes.CDLL:
    from torch.utils import cpp_extension

    name = "torchsan_tests_guarded_allocator"
    build_dir = Path(cpp_extension.get_default_build_root()) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("torch.utils.cpp_extension")  # (a warning about CUDA_HOME on CPU-only machines)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        source = Path(__file__).with_name("guarded_allocator.cpp")
        cpp_extension.load(name, [str(source)], build_directory=str(build_dir), is_python_module=False,
                           extra_cflags=["-O1"], verbose=False)
    finally:
        log.setLevel(level)
    lib = ctypes.CDLL(os.fspath(build_dir / f"{name}.so"))
    for fn in ("guarded_allocations", "guarded_violations", "guarded_guard_bytes"):
        getattr(lib, fn).restype = ctypes.c_int64
    lib.guarded_check.restype = ctypes.c_int
    lib.guarded_check.argtypes = [ctypes.c_void_p]
    return lib


class Guards:
    """What :func:`guarded_allocations` saw: ``allocations`` and ``violations`` since it started, and ``check(t)``."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._allocations0, self._violations0 = lib.guarded_allocations(), lib.guarded_violations()
        self.bytes = lib.guarded_guard_bytes()

    @property
    def allocations(self) -> int:
        return self._lib.guarded_allocations() - self._allocations0

    @property
    def violations(self) -> int:
        return self._lib.guarded_violations() - self._violations0

    def check(self, t: torch.Tensor) -> str:
        """'intact' if t's storage is a live guarded block with both guards as written, 'written' if a guard changed,
        'unguarded' if torch did not allocate it while the guards were installed."""
        return ("unguarded", "written", "intact")[self._lib.guarded_check(t.untyped_storage().data_ptr())]


@contextlib.contextmanager
def guarded_allocations() -> Iterator[Guards]:
    """While inside, every CPU tensor torch allocates has guard regions on both sides, checked when it is freed
    (``Guards.violations`` counts the blocks freed with a guard overwritten)."""
    lib = _guard_library()
    guards = Guards(lib)
    lib.guarded_install()
    try:
        yield guards
    finally:
        lib.guarded_uninstall()
