"""Building and loading the ``cpu`` backend's C++ extension (``torchsan/csrc/cpu/``).

The sources compile on first use with ``torch.utils.cpp_extension.load`` (the machine's g++, OpenMP and ninja) and
are cached in torch's extensions folder, once per machine, torch version and source text. If that fails (no
compiler, no ninja), :func:`available` is False and the dispatcher falls back to the reference ops with a warning.
``TORCHSAN_DISABLE_CPU_KERNELS=1`` skips the build.

The kernels are compiled for the machine they run on (``-march=native``): 512-bit vectors on a CPU with AVX-512,
256-bit ones on other CPUs with AVX and 128-bit ones elsewhere (SSE2, NEON); see :func:`native_vector_bits`.
``TORCHSAN_CPU_ARCH`` asks for another target: ``avx512`` (512-bit vectors; needs AVX-512), ``avx2`` (x86-64-v3:
AVX2 and FMA, no AVX-512) or ``generic`` (the architecture's baseline: x86-64 with SSE2 only, or Armv8-A), which CI
builds to keep the portable path compiled and tested.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cpu"
_lock = threading.Lock()
_ext: ModuleType | None = None
_error: str | None = None


ARCHES = ("native", "avx512", "avx2", "generic")


def _sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cpp"))


def _cpuinfo(field: str, text: str | None = None) -> str:
    """The value of the first ``field`` line of /proc/cpuinfo (or of ``text`` in its format); "" where there is
    none."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    lines = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return next((value.strip() for key, value in lines if key.strip() == field), "")


def _cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def native_vector_bits() -> int | None:
    """The vector width ``native`` asks for on this machine: 512 on x86 CPUs with AVX-512, where each of the three
    measured ran inference level or faster with them and both SAN10 train steps level or faster (Intel Xeons
    Sapphire Rapids and Skylake-SP; AMD's Zen 4, which runs 512-bit instructions as two halves but issues half as
    many: docs/performance.md, "Vector width"); None (the build's default: 256 with AVX) elsewhere.
    ``TORCHSAN_CPU_ARCH=avx2`` builds 256-bit vectors on any of them."""
    if "avx512f" in _cpu_flags():
        return 512
    return None


def portable_arches() -> list[str]:
    """The targets ``make test-portable`` tests besides ``native``: ``generic`` everywhere, and on an x86 CPU with
    AVX-512 (whose native build is 512-bit) ``avx2``, the 256-bit width. On an AVX2 CPU without AVX-512 the native
    build is the ``avx2`` one in all but tuning, so it is not built twice."""
    arches = ["generic"]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return arches
    flags = _cpu_flags()
    if "avx2" in flags and "avx512f" in flags:
        arches.append("avx2")
    return arches


def requested_arch() -> str:
    """The target ``TORCHSAN_CPU_ARCH`` asks for: native (default), avx512, avx2 or generic."""
    arch = os.environ.get("TORCHSAN_CPU_ARCH", "") or "native"
    if arch not in ARCHES:
        raise ValueError(f"TORCHSAN_CPU_ARCH={arch!r} is not one of {', '.join(ARCHES)}")
    return arch


# The 512-bit build: the register-blocked kernels' vectors (TORCHSAN_VECTOR_BITS), and the compiler's own
# vectorised loops at the same width (GCC picks 256 bits for them unless told).
_ZMM = ["-march=native", "-DTORCHSAN_VECTOR_BITS=512", "-mprefer-vector-width=512"]


def _arch_flags(arch: str) -> list[str]:
    machine = platform.machine().lower()
    x86 = machine in ("x86_64", "amd64", "i686", "i386")
    if arch == "avx512":
        if "avx512f" not in _cpu_flags():
            raise ValueError("TORCHSAN_CPU_ARCH=avx512 needs a CPU with AVX-512 (avx512f), this one has none")
        return list(_ZMM)
    if arch == "avx2":
        if not x86:
            raise ValueError(f"TORCHSAN_CPU_ARCH=avx2 applies to x86 machines, this one is {machine}")
        return ["-march=x86-64-v3", "-mtune=native"]  # AVX2 and FMA; no AVX-512 (nor AVX10) instructions
    if arch == "generic":
        if x86:
            return ["-march=x86-64", "-mtune=generic"]
        return ["-march=armv8-a"] if machine in ("aarch64", "arm64") else []
    if x86 and native_vector_bits() == 512:
        return list(_ZMM)
    return ["-march=native"]


def _build_tag() -> str:
    """Distinguishes builds for different CPUs and targets (-march), torch versions and sources."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line
    except OSError:
        flags = platform.processor()
    # The folder's path too: two checkouts on one machine must not rebuild each other's extension.
    text = "".join(p.name + p.read_text() for p in sorted(SOURCE_DIR.glob("*.[ch]*")))
    key = flags + torch.__version__ + str(SOURCE_DIR) + text + " ".join(_arch_flags(requested_arch()))
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _load() -> ModuleType:
    # torch logs a warning about CUDA_HOME on machines without CUDA (at import): irrelevant for a CPU build.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        name = f"torchsan_cpu_{_build_tag()}"
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not any(build_dir.glob(f"{name}*.so")):
            print("torchsan: compiling the fused CPU kernels (first use only, about a minute)...", file=sys.stderr)
        return cpp_extension.load(
            name=name,
            sources=[str(p) for p in _sources()],
            extra_include_paths=[str(SOURCE_DIR)],
            extra_cflags=["-O3", *_arch_flags(requested_arch()), "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    finally:
        log.setLevel(level)


def extension() -> ModuleType | None:
    """The compiled extension, building it on first call; None if it cannot be built."""
    global _ext, _error
    if _ext is not None or _error is not None:
        return _ext
    with _lock:
        if _ext is None and _error is None:
            if os.environ.get("TORCHSAN_DISABLE_CPU_KERNELS", "") not in ("", "0"):
                _error = "disabled by TORCHSAN_DISABLE_CPU_KERNELS"
            else:
                _arch_flags(requested_arch())  # a bad TORCHSAN_CPU_ARCH is an error to fix, not a reason to fall back
                try:
                    _ext = _load()
                except Exception as err:  # no compiler, no ninja, a build error: fall back, never crash
                    _error = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                    warnings.warn(
                        f"torchsan: the fused CPU kernels could not be built ({_error}); "
                        "falling back to the reference ops (correct but slow and memory-hungry)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return _ext


def kernels() -> ModuleType:
    """The extension, or a clear error if it could not be built (for direct torch.ops.torchsan calls)."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"torchsan's fused CPU kernels are unavailable: {_error}")
    return ext


@torch.compiler.assume_constant_result  # torch.compile calls it eagerly and folds the answer into the graph
def available() -> bool:
    """Whether the fused CPU kernels are usable (builds them on first call)."""
    return extension() is not None


def unavailable_reason() -> str | None:
    return _error


def describe() -> str:
    """One line on the kernels: the vector unit they were built for, or why they are unavailable."""
    ext = extension()
    if ext is None:
        return f"unavailable ({_error}); the reference ops run instead"
    constants = ext.kernel_constants()
    fma = ", fused multiply-add" if constants.get("fused_multiply_add") else ""
    return (f"built for {ext.vector_isa()} ({8 * constants['vector_bytes']}-bit vectors{fma}; "
            f"TORCHSAN_CPU_ARCH={requested_arch()})")


def vector_isa() -> str:
    """The vector unit the kernels were built for: avx512, avx2, avx, neon, sse2 or generic."""
    return kernels().vector_isa()


def kernel_constants() -> dict[str, int]:
    """The kernels' size thresholds and the cache sizes they were derived from (e.g. ``stream_bytes``)."""
    return dict(kernels().kernel_constants())
