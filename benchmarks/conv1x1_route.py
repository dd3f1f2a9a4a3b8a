"""A plain 1x1 convolution for inference: torch's convolution (oneDNN), one matrix product per image (at::bmm) or the
cpu backend's kernel?

    python benchmarks/conv1x1_route.py [--batches 1 8] [--image-size 224] [--rounds 5] [--model san10_pairwise]

Shapes: every 1x1 ``nn.Conv2d`` call the model makes in one eval forward (recorded with hooks, so each runs as a module
here, the fused ones included), at each batch size. Implementations, rounds taken in turn, best round shown, under
``torch.no_grad()``:

* ``conv``    ``F.conv2d`` (oneDNN);
* ``matmul``  ``torch.baddbmm`` / ``torch.bmm`` of the (Cout, Cin) weight and the (N, Cin, H * W) view, what
  ``torchsan.layers.fused.conv1x1`` runs where the ``cpu`` backend's rule (``CONV1X1_MATMUL_MIN_POSITIONS``) says so;
* ``kernel``  the ``cpu`` backend's ``conv1x1`` (the register-blocked product of its BN-ReLU-conv1x1 kernels), which
  it runs first where its rule (``CONV1X1_KERNEL_MAX_IN_CHANNELS``, ``CONV1X1_KERNEL_MIN_POSITIONS``) says so.

The ``rule`` column is the route the rule picks; the last row sums every call of each route and of the rule's
choice. Writes benchmarks/results/conv1x1_route.json. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from torchsan.ops import _cpu  # noqa: E402


def model_shapes(model_name: str, image_size: int) -> Counter:
    """(x's shape at batch 1, Cout, bias) of every 1x1 Conv2d call of the model in one eval forward."""
    import timm

    import torchsan  # noqa: F401  (registers the models)

    model = timm.create_model(model_name).eval()
    seen: Counter = Counter()

    def record(module: nn.Conv2d, args: tuple, _out: torch.Tensor) -> None:
        seen[(tuple(args[0].shape[1:]), module.out_channels, module.bias is not None)] += 1

    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m.in_channels > 2:
            m.register_forward_hook(record)  # (not the position encoding's 2 -> 2 map, which no route here runs)
    with torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size))
    return seen


def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(x, w[:, :, None, None], b)


def matmul(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    n, _, h, wd = x.shape
    weight = w.expand(n, -1, -1)
    y = torch.bmm(weight, x.flatten(2)) if b is None else torch.baddbmm(b[None, :, None], weight, x.flatten(2))
    return y.view(n, -1, h, wd)


IMPLS: dict[str, Callable[..., torch.Tensor]] = {"conv": conv, "matmul": matmul, "kernel": _cpu.conv1x1}


def timed(fn: Callable[..., torch.Tensor], inputs: tuple) -> float:
    t = time.perf_counter()
    fn(*inputs)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="san10_pairwise")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=str(_common.RESULTS / "conv1x1_route.json"))
    _common.add_malloc_flag(parser)
    args = parser.parse_args()
    start = time.perf_counter()
    malloc = _common.apply_malloc(args.malloc)
    torch.manual_seed(0)
    shapes = sorted(model_shapes(args.model, args.image_size).items(),  # largest maps first
                    key=lambda kv: (-kv[0][0][1] * kv[0][0][2], kv[0][0][0], kv[0][1]))
    records, rows = [], []
    for batch in args.batches:
        totals = {"conv": 0.0, "matmul": 0.0, "kernel": 0.0, "rule": 0.0}
        for (shape, cout, has_bias), calls in shapes:
            x = torch.randn(batch, *shape)
            w, b = torch.randn(cout, shape[0]) / shape[0] ** 0.5, (0.1 * torch.randn(cout) if has_bias else None)
            inputs = (x, w, b)
            with torch.no_grad():
                err = max((conv(*inputs) - fn(*inputs)).abs().max().item() for fn in (matmul, _cpu.conv1x1))
                times: dict[str, list[float]] = {name: [] for name in IMPLS}
                for fn in IMPLS.values():  # warm-up
                    timed(fn, inputs)
                for _ in range(args.rounds):
                    for name, fn in IMPLS.items():
                        times[name].append(timed(fn, inputs))
                rule = ("kernel" if _cpu.fuses("conv1x1", x, in_channels=shape[0], out_channels=cout)
                        else "matmul" if _cpu.fuses("conv1x1_matmul", x) else "conv")
            best = {name: 1e3 * min(times[name]) for name in IMPLS}
            for name in IMPLS:
                totals[name] += calls * best[name]
            totals["rule"] += calls * best[rule]
            records.append(dict(batch=batch, x=[batch, *shape], cout=cout, bias=has_bias, calls=calls, ms=best,
                                samples_s=times, rule=rule, max_abs_diff=err))
            rows.append([str(batch), "x".join(map(str, shape)), f"{shape[0]}->{cout}", str(calls),
                         *(_common.fmt(best[n], ".2f") for n in IMPLS),
                         _common.fmt(_common.ratio(best["conv"], best["matmul"]), ".2f"),
                         _common.fmt(_common.ratio(best["matmul"], best["kernel"]), ".2f"), rule])
        rows.append([str(batch), "all calls (x calls)", "", "", _common.fmt(totals["conv"], ".1f"),
                     _common.fmt(totals["matmul"], ".1f"), _common.fmt(totals["kernel"], ".1f"),
                     _common.fmt(_common.ratio(totals["conv"], totals["rule"]), ".2f"), "",
                     f"rule {totals['rule']:.1f}"])
        records.append(dict(batch=batch, totals_ms=totals))
    headers = ["batch", "x (per image)", "conv", "calls", "conv ms", "matmul ms", "kernel ms", "conv/matmul",
               "matmul/kernel", "rule"]
    rule = (f"rule: kernel for at most {_cpu.CONV1X1_KERNEL_MAX_IN_CHANNELS} input channels from "
            f"{_cpu.CONV1X1_KERNEL_MIN_POSITIONS} positions, else matmul from {_cpu.CONV1X1_MATMUL_MIN_POSITIONS}")
    text = (f"== 1x1 convolutions of {args.model} (eval, no_grad), {args.image_size} px, {torch.get_num_threads()} "
            f"threads, best of {args.rounds} rounds; {rule}; last row's ratio: conv / rule; malloc: {malloc} ==\n"
            + _common.table(headers, rows, left=2))
    _common.finish("conv1x1_route", args.json, _common.machine_info(), vars(args), records, text, start)


if __name__ == "__main__":
    main()
