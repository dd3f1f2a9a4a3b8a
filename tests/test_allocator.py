"""torchsan.allocator: glibc's keep-freed-memory settings, and the ways to opt out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROBE = """
import ctypes, resource, sys
from torchsan import allocator
print(allocator.keep_freed_memory(), allocator.malloc_setting())
# 20 rounds of a fresh 64 MB tensor (16,384 pages): how many page faults?
import torch
torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    environ.update(env, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environ, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_keep_freed_memory_reuses_large_blocks():
    lines = _probe()
    assert lines[0].startswith("True glibc, keep freed memory")
    system = _probe(TORCHSAN_MALLOC="system")
    assert int(system[1]) > 15 * 16384  # glibc's defaults: every round maps and faults the block afresh
    assert int(lines[1]) < 3 * 16384  # kept: reused, at most a round's worth of new pages


def test_opt_outs():
    assert _probe(TORCHSAN_MALLOC="system")[0] == "False system default (TORCHSAN_MALLOC=system)"
    assert _probe(MALLOC_ARENA_MAX="2")[0] == "False user settings (MALLOC_ARENA_MAX)"
