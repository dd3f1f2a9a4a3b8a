"""Per-call overhead of the ops on tiny tensors: the position encoding's ``subtraction`` on the (1, 2, H, W) grid.

    python benchmarks/call_overhead.py [--rounds 7]

``ops.py`` times ``subtraction`` at every SAN10 stage, where it gains less over the reference than the other
gathers. Its input is the 2-channel coordinate grid of one image, so the whole op is a few microseconds of
arithmetic, and a differentiable call from Python (dispatch, the autograd graph, ``torch.autograd.grad``) costs
more than that. This script separates the two, per stage, in one process with rounds taken in turn:

* ``kernels``    the compiled forward and backward kernels called directly: the op's own work;
* ``fused``      ``torch.autograd.grad(ops.subtraction(x, k), x, g)`` on the ``cpu`` backend, as ``ops.py`` times it;
* ``reference``  the same on the plain-PyTorch backend;
* ``floor``      ``torch.autograd.grad(x * 2, x, g)``: one trivial differentiable call on the same input, the least
  any implementation pays per call here. ``ref/floor`` bounds the ratio ``ops.py`` could show.

Times in microseconds, the median over rounds. Writes benchmarks/results/call_overhead.json. A measurement, not a
test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import torch  # noqa: E402

from torchsan import ops  # noqa: E402
from torchsan.ops import _cpu  # noqa: E402

# SAN10 stages at 224 px: (map size, footprint).
STAGES = ((112, 3), (56, 7), (28, 7), (14, 7), (7, 7))
IMPLS = ("kernels", "fused", "reference", "floor")


def calls(h: int, k: int) -> dict[str, Callable[[], object]]:
    x = torch.randn(1, 2, h, h, requires_grad=True)
    g = torch.randn(1, 2, k * k, h * h)
    gx = torch.randn(1, 2, h, h)
    kern, xd, p = _cpu.extension(), x.detach(), k // 2

    def kernels() -> object:
        kern.gather_forward(xd, xd, k, 1, p, 1, True, None)
        return kern.gather_backward(g, h, h, k, 1, p, 1, True, True, True, True, 2)

    def on(backend: str) -> Callable[[], object]:
        def run() -> object:
            with ops.use_backend(backend):
                return torch.autograd.grad(ops.subtraction(x, k), (x,), g)
        return run

    return {"kernels": kernels, "fused": on("cpu"), "reference": on("reference"),
            "floor": lambda: torch.autograd.grad(x * 2, (x,), gx)}


def sample_us(fn: Callable[[], object], seconds: float = 0.05) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", default=str(_common.RESULTS / "call_overhead.json"))
    args = p.parse_args()
    start = time.perf_counter()
    if not _cpu.available():
        raise SystemExit(f"the fused CPU kernels are unavailable: {_cpu.unavailable_reason()}")
    torch.manual_seed(0)
    records, rows = [], []
    for h, k in STAGES:
        fns = calls(h, k)
        for fn in fns.values():  # warm up
            for _ in range(20):
                fn()
        times: dict[str, list[float]] = {name: [] for name in IMPLS}
        for _ in range(args.rounds):
            for name in IMPLS:
                times[name].append(sample_us(fns[name]))
        med = {name: statistics.median(v) for name, v in times.items()}
        records.append({"input_shape": [1, 2, h, h], "kernel_size": k, "times_us": times, "median_us": med})
        rows.append([f"1x2x{h}x{h}", str(k), *(f"{med[n]:.0f}" for n in IMPLS),
                     f"{med['reference'] / med['fused']:.2f}", f"{med['reference'] / med['floor']:.2f}"])
    text = (f"== ops.subtraction on the position grid, forward + backward, {torch.get_num_threads()} threads, "
            f"median of {args.rounds} rounds, microseconds ==\n"
            + _common.table(["input", "k", *IMPLS, "ref/fused", "ref/floor"], rows))
    _common.finish("call_overhead", args.json, _common.machine_info(), vars(args), records, text, start)


if __name__ == "__main__":
    main()
