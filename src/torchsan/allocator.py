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
