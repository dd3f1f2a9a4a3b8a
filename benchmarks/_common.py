"""Helpers shared by the benchmark scripts: the machine's description, the JSON file, text tables.

Imported by the scripts in ``benchmarks/`` (run as scripts, so this folder is on ``sys.path``). It imports
neither torch nor torchsan at module level, so the scripts can set up ``sys.path`` and environment variables first.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def use_checkout() -> None:
    """Put this checkout's ``src`` first on ``sys.path``, so the benchmarks measure the code next to them.

    With ``pip install -e .`` that is the same code; without an install it makes the scripts runnable
    from the repository root with a plain ``python benchmarks/ops.py``.
    """
    src = ROOT / "src"
    if (src / "torchsan").is_dir() and str(src) not in sys.path:
        sys.path.insert(0, str(src))


def add_malloc_flag(parser: Any) -> None:
    parser.add_argument("--malloc", choices=("keep", "system"), default="keep",
                        help="keep: glibc keeps freed memory for reuse, as torchsan train does "
                             "(torchsan.allocator); system: glibc's defaults, every large tensor faulted in afresh")


def apply_malloc(choice: str) -> str:
    """Apply ``--malloc`` in this process (before the first large allocation); returns what is in effect."""
    from torchsan import allocator

    if choice == "keep":
        allocator.keep_freed_memory()
    return allocator.malloc_setting()


_VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "asimd", "sve")


def cpu_model() -> str:
    """The processor's name, its family/model where the name is generic (VMs often say just "AMD EPYC"), and
    its vector extensions: what a timing depends on."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name") or fields.get("hardware") or fields.get("cpu model") or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    vector = [f for f in _VECTOR_FLAGS if f in flags]
    return f"{name}, {' '.join(vector)}" if vector else name


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, threads, versions, load, and the code's git state."""
    import torch

    import torchsan

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_version": torch.__version__,
        "torchsan_version": torchsan.__version__,
        "torchsan_path": str(Path(torchsan.__file__).parent),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_kernels": _cpu_kernels(),
    }


def _cpu_kernels() -> str:
    """What the C++ kernels were built for (vector unit and width, TORCHSAN_CPU_ARCH)."""
    from torchsan.ops import _cpu

    try:
        return _cpu.describe()
    except ValueError as err:  # a bad TORCHSAN_CPU_ARCH
        return str(err)


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)


def finish(benchmark: str, json_path: str, machine: dict[str, Any], config: dict[str, Any],
           records: Sequence[Any], text: str, start: float) -> None:
    """Print the table and write the run's JSON (command, machine, config, raw results, table)."""
    print(text)
    path = Path(json_path)
    write_json(path, {"benchmark": benchmark, "command": command_line(), "machine": machine, "config": config,
                      "wall_s": time.perf_counter() - start, "results": records, "table": text})
    print(f"\nwrote {path}")


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A plain text table; the first ``left`` columns are left-aligned, the others right-aligned."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), "-" * len(line(headers)), *(line(r) for r in rows)])
