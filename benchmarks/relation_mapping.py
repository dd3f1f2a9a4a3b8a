"""z = [phi(x_i) - psi(x_j), p_i - p_j] and gamma's first BN-ReLU-conv1x1, forward + backward: z written or gathered.

    python benchmarks/relation_mapping.py [--rounds 5] [--stages 0 1 2 3 4]

The pairwise attention's relation z (N, rel + 2, K, L) is K times the size of phi(x) and psi(x). Shapes: SAN10 at
batch 8, 224 px, stages 0-4 (phi(x), psi(x): (8, rel, H, W), the position encoding (1, 2, K, L), gamma's first triple
rel + 2 -> rel, training-mode BN with gradients through the batch statistics). Implementations, in one process,
rounds taken in turn so that a slow phase of the shared machine hits each alike; the table shows the best round:

* ``written``  the ``cpu`` backend's ``subtraction2(q, k, append=p)`` then ``batchnorm_relu_conv1x1(z, ...)``: z is
  written, read by the statistics, the triple and its backward, and kept for backward;
* ``gathered`` ``ops.subtraction2_batchnorm_relu_conv1x1`` (``cpu``): z's rows are gathered from q, k and p where they
  are needed and never written; what the pairwise layer runs where ``ops.should_fuse`` says so (the ``used`` column);
* ``reference`` the plain-PyTorch backend (F.unfold), the two ops one after the other.

``kept MB``: the bytes autograd saves for backward (distinct storages, the inputs excluded) in one forward of each:
z and its statistics when written, nothing K-sized when gathered. Writes benchmarks/results/relation_mapping.json.
A measurement, not a test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import torch  # noqa: E402

from torchsan import ops  # noqa: E402

# SAN10 stages: (block channels C, footprint k); rel = C / 16.
STAGES = ((64, 3), (256, 7), (512, 7), (1024, 7), (2048, 7))
IMPLS = ("written", "gathered", "reference")


def build(stage: int, batch: int, image_size: int) -> tuple[dict[str, Callable[[], tuple]], tuple, dict]:
    channels, k = STAGES[stage]
    rel, h = channels // 16, image_size // 2 ** (stage + 1)
    q, kk = torch.randn(batch, rel, h, h, requires_grad=True), torch.randn(batch, rel, h, h, requires_grad=True)
    p = (torch.randn(1, 2, k * k, h * h) * 0.5).requires_grad_()
    weight, bias = (torch.rand(rel + 2) + 0.5).requires_grad_(), (0.1 * torch.randn(rel + 2)).requires_grad_()
    conv = (torch.randn(rel, rel + 2) / (rel + 2) ** 0.5).requires_grad_()
    inputs = (q, kk, p, weight, bias, conv)

    def written() -> tuple:
        z = ops.subtraction2(q, kk, k, append=p)
        return ops.batchnorm_relu_conv1x1(z, weight, bias, 1e-5, conv)

    def gathered() -> tuple:
        return ops.subtraction2_batchnorm_relu_conv1x1(q, kk, weight, bias, 1e-5, conv, kernel_size=k, append=p)

    shape = dict(q=(batch, rel, h, h), z=(batch, rel + 2, k * k, h * h), conv=(rel, rel + 2))
    return {"written": written, "gathered": gathered, "reference": written}, inputs, shape


def step(fn: Callable[[], tuple], inputs: tuple, backend: str, gy: torch.Tensor) -> float:
    t = time.perf_counter()
    with ops.use_backend(backend):
        y, mean, var = fn()
        torch.autograd.grad((y, mean, var), inputs, (gy, torch.ones_like(mean), torch.ones_like(var)))
    return time.perf_counter() - t


def kept_bytes(fn: Callable[[], tuple], inputs: tuple, backend: str) -> int:
    """Bytes of the distinct storages autograd saves in one forward, the inputs' own excluded."""
    seen, skip = {}, {t.untyped_storage().data_ptr() for t in inputs}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with ops.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=list(range(len(STAGES))))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=str(_common.RESULTS / "relation_mapping.json"))
    _common.add_malloc_flag(parser)
    args = parser.parse_args()
    start = time.perf_counter()
    malloc = _common.apply_malloc(args.malloc)
    torch.manual_seed(0)
    records, rows = [], []
    for stage in args.stages:
        fns, inputs, shape = build(stage, args.batch, args.image_size)
        backends = {"written": "cpu", "gathered": "cpu", "reference": "reference"}
        with torch.no_grad():
            y = fns["written"]()[0]
        gy = torch.randn_like(y)
        times: dict[str, list[float]] = {name: [] for name in IMPLS}
        for name in IMPLS:  # warm-up
            step(fns[name], inputs, backends[name], gy)
        for _ in range(args.rounds):
            for name in IMPLS:
                times[name].append(step(fns[name], inputs, backends[name], gy))
        best = {name: 1e3 * min(times[name]) for name in IMPLS}
        kept = {name: kept_bytes(fns[name], inputs, backends[name]) / 1e6 for name in IMPLS}
        used = ops.should_fuse("subtraction2_batchnorm_relu_conv1x1", inputs[0], out_channels=shape["conv"][0],
                               positions=shape["q"][2] * shape["q"][3])
        records.append(dict(stage=stage, shapes=shape, ms=best, samples_s=times, kept_mb=kept, used_in_models=used))
        rows.append([str(stage), "x".join(map(str, shape["z"])), f"{shape['conv'][1]}->{shape['conv'][0]}",
                     *(_common.fmt(best[n]) for n in IMPLS),
                     _common.fmt(_common.ratio(best["gathered"], best["written"]), ".2f"),
                     _common.fmt(_common.ratio(best["reference"], best["gathered"]), ".1f"),
                     *(_common.fmt(kept[n]) for n in ("written", "gathered")),
                     "gathered" if used else "written"])
        print(f"stage {stage} done", flush=True)
    headers = ["stage", "z", "triple", "written ms", "gathered ms", "ref ms", "gathered/written", "ref/gathered",
               "kept MB written", "kept MB gathered", "in the models"]
    text = (f"== z + gamma's first triple, forward + backward, batch {args.batch}, {args.image_size} px, "
            f"{torch.get_num_threads()} threads, best of {args.rounds} rounds; malloc: {malloc} ==\n"
            + _common.table(headers, rows, left=3))
    _common.finish("relation_mapping", args.json, _common.machine_info(), vars(args), records, text, start)


if __name__ == "__main__":
    main()
