"""The fused CPU ops an eval forward runs, at SAN10's shapes, each against the plain PyTorch composition it replaces.

    python benchmarks/inference_ops.py [--batches 1 8] [--threads 2] [--repeats 15]
    python benchmarks/inference_ops.py --quick      # smoke run: batch 1, 3 samples; writes inference_ops.quick.json

The shapes and weights come from ``timm.create_model("san10_patchwise")`` at 224 px, in eval mode, its BNs given
random running statistics (so that their affine maps do something and the agreement check below means something);
so the shapes cannot drift from the model's. Float32, everything under ``torch.inference_mode()``:

* ``affine_relu_maxpool2x2`` ``ops.affine_relu_maxpool2x2(x, scale, shift)``: an eval BN as its per-channel affine
  map, ReLU and a 2x2 stride-2 max-pool, at the end of stages 0-3 (the stage's BN-ReLU before the next stage's
  pool; SAN10 pairwise has the same shapes): x (N, 64, 112, 112), (N, 256, 56, 56), (N, 512, 28, 28),
  (N, 1024, 14, 14). The reference writes ``x * scale + shift`` and its ReLU at full resolution, then pools.
* ``patchwise_weights`` ``ops.patchwise_weights``: the patchwise layer's mapping gamma (BN-ReLU-conv1x1-BN-ReLU-
  conv1x1) on its concatenation relation z = [phi(x)_i, psi(x)_j for j in the 7x7 footprint], with the parameters
  of the first block's layer in stages 3 and 4 (14 and 7 px; q, k (N, rel, H, W), z rel * 50 channels). The model
  calls it in stage 4, and in stage 3 where ``patchwise_attention``'s kernel does not take the layer (fewer images
  than threads). The ``cpu`` backend runs its ``patchwise_weights_inference`` kernel (running statistics, no
  gradient; neither z nor gamma's hidden layer written); the reference writes z (unfold, torch.cat) and runs gamma
  op by op.

Columns (milliseconds per call, median of ``--repeats`` samples): ``fused`` the op on the ``cpu`` backend,
``reference`` on the ``reference`` backend, ``ref/fused`` their ratio in this run. The two are sampled round-robin
(interleaved), so that a disturbance spreads over both; a sample repeats the call until the faster of the two lasts
``--min-sample-ms`` (``calls``, the same for both). Before timing, each case checks that the two outputs agree
(``torch.allclose``, rtol = atol = 1e-4) and stops if not. ``--json`` (default
benchmarks/results/inference_ops.json) keeps every sample. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import torchsan  # noqa: E402, F401  (registers the SAN models with timm)
from torchsan import ops  # noqa: E402
from torchsan.layers.fused import batchnorm_affine  # noqa: E402

MODEL = "san10_patchwise"
IMAGE_SIZE = 224
PATCHWISE_STAGES = (3, 4)  # 14 and 7 px at 224 px
BACKENDS = {"fused": "cpu", "reference": "reference"}
TOLERANCE = 1e-4


@dataclass
class Case:
    op: str
    stage: int
    shape: tuple[int, ...]  # the (first) input's
    call: Callable[[], torch.Tensor]  # the op, on whichever backend is selected around it


def build_model(gen: torch.Generator) -> nn.Module:
    """SAN10 patchwise in eval mode, every BN given random affine parameters and running statistics."""
    model = timm.create_model(MODEL).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


def stage_px(model: nn.Module, stage: int) -> int:
    return IMAGE_SIZE // model.feature_info[stage]["reduction"]


def pool_cases(model: nn.Module, batch: int, gen: torch.Generator) -> list[Case]:
    """The BN-ReLU-max-pool at the end of every stage that pools for the next one."""
    cases = []
    for t, stage in enumerate(model.stages):
        if not isinstance(stage.pool, nn.MaxPool2d):
            continue
        px = stage_px(model, t)
        x = torch.randn(batch, stage.norm.num_features, px, px, generator=gen)
        scale, shift = batchnorm_affine(stage.norm)
        cases.append(Case("affine_relu_maxpool2x2", t, tuple(x.shape),
                          lambda x=x, scale=scale, shift=shift: ops.affine_relu_maxpool2x2(x, scale, shift)))
    return cases


def _norm(bn: nn.BatchNorm2d) -> tuple[Any, ...]:
    """A BN as the ops take it: (weight, bias, eps, running_mean, running_var)."""
    return bn.weight, bn.bias, bn.eps, bn.running_mean, bn.running_var


def patchwise_cases(model: nn.Module, batch: int, gen: torch.Generator) -> list[Case]:
    """gamma of the concatenation relation with the parameters of the first patchwise layer of each stage."""
    cases = []
    for t in PATCHWISE_STAGES:
        attn = model.stages[t].blocks[0].attn
        if attn.relation != "concatenation" or len(attn.gamma) != 6:
            raise RuntimeError(f"stage {t}: expected the concatenation relation and gamma R-L-R-L, got "
                               f"{attn.relation!r} and {len(attn.gamma)} modules")
        bn1, _, conv1, bn2, _, conv2 = attn.gamma
        px = stage_px(model, t)
        q, k = (torch.randn(batch, attn.rel_channels, px, px, generator=gen) for _ in range(2))
        args = (_norm(bn1), conv1.weight.flatten(1), _norm(bn2), conv2.weight.flatten(1), conv2.bias,
                *attn.unfold.args)
        cases.append(Case("patchwise_weights", t, tuple(q.shape),
                          lambda q=q, k=k, args=args: ops.patchwise_weights(q, k, *args)[0]))
    return cases


def sample(backend: str, call: Callable[[], torch.Tensor], calls: int) -> float:
    """Milliseconds per call over ``calls`` calls on ``backend``."""
    with ops.use_backend(backend):
        t = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - t) * 1e3 / calls


def check(case: Case, batch: int) -> float:
    """The fused and reference outputs' largest difference; raises if they do not agree."""
    with ops.use_backend("cpu"):
        fused = case.call()
    with ops.use_backend("reference"):
        ref = case.call()
    where = f"{case.op} at stage {case.stage}, batch {batch}, input {case.shape}"
    if fused.shape != ref.shape:
        raise RuntimeError(f"{where}: fused output {tuple(fused.shape)}, reference {tuple(ref.shape)}")
    diff = (fused - ref).abs().max().item()
    if not torch.allclose(fused, ref, rtol=TOLERANCE, atol=TOLERANCE):
        raise RuntimeError(f"{where}: fused and reference disagree (max |diff| {diff:.3g}, rtol = atol = {TOLERANCE})")
    return diff


def measure(case: Case, repeats: int, min_sample_ms: float) -> tuple[int, dict[str, list[float]]]:
    """(calls per sample, name -> per-call ms of each sample), the implementations sampled round-robin."""
    for backend in BACKENDS.values():  # warm-up
        sample(backend, case.call, 1)
    single = {name: sample(backend, case.call, 1) for name, backend in BACKENDS.items()}
    faster = BACKENDS[min(single, key=single.__getitem__)]
    calls = 1  # doubled until a sample of the faster lasts min_sample_ms (one call's time overstates a warm loop's)
    while calls < 1024 and sample(faster, case.call, calls) * calls < min_sample_ms:
        calls *= 2
    samples: dict[str, list[float]] = {name: [] for name in BACKENDS}
    for _ in range(repeats):
        for name, backend in BACKENDS.items():
            samples[name].append(sample(backend, case.call, calls))
    return calls, samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 8 (1 with --quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="samples per implementation (default 15; 3 with --quick)")
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="a sample repeats the call until it lasts this long (default 5; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 1, 3 samples of at least 1 ms")
    p.add_argument("--json", default=None,
                   help="default benchmarks/results/inference_ops.json (inference_ops.quick.json with --quick)")
    _common.add_malloc_flag(p)
    args = p.parse_args()
    for name, full, small in (("batches", [1, 8], [1]), ("repeats", 15, 3), ("min_sample_ms", 5.0, 1.0)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    if args.json is None:
        args.json = str(_common.RESULTS / ("inference_ops.quick.json" if args.quick else "inference_ops.json"))
    start = time.perf_counter()
    malloc = _common.apply_malloc(args.malloc)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    model = build_model(gen)
    rows, records = [], []
    with torch.inference_mode():
        for batch in args.batches:
            for case in pool_cases(model, batch, gen) + patchwise_cases(model, batch, gen):
                diff = check(case, batch)
                calls, samples = measure(case, args.repeats, args.min_sample_ms)
                fused, ref = (statistics.median(samples[name]) for name in BACKENDS)
                rows.append([case.op, str(case.stage), str(batch), "x".join(map(str, case.shape)), str(calls),
                             f"{fused:.3f}", f"{ref:.3f}", _common.fmt(_common.ratio(ref, fused), ".2f")])
                records.append(dict(op=case.op, stage=case.stage, batch=batch, input_shape=list(case.shape),
                                    calls_per_sample=calls, fused_ms=fused, reference_ms=ref,
                                    ratio=_common.ratio(ref, fused), max_abs_diff=diff, samples_ms=samples))
    text = (f"== eval-mode fused CPU ops at {MODEL}'s shapes, {IMAGE_SIZE} px, {torch.get_num_threads()} "
            f"threads, median of {args.repeats} round-robin samples (ms per call); malloc: {malloc} ==\n"
            + _common.table(["op", "stage", "batch", "input", "calls", "fused ms", "reference ms", "ref/fused"],
                            rows))
    _common.finish("inference_ops", args.json, _common.machine_info() | {"malloc": malloc}, vars(args), records, text,
                   start)


if __name__ == "__main__":
    main()
