"""Where the ``cpu`` backend fuses BatchNorm-ReLU-conv1x1: the measurements behind its rule, and the rule's answer.

    python benchmarks/fusion.py [--repeats 5] [--json benchmarks/results/fusion.json]
    python benchmarks/fusion.py --mode eval [--json benchmarks/results/fusion.eval.json]

Every row is one BatchNorm2d (training mode) -> ReLU -> 1x1 convolution, forward + backward, as the models run it:
gamma's triples over the (K, L) grid and the block's BN-ReLU-conv pairs over feature maps, at SAN10's shapes at
224 px (batch 8) and in the small-input form at 16 px (batch 32, the README's main job), pairwise and patchwise.
Columns (milliseconds, best of ``--repeats``): ``conv`` the 1x1 convolution alone; ``modules`` BatchNorm2d, ReLU and
the convolution one by one; ``fused`` ``torchsan.ops.batchnorm_relu_conv1x1``; ``fused/modules``; and ``rule``,
what ``torchsan.ops.should_fuse`` decides for the shape (``fused`` or ``modules``). A row where the rule picks the
slower route is marked ``<-``. ``--mode eval`` measures inference instead: an eval-mode BatchNorm2d (its running
statistics, so ``torchsan.ops.affine_relu_conv1x1``), forward only, under ``torch.inference_mode``. A measurement,
not a test.
"""

from __future__ import annotations

import argparse
import time

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from torchsan import ops  # noqa: E402

# (what, (N, Cin, *spatial), Cout)
SHAPES = [
    # pairwise gamma at 224 px, stages 0-4: (rel + 2) -> rel -> mid / share over the (K, L) grid
    ("pairwise gamma s0", (8, 6, 9, 12544), 4), ("pairwise gamma s0", (8, 4, 9, 12544), 2),
    ("pairwise gamma s1", (8, 18, 49, 3136), 16), ("pairwise gamma s1", (8, 16, 49, 3136), 8),
    ("pairwise gamma s2", (8, 34, 49, 784), 32), ("pairwise gamma s2", (8, 32, 49, 784), 16),
    ("pairwise gamma s3", (8, 66, 49, 196), 64), ("pairwise gamma s3", (8, 64, 49, 196), 32),
    ("pairwise gamma s4", (8, 130, 49, 49), 128), ("pairwise gamma s4", (8, 128, 49, 49), 64),
    # patchwise gamma at 224 px: rel * (K + 1) -> mid / share -> K * mid / share over (1, L)
    ("patchwise gamma s1", (8, 800, 1, 3136), 8), ("patchwise gamma s1", (8, 8, 1, 3136), 392),
    ("patchwise gamma s2", (8, 1600, 1, 784), 16), ("patchwise gamma s2", (8, 16, 1, 784), 784),
    ("patchwise gamma s3", (8, 3200, 1, 196), 32), ("patchwise gamma s3", (8, 32, 1, 196), 1568),
    ("patchwise gamma s4", (8, 6400, 1, 49), 64), ("patchwise gamma s4", (8, 64, 1, 49), 3136),
    # the block's pairs at 224 px: norm1 -> (phi | psi | beta) and norm2 -> proj
    ("block s0", (8, 64, 112, 112), 24), ("block s0", (8, 16, 112, 112), 64),
    ("block s1", (8, 256, 56, 56), 96), ("block s1", (8, 64, 56, 56), 256),
    ("block s2", (8, 512, 28, 28), 192), ("block s2", (8, 128, 28, 28), 512),
    ("block s3", (8, 1024, 14, 14), 384), ("block s3", (8, 256, 14, 14), 1024),
    ("block s4", (8, 2048, 7, 7), 768),
    # the small-input form at 16 px (stages at 16, 8, 4, 4, 4 px), batch 32
    ("small block s0", (32, 64, 16, 16), 24), ("small block s0", (32, 16, 16, 16), 64),
    ("small block s1", (32, 256, 8, 8), 96), ("small block s1", (32, 64, 8, 8), 256),
    ("small block s2", (32, 512, 4, 4), 192), ("small block s2", (32, 128, 4, 4), 512),
    ("small block s3", (32, 1024, 4, 4), 384), ("small block s3", (32, 256, 4, 4), 1024),
    ("small pairwise gamma s0", (32, 6, 9, 256), 4), ("small pairwise gamma s1", (32, 18, 49, 64), 16),
    ("small pairwise gamma s2", (32, 34, 49, 16), 32), ("small pairwise gamma s4", (32, 130, 49, 16), 128),
    ("small patchwise gamma s1", (32, 800, 1, 64), 8), ("small patchwise gamma s1", (32, 8, 1, 64), 392),
    ("small patchwise gamma s2", (32, 1600, 1, 16), 16), ("small patchwise gamma s2", (32, 16, 1, 16), 784),
]


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def measure_eval(shape: tuple[int, ...], c_out: int, repeats: int) -> dict:
    """Forward only, eval-mode BN (running statistics), under torch.inference_mode."""
    c_in = shape[1]
    x = torch.randn(shape)
    w, b = torch.randn(c_out, c_in, 1, 1) / c_in**0.5, torch.randn(c_out)
    bn_w, bn_b = torch.rand(c_in) + 0.5, 0.1 * torch.randn(c_in)
    mean, var = 0.1 * torch.randn(c_in), torch.rand(c_in) + 0.5
    scale = bn_w / (var + 1e-5).sqrt()
    shift = bn_b - mean * scale

    def conv() -> None:
        with torch.inference_mode():
            F.conv2d(x, w, b)

    def modules() -> None:
        with torch.inference_mode():
            F.conv2d(torch.relu(F.batch_norm(x, mean, var, bn_w, bn_b, False, 0.1, 1e-5)), w, b)

    def fused() -> None:
        with torch.inference_mode():
            ops.affine_relu_conv1x1(x, scale, shift, w.flatten(1), b)

    row = dict(shape=list(shape), c_in=c_in, c_out=c_out, conv_ms=best_ms(conv, repeats),
               modules_ms=best_ms(modules, repeats), fused_ms=best_ms(fused, repeats))
    row["rule"] = "fused" if ops.should_fuse("affine_relu_conv1x1", x, out_channels=c_out) else "modules"
    return row


def measure(shape: tuple[int, ...], c_out: int, repeats: int) -> dict:
    c_in = shape[1]
    x = torch.randn(shape, requires_grad=True)
    w = (torch.randn(c_out, c_in, 1, 1) / c_in**0.5).requires_grad_()
    b = torch.randn(c_out, requires_grad=True)
    bn_w, bn_b = (torch.rand(c_in) + 0.5).requires_grad_(), (0.1 * torch.randn(c_in)).requires_grad_()
    gy = torch.randn(shape[0], c_out, *shape[2:])

    def conv() -> None:
        F.conv2d(x, w, b).backward(gy)

    def modules() -> None:
        F.conv2d(torch.relu(F.batch_norm(x, None, None, bn_w, bn_b, True, 0.1, 1e-5)), w, b).backward(gy)

    def fused() -> None:
        ops.batchnorm_relu_conv1x1(x, bn_w, bn_b, 1e-5, w.flatten(1), b)[0].backward(gy)

    row = dict(shape=list(shape), c_in=c_in, c_out=c_out, conv_ms=best_ms(conv, repeats),
               modules_ms=best_ms(modules, repeats), fused_ms=best_ms(fused, repeats))
    row["rule"] = "fused" if ops.should_fuse("batchnorm_relu_conv1x1", x, out_channels=c_out) else "modules"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mode", choices=("train", "eval"), default="train",
                   help="train: training-mode BN, forward + backward; eval: running statistics, forward only")
    p.add_argument("--json", help="default benchmarks/results/fusion.json (fusion.eval.json with --mode eval)")
    _common.add_malloc_flag(p)
    args = p.parse_args()
    if args.json is None:
        args.json = str(_common.RESULTS / ("fusion.json" if args.mode == "train" else "fusion.eval.json"))
    start, machine = time.perf_counter(), _common.machine_info()
    malloc = _common.apply_malloc(args.malloc)
    torch.manual_seed(0)
    if ops.backend_for(torch.zeros(1)) != "cpu":
        raise SystemExit("the cpu backend is not available here; nothing to measure")
    records, rows = [], []
    for what, shape, c_out in SHAPES:
        row = dict(what=what, **(measure if args.mode == "train" else measure_eval)(shape, c_out, args.repeats))
        records.append(row)
        ratio = row["fused_ms"] / row["modules_ms"]
        wrong = (ratio < 1) != (row["rule"] == "fused")
        rows.append([what, str(tuple(shape)), f"{shape[1]}->{c_out}", _common.fmt(row["conv_ms"]),
                     _common.fmt(row["modules_ms"]), _common.fmt(row["fused_ms"]), f"{ratio:.2f}",
                     row["rule"] + (" <-" if wrong else "")])
        print("  ".join(rows[-1]), flush=True)
    text = _common.table(["what", "input", "in->out", "conv ms", "modules ms", "fused ms", "fused/modules", "rule"],
                         rows, left=2)
    _common.finish("fusion", args.json, machine, dict(repeats=args.repeats, mode=args.mode, malloc=malloc), records,
                   text, start)


if __name__ == "__main__":
    main()
