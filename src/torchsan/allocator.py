"""Keep freed memory in the process: glibc malloc settings for CPU training and benchmarks.

By default glibc serves every allocation above a threshold (128 KiB, growing to at most 32 MiB) with a
fresh ``mmap`` and returns it to the kernel on free. A SAN step allocates many tensors of 40-100 MB (the
(N, C, K, L) grids of the mapping gamma), so every step faults all of that memory in again, page by page,
which on a small CPU machine can cost more than the step's arithmetic (see docs/performance.md). (The fix Intel
recommends for PyTorch on CPUs is preloading jemalloc or tcmalloc; this does the same with glibc's own switches,
at run time.)

:func:`keep_freed_memory` raises the mmap threshold to 1 GiB and the trim threshold to 2 GiB, so large
blocks come from the heap and stay mapped for reuse. The process's resident memory then stays at its peak instead of
shrinking between steps; the peak itself is what it was, plus some fragmentation. ``torchsan train`` and
``torchsan eval`` call it, and so do the benchmarks; set ``TORCHSAN_MALLOC=system`` to keep glibc's
defaults. It does nothing on other C libraries (macOS, musl) or when ``MALLOC_*`` variables already
configure malloc.

Independently of malloc, where no gradient is wanted the fused CPU kernels take their outputs and work buffers of
1 MiB or more from a pool of the blocks such tensors freed, kept by size (as ONNX Runtime's arena keeps its
tensors), so that an eval forward at a fixed input size faults in no new pages after its first call, whatever
malloc is set to. The pool keeps at most ``TORCHSAN_POOL_MAX_MB`` (2048 by default, read once; 0 keeps nothing),
giving back its oldest blocks first; :func:`pooled_memory` says how much it holds now and
:func:`release_pooled_memory` hands it back.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_applied = False


def keep_freed_memory() -> bool:
    """Configure glibc malloc to keep freed blocks for reuse (see the module docstring).

    Returns True if the settings are in effect (now or from an earlier call), False where they do not
    apply (not glibc, ``TORCHSAN_MALLOC=system``, or the user set ``MALLOC_*`` environment variables).
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("TORCHSAN_MALLOC", "") == "system" or not sys.platform.startswith("linux"):
        return False
    if any(k.startswith("MALLOC_") for k in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False  # the user's own malloc configuration wins
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError on a C library that is not glibc)
    except (OSError, AttributeError):
        return False
    # mallopt takes a C int: 2**31 - 1 (2 GiB) is the largest trim threshold it can express.
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
    ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok = ok and libc.mallopt(_M_TOP_PAD, 64 << 20) == 1
    _applied = ok
    return ok


def malloc_setting() -> str:
    """A short description for logs and benchmark records."""
    if _applied:
        return "glibc, keep freed memory (torchsan.allocator)"
    if os.environ.get("TORCHSAN_MALLOC", "") == "system":
        return "system default (TORCHSAN_MALLOC=system)"
    user = sorted(k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")
    return f"user settings ({', '.join(user)})" if user else "system default"


def pooled_memory() -> int:
    """Bytes of freed kernel outputs the fused CPU kernels hold for reuse (see the module docstring); 0 before they
    are loaded."""
    ext = _loaded_kernels()
    return int(ext.pooled_bytes()) if ext is not None else 0


def release_pooled_memory() -> int:
    """Free the blocks the fused CPU kernels hold for reuse; returns how many bytes. Outputs still in use are not
    affected: their memory returns to the pool when they are freed."""
    ext = _loaded_kernels()
    return int(ext.release_pooled_memory()) if ext is not None else 0


def _loaded_kernels():  # noqa: ANN202 (the extension module, or None: never builds it)
    from .ops._cpu import _build

    return _build._ext
