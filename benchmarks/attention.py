"""The inference attention ops at SAN10's shapes: the fused kernels against the reference and a convolution.

    python benchmarks/attention.py [--batches 1 8] [--threads 2] [--repeats 15]

For each stage of SAN10 at 224 px (maps of 112/56/28/14/7 px, block channels C = 64/256/512/1024/2048; the relation
maps rel = C/16 channels, the values mid = C/4, the weights Cw = mid/8; a 3x3 footprint in stage 0, 7x7 after;
reflect padding; float32), the layer after its transforms, for inference (eval-mode BNs, under
``torch.inference_mode``):

* ``pairwise``  ``ops.pairwise_attention``: subtraction2 with the position encoding appended, gamma (BN-ReLU-conv1x1
  (rel + 2 -> rel), BN-ReLU-conv1x1 (rel -> Cw)), the softmax over the taps and the aggregation of the values;
* ``patchwise`` ``ops.patchwise_attention``: the concatenation relation (rel (K + 1) channels), gamma (-> mid / 8
  -> K Cw) and the aggregation.

Columns (milliseconds, median of ``--repeats`` round-robin samples): ``fused`` the ``cpu`` backend (its inference
kernel where the op takes one: stride 1, rows of at most 256 positions), ``reference`` the ``reference`` backend
(the unfolded (N, C, K, L) tensors), ``dw conv`` a depthwise k x k convolution on the values (channels-last, as in
benchmarks/ops.py: the aggregation's multiply-adds), and their ratios. Freed memory is kept for reuse
(``--malloc keep``, as in the other benchmarks), so that the reference's large tensors are not faulted in afresh
between samples. ``--json`` (default benchmarks/results/attention.json) keeps every sample. A measurement, not a
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
import torch.nn.functional as F  # noqa: E402

from torchsan import ops  # noqa: E402

# (map px, block channels C, footprint k) per SAN10 stage at 224 px
STAGES = [(112, 64, 3), (56, 256, 7), (28, 512, 7), (14, 1024, 7), (7, 2048, 7)]


def _norm(channels: int, gen: torch.Generator) -> tuple:
    return (torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen) * 0.1, 1e-5,
            torch.randn(channels, generator=gen) * 0.1, torch.rand(channels, generator=gen) + 0.5)


def _cases(batch: int, stage: int, gen: torch.Generator) -> tuple[dict[str, Callable[[], torch.Tensor]], torch.Tensor]:
    """(name -> a call of the op on this stage's shapes, the backend chosen by the caller; the values)."""
    px, c, k = STAGES[stage]
    rel, mid = c // 16, c // 4
    cw, area = mid // 8, k * k
    q, kk = torch.randn(batch, rel, px, px, generator=gen), torch.randn(batch, rel, px, px, generator=gen)
    v = torch.randn(batch, mid, px, px, generator=gen)
    append = torch.randn(1, 2, area, px * px, generator=gen)
    pairwise = (_norm(rel + 2, gen), torch.randn(rel, rel + 2, generator=gen) / (rel + 2) ** 0.5, _norm(rel, gen),
                torch.randn(cw, rel, generator=gen) / rel**0.5, torch.randn(cw, generator=gen))
    c_in, hidden = rel * (area + 1), mid // 8
    patchwise = (_norm(c_in, gen), torch.randn(hidden, c_in, generator=gen) / c_in**0.5, _norm(hidden, gen),
                 torch.randn(cw * area, hidden, generator=gen) / hidden**0.5, torch.randn(cw * area, generator=gen))
    fp = dict(kernel_size=k, padding=k // 2)
    return {
        "pairwise": lambda: ops.pairwise_attention(q, kk, v, *pairwise, append=append, **fp),
        "patchwise": lambda: ops.patchwise_attention(q, kk, v, *patchwise, **fp),
    }, v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--stages", nargs="+", type=int, choices=range(len(STAGES)), default=list(range(len(STAGES))))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-reference", action="store_true", help="skip the reference backend (slow at batch 8)")
    p.add_argument("--json", default=str(_common.RESULTS / "attention.json"))
    _common.add_malloc_flag(p)
    args = p.parse_args()
    start = time.perf_counter()
    malloc = _common.apply_malloc(args.malloc)  # (the reference's GB-sized tensors would be faulted in per call)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows, records = [], []
    with torch.inference_mode():
        for batch in args.batches:
            for stage in args.stages:
                cases, v = _cases(batch, stage, gen)
                k = STAGES[stage][2]
                runs: dict[str, Callable[[], object]] = {"dw conv": _depthwise(v, k, gen)}
                for name, call in cases.items():
                    runs[f"{name} fused"] = lambda call=call: _on("cpu", call)
                    if not args.no_reference:
                        runs[f"{name} reference"] = lambda call=call: _on("reference", call)
                samples: dict[str, list[float]] = {name: [] for name in runs}
                for run in runs.values():
                    run()  # warm-up
                for _ in range(args.repeats):
                    for name, run in runs.items():
                        t = time.perf_counter()
                        run()
                        samples[name].append((time.perf_counter() - t) * 1e3)
                med = {name: statistics.median(s) for name, s in samples.items()}
                for name in cases:
                    fused, ref = med[f"{name} fused"], med.get(f"{name} reference")
                    rows.append([f"s{stage} {name}", str(batch), f"{fused:.2f}", _common.fmt(ref, ".2f"),
                                 _common.fmt(_common.ratio(ref, fused), ".1f"), f"{med['dw conv']:.2f}",
                                 f"{fused / med['dw conv']:.2f}"])
                    records.append(dict(stage=stage, op=name, batch=batch, fused_ms=fused, reference_ms=ref,
                                        dw_conv_ms=med["dw conv"], samples=samples[f"{name} fused"]))
    text = (f"== attention ops for inference at SAN10's shapes, 224 px, {torch.get_num_threads()} threads, median of "
            f"{args.repeats} round-robin samples; malloc: {malloc} ==\n"
            + _common.table(["stage op", "batch", "fused ms", "reference ms", "ref/fused", "dw conv ms",
                             "fused/conv"], rows))
    _common.finish("attention", args.json, _common.machine_info() | {"malloc": malloc}, vars(args), records, text,
                   start)


def _depthwise(v: torch.Tensor, k: int, gen: torch.Generator) -> Callable[[], torch.Tensor]:
    """A depthwise k x k convolution on a channels-last copy of v (oneDNN's fast CPU layout)."""
    v_cl = v.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(v.shape[1], 1, k, k, generator=gen)
    return lambda: F.conv2d(v_cl, weight, padding=k // 2, groups=v.shape[1])


def _on(backend: str, call: Callable[[], torch.Tensor]) -> torch.Tensor:
    with ops.use_backend(backend):
        return call()


if __name__ == "__main__":
    main()
