"""SAN's stem (1x1 conv from the image, BN, ReLU, 2x2 max-pool): the fused op against the routes before it.

    python benchmarks/stem.py [--batches 1 8] [--image-size 224] [--width 64] [--rounds 10]

The stem writes a 64-channel map at the image's full resolution (103 MB at batch 8, 224 px) only to pool it.
Routes, rounds taken in turn, median shown:

* ``fused``    ``SANStem`` as the models run it: one op (``ops.conv1x1_batchnorm_relu_maxpool2x2`` in training,
  ``ops.conv1x1_affine_relu_maxpool2x2`` in eval) that never writes the full-resolution map;
* ``conv+op``  the convolution (oneDNN), then BN, ReLU and the pool as one op (``ops.batchnorm_relu_maxpool2x2``):
  the route the stem took in training before;
* ``modules``  conv, BN, ReLU and max-pool one by one (``with torchsan.ops.fusion(False)``).

``train``: ``stem.train()``, forward + backward (x needs no gradient, as an image); ``eval``: ``stem.eval()`` under
``torch.no_grad()``. Writes benchmarks/results/stem.json. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import torch  # noqa: E402

from torchsan import ops  # noqa: E402
from torchsan.layers import fused as fused_layers  # noqa: E402
from torchsan.models.san import SANStem  # noqa: E402


def conv_then_op(stem: SANStem, x: torch.Tensor) -> torch.Tensor:
    return fused_layers.norm_act_pool(stem.bn, stem.act, stem.pool, stem.conv(x))


def routes(stem: SANStem) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    def modules(x: torch.Tensor) -> torch.Tensor:
        with ops.fusion(False):
            return stem(x)

    return {"fused": stem, "conv+op": lambda x: conv_then_op(stem, x), "modules": modules}


def run(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, train: bool) -> float:
    t = time.perf_counter()
    with contextlib.nullcontext() if train else torch.no_grad():
        y = fn(x)
        if train:
            y.backward(torch.ones_like(y))
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width", type=int, default=64, help="the stem's output channels (SAN10: 64)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default=str(_common.RESULTS / "stem.json"))
    _common.add_malloc_flag(parser)
    args = parser.parse_args()
    start = time.perf_counter()
    malloc = _common.apply_malloc(args.malloc)
    torch.manual_seed(0)
    stem = SANStem(3, args.width, pool=True)
    with torch.no_grad():  # a BN that does something, so that the routes' agreement below means something
        stem.bn.weight.uniform_(0.5, 1.5)
        stem.bn.bias.uniform_(-0.5, 0.5)
        stem.bn.running_mean.normal_(0, 0.5)
        stem.bn.running_var.uniform_(0.5, 1.5)
    records, rows = [], []
    for mode in ("train", "eval"):
        train = mode == "train"
        stem.train(train)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.image_size, args.image_size)
            fns = routes(stem)
            with torch.no_grad():  # the routes compute the same function (eval: same running statistics)
                stem.eval()
                outs = [fn(x) for fn in fns.values()]
                stem.train(train)
            err = max((o - outs[-1]).abs().max().item() for o in outs)
            times: dict[str, list[float]] = {name: [] for name in fns}
            for fn in fns.values():  # warm-up
                run(fn, x, train)
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    times[name].append(run(fn, x, train))
            med = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
            records.append(dict(mode=mode, batch=batch, ms=med, samples_s=times, max_abs_diff_eval=err))
            rows.append([mode, str(batch), *(_common.fmt(med[n], ".2f") for n in fns),
                         _common.fmt(_common.ratio(med["fused"], med["conv+op"]), ".2f"),
                         _common.fmt(_common.ratio(med["fused"], med["modules"]), ".2f")])
    headers = ["mode", "batch", "fused ms", "conv+op ms", "modules ms", "fused/conv+op", "fused/modules"]
    text = (f"== SAN's stem 3 -> {args.width} channels + BN + ReLU + 2x2 max-pool, {args.image_size} px, "
            f"{torch.get_num_threads()} threads, median of {args.rounds} rounds (train: forward + backward); "
            f"malloc: {malloc} ==\n" + _common.table(headers, rows, left=2))
    _common.finish("stem", args.json, _common.machine_info(), vars(args), records, text, start)


if __name__ == "__main__":
    main()
