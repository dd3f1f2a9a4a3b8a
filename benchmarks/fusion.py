"""Forward+backward of one mapping triple (BN-ReLU-conv1x1 over a (N, C, K, L) grid): fused vs unfused.

    python benchmarks/mapping_triples.py [--repeats 5]

Shapes: SAN10 gamma at batch 8, 224 px: pairwise stages 1-4 ((rel + 2) -> rel -> mid / share over the
(K, L) grid) and patchwise stages 1 and 3 (rel * (K + 1) -> mid / share -> K * mid / share).
Columns, each the best of ``--repeats`` runs in milliseconds:
``conv`` (the 1x1 convolution alone, as torch runs it), ``bn+relu+conv`` (the unfused modules'
arithmetic: affine BN, ReLU, convolution) and ``fused`` (``torchsan.ops.bn_relu_conv``). The fused
op is used up to ``MAX_FUSED_IN_CHANNELS`` inputs and ``MAX_FUSED_OUT_CHANNELS`` outputs
(``torchsan.layers.mapping``). Writes
benchmarks/results/mapping_triples.json. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import torchsan  # noqa: E402
from torchsan.layers.mapping import MAX_FUSED_IN_CHANNELS, MAX_FUSED_OUT_CHANNELS  # noqa: E402

SHAPES = [
    # pairwise gamma, stages 1-4: (rel + 2) -> rel -> mid / share over the (K, L) grid
    ((8, 18, 49, 3136), 16), ((8, 16, 49, 3136), 8), ((8, 34, 49, 784), 32), ((8, 32, 49, 784), 16),
    ((8, 66, 49, 196), 64), ((8, 64, 49, 196), 32), ((8, 130, 49, 49), 128), ((8, 128, 49, 49), 64),
    # patchwise gamma, stages 1 and 3: rel * (K + 1) -> mid / share -> K * mid / share over (1, L)
    ((8, 800, 1, 3136), 8), ((8, 8, 1, 3136), 392), ((8, 3200, 1, 196), 32), ((8, 32, 1, 196), 1568),
]


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def measure(shape: tuple[int, ...], c_out: int, repeats: int) -> dict:
    c_in = shape[1]
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(c_out, c_in, 1, 1, requires_grad=True)
    scale, shift = (torch.rand(c_in) + 0.5).requires_grad_(), (0.1 * torch.randn(c_in)).requires_grad_()
    gy = torch.randn(shape[0], c_out, *shape[2:])
    affine = (scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1))

    def conv() -> None:
        F.conv2d(x, w).backward(gy)

    def unfused() -> None:
        F.conv2d(torch.relu(x * affine[0] + affine[1]), w).backward(gy)

    def fused() -> None:
        torchsan.ops.bn_relu_conv(x, scale, shift, w.view(c_out, c_in)).backward(gy)

    row = dict(shape=list(shape), c_in=c_in, c_out=c_out, conv_ms=best_ms(conv, repeats),
               unfused_ms=best_ms(unfused, repeats), fused_ms=best_ms(fused, repeats),
               fused_in_models=c_in <= MAX_FUSED_IN_CHANNELS and c_out <= MAX_FUSED_OUT_CHANNELS)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "mapping_triples.json"))
    _common.add_malloc_flag(p)
    args = p.parse_args()
    print(f"malloc: {_common.apply_malloc(args.malloc)}")
    torch.manual_seed(0)
    rows = []
    print(f"{'shape':<22} {'in->out':>8} {'pairs':>6} {'conv':>8} {'bn+relu+conv':>13} {'fused':>8} "
          f"{'unfused/fused':>13}  used")
    for shape, c_out in SHAPES:
        row = measure(shape, c_out, args.repeats)
        c_in = shape[1]
        rows.append(row)
        print(f"{str(tuple(shape)):<22} {f'{c_in}->{c_out}':>8} {c_in * c_out:>6} {row['conv_ms']:>8.1f} "
              f"{row['unfused_ms']:>13.1f} {row['fused_ms']:>8.1f} {row['unfused_ms'] / row['fused_ms']:>13.2f}  "
              f"{'fused' if row['fused_in_models'] else 'unfused'}", flush=True)
    Path(args.json).write_text(json.dumps(dict(threads=torch.get_num_threads(), rows=rows), indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
