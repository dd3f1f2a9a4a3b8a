"""The affine-ReLU-1x1-conv's GEMM: our register-blocked kernel against the BLAS that torch ships, at SAN10's shapes.

    python benchmarks/conv1x1_gemm.py [--batch 8] [--image-size 224] [--rounds 5] [--mode train|eval]

``affine_relu_conv1x1`` (y = W relu(scale * x + shift) + b over (N, Cin, P)) is the building block of the mapping
gamma, which runs over the K-times-larger (N, C, K, L) grid, and of the transforms around each attention layer.
Shapes: every call SAN10 pairwise makes in one forward at this batch and size (recorded by running the model).
Implementations, rounds taken in turn, best round shown:

* ``fused``  the ``cpu`` backend: the affine map and ReLU staged per sub-block of pixels and a small GEMM
  register-blocked for the vector width the kernels were built for; the BN-ReLU output is never written;
* ``blas``   ``relu(scale * x + shift)`` written whole, then ``torch.matmul(W, .)`` (MKL/oneDNN through at::mm).

``--mode eval``: forward only, under ``torch.no_grad()`` (inference); ``train``: forward + backward (gradients of x,
scale, shift, W and b). Writes benchmarks/results/conv1x1_gemm_MODE.json. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import torch  # noqa: E402

from torchsan import ops  # noqa: E402


def model_shapes(batch: int, image_size: int) -> Counter:
    """(x's shape, Cout) of every affine_relu_conv1x1 call of SAN10 pairwise (eval) at this batch and size."""
    import timm

    import torchsan  # noqa: F401  (registers the models)

    seen: Counter = Counter()
    original = ops.affine_relu_conv1x1

    def spy(x, scale, shift, weight, bias=None, residual=None):  # type: ignore[no-untyped-def]
        seen[(tuple(x.shape), weight.shape[0])] += 1  # (the shortcut added in the epilogue: the same product)
        return original(x, scale, shift, weight, bias, residual=residual)

    ops.affine_relu_conv1x1 = spy
    try:
        model = timm.create_model("san10_pairwise").eval()
        with torch.no_grad():
            model(torch.randn(1, 3, image_size, image_size))
    finally:
        ops.affine_relu_conv1x1 = original
    return Counter({((batch, *shape[1:]), cout): n for (shape, cout), n in seen.items()})


def blas(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    view = (1, -1) + (1,) * (x.dim() - 2)
    t = torch.relu(x * scale.view(view) + shift.view(view)).flatten(2)
    return (torch.matmul(w, t) + b[:, None]).view(x.shape[0], w.shape[0], *x.shape[2:])


def fused(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with ops.use_backend("cpu"):
        return ops.affine_relu_conv1x1(x, scale, shift, w, b)


IMPLS: dict[str, Callable[..., torch.Tensor]] = {"fused": fused, "blas": blas}


def run(fn: Callable[..., torch.Tensor], inputs: tuple, train: bool) -> float:
    t = time.perf_counter()
    if train:
        y = fn(*inputs)
        torch.autograd.grad(y, inputs, torch.ones_like(y))
    else:
        with torch.no_grad():
            fn(*inputs)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", choices=("train", "eval"), default="eval")
    parser.add_argument("--json", default=None, help="default benchmarks/results/conv1x1_gemm_MODE.json")
    _common.add_malloc_flag(parser)
    args = parser.parse_args()
    start = time.perf_counter()
    malloc = _common.apply_malloc(args.malloc)
    torch.manual_seed(0)
    train = args.mode == "train"
    records, rows = [], []
    totals = {name: 0.0 for name in IMPLS}
    for (shape, cout), calls in sorted(model_shapes(args.batch, args.image_size).items(), key=lambda kv: kv[0][0][1]):
        cin = shape[1]
        x = torch.randn(shape, requires_grad=train)
        scale, shift = torch.rand(cin) + 0.5, 0.1 * torch.randn(cin)
        w, b = torch.randn(cout, cin) / cin**0.5, 0.1 * torch.randn(cout)
        inputs = (x, scale.requires_grad_(train), shift.requires_grad_(train), w.requires_grad_(train),
                  b.requires_grad_(train))
        with torch.no_grad():
            err = (fused(*inputs) - blas(*inputs)).abs().max().item()
        times: dict[str, list[float]] = {name: [] for name in IMPLS}
        for fn in IMPLS.values():  # warm-up
            run(fn, inputs, train)
        for _ in range(args.rounds):
            for name, fn in IMPLS.items():
                times[name].append(run(fn, inputs, train))
        best = {name: 1e3 * min(times[name]) for name in IMPLS}
        for name in IMPLS:
            totals[name] += calls * best[name]
        positions = x.numel() // (shape[0] * cin)
        gflop = 2 * shape[0] * positions * cin * cout * (3 if train else 1) / 1e9
        records.append(dict(x=list(shape), cout=cout, calls=calls, gflop=gflop, ms=best, samples_s=times,
                            max_abs_diff=err))
        rows.append(["x".join(map(str, shape)), f"{cin}->{cout}", str(calls), _common.fmt(gflop, ".3f"),
                     *(_common.fmt(best[n], ".2f") for n in IMPLS),
                     *(_common.fmt(gflop / best[n] * 1e3, ".1f") for n in IMPLS),
                     _common.fmt(_common.ratio(best["blas"], best["fused"]), ".2f")])
    rows.append(["all calls (x calls)", "", "", "", *(_common.fmt(totals[n], ".1f") for n in IMPLS), "", "",
                 _common.fmt(_common.ratio(totals["blas"], totals["fused"]), ".2f")])
    headers = ["x", "conv", "calls", "GFLOP", "fused ms", "blas ms", "fused GFLOP/s", "blas GFLOP/s", "blas/fused"]
    what = "forward + backward" if train else "forward, no_grad"
    text = (f"== affine_relu_conv1x1 at SAN10 pairwise's shapes, {what}, batch {args.batch}, {args.image_size} px, "
            f"{torch.get_num_threads()} threads, best of {args.rounds} rounds; malloc: {malloc} ==\n"
            + _common.table(headers, rows, left=2))
    json_path = args.json or str(_common.RESULTS / f"conv1x1_gemm_{args.mode}.json")
    _common.finish("conv1x1_gemm", json_path, _common.machine_info(), vars(args), records, text, start)


if __name__ == "__main__":
    main()
