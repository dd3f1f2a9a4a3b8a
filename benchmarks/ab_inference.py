"""A/B of named fused ops on an eval forward, in one process.

    python benchmarks/ab_inference.py [--without pairwise_attention patchwise_attention] [--batches 1 8]

"fused": the default routes (``torchsan.ops.should_fuse`` decides each). "without": the same, except that
``should_fuse`` answers no for the ops named by ``--without`` (entries of ``torchsan.ops.FUSED_OPS``), so the layers
take the route they would take without them. Eval mode under ``torch.inference_mode``, 224 px; the two settings
alternate in one process after a warm-up forward each, so both see the same allocator and cache state. Prints the
median forward of each, per model and batch, and writes benchmarks/results/ab_inference.json (``--json``). glibc's
default malloc unless ``--malloc keep``, as for benchmarks/inference.py. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import timm  # noqa: E402
import torch  # noqa: E402

from torchsan import ops  # noqa: E402


@contextlib.contextmanager
def without(names: set[str]) -> Iterator[None]:
    """``ops.should_fuse`` answers no for the fused ops in ``names`` (the layers look it up at call time)."""
    original = ops.should_fuse

    def should_fuse(op: str, x: torch.Tensor, *modules: torch.nn.Module, **shape: int) -> bool:
        return op not in names and original(op, x, *modules, **shape)

    ops.should_fuse = should_fuse
    try:
        yield
    finally:
        ops.should_fuse = original


def measure(name: str, batch: int, names: set[str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Eval forward times of ``name`` at ``batch`` with the default routes ("fused") and without ``names``."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(batch, 3, args.image_size, args.image_size)

    def forward() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            model(x)
            return time.perf_counter() - t

    settings = {"without": lambda: without(names), "fused": contextlib.nullcontext}
    for setting in settings.values():
        with setting():
            forward()
    times: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(args.rounds):
        for key, setting in settings.items():
            with setting():
                forward()  # lead-in: timed right after a call of its own
                times[key].append(forward())
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["san10_pairwise", "san10_patchwise"])
    p.add_argument("--without", nargs="+", default=["pairwise_attention", "patchwise_attention"],
                   choices=sorted(ops.FUSED_OPS), metavar="OP")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--json", default=str(_common.RESULTS / "ab_inference.json"))
    _common.add_malloc_flag(p)
    p.set_defaults(malloc="system")
    args = p.parse_args()
    start, machine = time.perf_counter(), _common.machine_info()
    malloc = _common.apply_malloc(args.malloc)
    names = set(args.without)
    records, rows = [], []
    for name in args.models:
        for batch in args.batches:
            times = measure(name, batch, names, args)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            records.append(dict(model=name, batch=batch, times_s=times, median_ms=med))
            rows.append([name, str(batch), f"{med['without']:.1f}", f"{med['fused']:.1f}",
                         f"{med['fused'] / med['without']:.3f}"])
            print(f"{name} batch {batch} done", flush=True)
    text = (f"== eval forward, {args.image_size} px, {torch.get_num_threads()} threads on {machine['cpu_model']}, "
            f"median of {args.rounds} alternating rounds; without: {', '.join(sorted(names))}; malloc: {malloc} ==\n"
            + _common.table(["model", "batch", "without ms", "fused ms", "fused/without"], rows))
    _common.finish("ab_inference", args.json, machine, vars(args), records, text, start)


if __name__ == "__main__":
    main()
