"""The GPU path in one run: correctness of the triton backend, op speed, and training steps of whole models.

Run from the repository root on a machine with one NVIDIA GPU (H100/H200: about 5 minutes)::

    python benchmarks/gpu.py                              # writes benchmarks/results/gpu.json and prints the tables
    python benchmarks/gpu.py --authors-repo ~/SAN         # also the authors' CuPy kernels (github.com/hszhao/SAN)
    python benchmarks/gpu.py --smoke                      # tiny shapes; runs on the CPU through Triton's interpreter

Sections (each measured in this one run, on the same device):

* ``correctness``: each op on the triton backend against the reference backend (plain PyTorch), forward and the
  gradients of every input, in float32 (max relative error, target 1e-5) and bfloat16 (target 1e-2), at a small
  shape with stride, dilation and both paddings; ``pairwise_logits`` (forward, and gradients against the modules'
  own error under autocast in bfloat16); and the pairwise layer against the same layer on the reference backend.
* ``ops``: forward + backward of aggregation, softmax_aggregation, subtraction2 (with the position encoding
  appended), subtraction and unfold at the shapes of SAN10's five stages at 224 px, batch 32 (float32): triton
  against the reference, and against the authors' kernels where ``--authors-repo`` points at their code (loaded
  from there at run time, never copied; CuPy's API changes since 2020 are bridged here, in the benchmark).
* ``layers``: a SAN10 block's pairwise layer after its transforms (relation, gamma, softmax, aggregation), training
  forward + backward at each stage: triton (``pairwise_logits``: z and gamma's activations never written), the
  modules on the reference backend, and the authors' kernels around the same gamma; ms and peak memory.
* ``train``: ms per training step (SGD, batch 32, 224 px) after warm-up, the first step's time (Triton compiles
  and autotunes then) and ``torch.cuda.max_memory_allocated``, for san10_pairwise, san10_patchwise and
  san19_pairwise against san_resnet26 and san_resnet50 (cuDNN, channels-last), in float32 and bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common

SAN10_STAGES = [  # (name, H = W at 224 px, block channels, kernel_size)
    ("s0", 112, 64, 3), ("s1", 56, 256, 7), ("s2", 28, 512, 7), ("s3", 14, 1024, 7), ("s4", 7, 2048, 7),
]
TRAIN_MODELS = ["san10_pairwise", "san10_patchwise", "san19_pairwise", "san_resnet26", "san_resnet50"]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(1000 * (time.perf_counter() - t0))
    return _common.median(samples)


def _relative_error(a: Any, b: Any) -> float:
    scale = b.double().abs().max().item()
    return (a.double() - b.double()).abs().max().item() / max(scale, 1e-30)


# --- the ops, on each implementation -----------------------------------------------------------------------------
def _op_cases(n: int, stages: list[tuple[str, int, int, int]], device: str) -> list[dict[str, Any]]:
    """Each op at each stage: dict(op, stage, k, make) where ``make()`` draws the op's inputs."""
    import torch

    def maps(c: int, size: int, batch: int = n) -> Any:
        return torch.randn(batch, c, size, size, device=device)

    def taps(c: int, k: int, size: int, batch: int = n, positive: bool = False) -> Any:
        t = torch.rand if positive else torch.randn
        return t(batch, c, k * k, size * size, device=device)

    cases = []
    for stage, size, channels, k in stages:
        mid, rel = channels // 4, max(channels // 16, 1)
        cw = max(mid // 8, 1)
        shape = dict(size=size, mid=mid, rel=rel, cw=cw, k=k)
        cases += [
            dict(op="aggregation", stage=stage, k=k,
                 make=lambda s=shape: (maps(s["mid"], s["size"]), taps(s["cw"], s["k"], s["size"], positive=True))),
            dict(op="softmax_aggregation", stage=stage, k=k,
                 make=lambda s=shape: (maps(s["mid"], s["size"]), taps(s["cw"], s["k"], s["size"]))),
            dict(op="subtraction2", stage=stage, k=k,
                 make=lambda s=shape: (maps(s["rel"], s["size"]), maps(s["rel"], s["size"]),
                                       taps(2, s["k"], s["size"], batch=1))),
            dict(op="subtraction", stage=stage, k=k, make=lambda s=shape: (maps(2, s["size"], batch=1),)),
            dict(op="unfold", stage=stage, k=k, make=lambda s=shape: (maps(s["rel"], s["size"]),)),
        ]
    return cases


def _torchsan_call(op: str, k: int) -> Callable[..., Any]:
    from torchsan import ops

    return {
        "aggregation": lambda a, w: ops.aggregation(a, w, k),
        "softmax_aggregation": lambda a, w: ops.softmax_aggregation(a, w, k),
        "subtraction2": lambda a, b, pos: ops.subtraction2(a, b, k, append=pos),
        "subtraction": lambda p: ops.subtraction(p, k),
        "unfold": lambda a: ops.unfold(a, k),
    }[op]


def _fwd_bwd(call: Callable[..., Any], inputs: tuple[Any, ...]) -> Callable[[], Any]:
    import torch

    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]

    def step() -> Any:
        out = call(*leaves)
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    return step


# --- the authors' kernels -------------------------------------------------------------------------------------------
def _load_authors(repo: str) -> Any:
    """Their ``lib.sa.functions`` (CuPy CUDA strings), with CuPy's renamed APIs bridged for them."""
    import cupy

    if not hasattr(cupy, "util"):  # cupy.util.memoize is cupy.memoize since CuPy 9
        cupy.util = type(sys)("cupy.util")
        cupy.util.memoize = cupy.memoize
    if not hasattr(cupy.cuda, "compile_with_cache"):  # removed in CuPy 11: RawModule compiles and caches

        class _Function:
            def __init__(self, kernel: Any) -> None:
                self.kernel = kernel

            def __call__(self, block: tuple, grid: tuple, args: list, stream: Any = None) -> None:
                with cupy.cuda.ExternalStream(stream.ptr) if stream is not None else cupy.cuda.Stream.null:
                    self.kernel(grid, block, tuple(cupy.uint64(a) if isinstance(a, int) else a for a in args))

        class _Module:
            def __init__(self, code: str) -> None:
                self.module = cupy.RawModule(code=code)

            def get_function(self, name: str) -> _Function:
                return _Function(self.module.get_function(name))

        cupy.cuda.compile_with_cache = _Module
    sys.path.insert(0, str(Path(repo).expanduser().resolve()))
    from lib.sa import functions

    return functions


def _authors_call(functions: Any, op: str, k: int) -> Callable[..., Any] | None:
    import torch

    pad = (k - 1) // 2
    if op == "aggregation":
        return lambda a, w: functions.aggregation_refpad(a, w, k, 1, pad, 1)
    if op == "softmax_aggregation":
        return lambda a, w: functions.aggregation_refpad(a, w.softmax(dim=2), k, 1, pad, 1)
    if op == "subtraction2":
        return lambda a, b, pos: torch.cat([functions.subtraction2_refpad(a, b, k, 1, pad, 1),
                                            pos.expand(a.shape[0], -1, -1, -1)], 1)
    if op == "subtraction":
        return lambda p: functions.subtraction_refpad(p, k, 1, pad, 1)
    return None  # unfold: not among their kernels


# --- sections ----------------------------------------------------------------------------------------------------
def correctness(device: str) -> list[dict[str, Any]]:
    import torch

    from torchsan import ops

    rows = []
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 1, None, 1, "reflect", 9, 7), (3, 2, None, 2, "zeros", 8, 9), (5, 1, None, 1, "reflect", 7, 7)]
    for dtype, target in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for k, s, p, d, mode, h, w in shapes:
            fp = dict(kernel_size=k, stride=s, padding=p, dilation=d, pad_mode=mode)
            ho, wo = ops.output_size((h, w), k, s, p, d)
            calls = _check_calls(fp, torch.randn(2, 8, h, w, generator=gen), k * k, ho * wo, gen)
            for name, (fn, inputs) in calls.items():
                results = []
                for backend, dt in (("triton", dtype), ("reference", torch.float64)):
                    # the reference sees the same (rounded) inputs: the error is the kernels', not the rounding's
                    leaves = [t.to(dtype).to(device, dt).requires_grad_(True) for t in inputs]
                    with ops.use_backend(backend):
                        out = fn(*leaves)
                        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
                        grad = grad.to(dtype).to(device, dt)
                        grads = torch.autograd.grad(out, leaves, grad)
                    results.append([out, *grads])
                error = max(_relative_error(a, b) for a, b in zip(*results))
                rows.append(dict(check=name, footprint=f"k{k} s{s} d{d} {mode} {h}x{w}", dtype=str(dtype)[6:],
                                 max_rel_error=error, target=target, ok=error <= target))
        rows += _pairwise_logits_check(device, dtype, target)
    rows.append(_layer_check(device))
    return rows


def _pairwise_logits_check(device: str, dtype: Any, target: float) -> list[dict[str, Any]]:
    """pairwise_logits (training-mode BNs) on the triton backend against the float64 reference, forward and every
    gradient, at channels under 16 (broadcast products) and of 16 (tl.dot). In bfloat16 the gradients' yardstick is
    the modules' own error under autocast: BN's backward cancels most of a gradient's size, so a bfloat16 forward's
    rounding shows several times larger there than in the output."""
    import torch

    from torchsan import ops

    rows = []
    gen = torch.Generator().manual_seed(2)
    fp = dict(kernel_size=3, stride=1, padding=None, dilation=1, pad_mode="reflect")
    h = w = 9
    for c, cm, cw in ((6, 4, 2), (14, 16, 16)):
        inputs = [torch.randn(2, c, h, w, generator=gen), torch.randn(2, c, h, w, generator=gen),
                  torch.randn(1, 2, 9, h * w, generator=gen), torch.rand(c + 2, generator=gen) + 0.5,
                  torch.randn(c + 2, generator=gen), torch.randn(cm, c + 2, generator=gen) / (c + 2) ** 0.5,
                  torch.rand(cm, generator=gen) + 0.5, torch.randn(cm, generator=gen),
                  torch.randn(cw, cm, generator=gen) / cm ** 0.5, torch.randn(cw, generator=gen)]

        def call(x1, x2, e, g1, b1, w1, g2, b2, w2, bias):
            return ops.pairwise_logits(x1, x2, (g1, b1, 1e-5, None, None), w1, (g2, b2, 1e-5, None, None), w2, bias,
                                       append=e, **fp)[0]

        runs = {}
        for label, backend, dt, autocast in (("triton", "triton", dtype, False),
                                             ("reference", "reference", torch.float64, False),
                                             ("modules", "reference", torch.float32, dtype != torch.float32)):
            leaves = [t.to(dtype).to(device, dt).requires_grad_(True) for t in inputs]
            region = torch.autocast(device, dtype=dtype) if autocast else contextlib.nullcontext()
            with ops.use_backend(backend), region:
                out = call(*leaves)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device, out.dtype)
            runs[label] = [out, *torch.autograd.grad(out, leaves, grad)]
        forward = _relative_error(runs["triton"][0], runs["reference"][0])
        backward = max(_relative_error(a, b) for a, b in zip(runs["triton"][1:], runs["reference"][1:]))
        modules = max(_relative_error(a, b) for a, b in zip(runs["modules"][1:], runs["reference"][1:]))
        grad_target = target if dtype == torch.float32 else max(target, 1.5 * modules)
        shape = f"k3 9x9 C{c}+2 Cm{cm} Cw{cw}"
        rows.append(dict(check="pairwise_logits forward", footprint=shape, dtype=str(dtype)[6:],
                         max_rel_error=forward, target=target, ok=forward <= target))
        rows.append(dict(check="pairwise_logits gradients", footprint=shape, dtype=str(dtype)[6:],
                         max_rel_error=backward, target=grad_target, ok=backward <= grad_target,
                         modules_under_autocast_error=modules if dtype != torch.float32 else None))
    return rows


def _check_calls(fp: dict[str, Any], x: Any, area: int, length: int, gen: Any) -> dict[str, tuple]:
    """Each op with footprint ``fp`` and its inputs (on the CPU, float32) for the correctness check."""
    import torch

    from torchsan import ops

    return {
        "aggregation": (lambda a, b: ops.aggregation(a, b, **fp), (x, torch.rand(2, 2, area, length, generator=gen))),
        "softmax_aggregation": (lambda a, b: ops.softmax_aggregation(a, b, **fp),
                                (x, torch.randn(2, 2, area, length, generator=gen))),
        "subtraction2": (lambda a, b, e: ops.subtraction2(a, b, **fp, append=e),
                         (x, torch.randn(x.shape, generator=gen), torch.randn(1, 2, area, length, generator=gen))),
        "subtraction": (lambda a: ops.subtraction(a, **fp), (x,)),
        "unfold": (lambda a: ops.unfold(a, **fp), (x,)),
    }


def _layer_check(device: str) -> dict[str, Any]:
    """A pairwise layer (training mode, forward + parameter gradients), triton backend against reference."""
    import torch

    from torchsan import layers, ops

    torch.manual_seed(0)
    layer = layers.PairwiseSelfAttention(32, 4, 32, share_planes=8, kernel_size=3).to(device).double()
    with torch.no_grad():  # no ReLU input exactly at 0 (fresh BN biases are 0): both routes' subgradients agree
        for param in layer.parameters():
            param.add_(0.1 * torch.randn_like(param))
    x = torch.randn(2, 32, 12, 12, device=device, dtype=torch.float64)
    outs = []
    for backend in ("triton", "reference"):
        layer.zero_grad()
        with ops.use_backend(backend):
            y = layer(x)
            y.square().sum().backward()
        outs.append([y.detach(), *[p.grad.clone() for p in layer.parameters()]])
    # relative to the largest value: the biases before a BatchNorm have gradients of zero (rounding noise)
    scale = max(b.abs().max().item() for b in outs[1])
    error = max((a - b).abs().max().item() for a, b in zip(*outs)) / scale
    return dict(check="pairwise layer", footprint="k3 12x12", dtype="float64", max_rel_error=error, target=1e-10,
                ok=error <= 1e-10)


def op_speed(device: str, batch: int, stages: list, repeats: int, authors: Any) -> list[dict[str, Any]]:
    from torchsan import ops

    rows = []
    for case in _op_cases(batch, stages, device):
        inputs = case["make"]()
        row = dict(op=case["op"], stage=case["stage"], k=case["k"])
        for label, backend in (("triton_ms", "triton"), ("reference_ms", "reference")):
            with ops.use_backend(backend):
                try:
                    row[label] = _time(_fwd_bwd(_torchsan_call(case["op"], case["k"]), inputs), device, repeats)
                except Exception as err:  # an out-of-memory reference at a large stage, say
                    row[label], row[f"{backend}_error"] = None, f"{type(err).__name__}: {err}"[:200]
        call = _authors_call(authors, case["op"], case["k"]) if authors is not None else None
        if call is not None:
            try:
                row["authors_ms"] = _time(_fwd_bwd(call, inputs), device, repeats)
            except Exception as err:
                row["authors_ms"], row["authors_error"] = None, f"{type(err).__name__}: {err}"[:200]
        rows.append(row)
    return rows


def layer_speed(device: str, batch: int, stages: list, repeats: int, authors: Any) -> list[dict[str, Any]]:
    """A SAN10 block's pairwise layer after its transforms (relation, gamma, softmax, aggregation), training mode,
    forward + backward: the triton backend (pairwise_logits + softmax_aggregation), the modules on the reference
    backend, and the authors' kernels around the same gamma modules; ms and peak memory above the inputs."""
    import torch

    from torchsan import layers, ops

    rows = []
    for stage, size, channels, k in stages:
        mid, rel = channels // 4, max(channels // 16, 1)
        layer = layers.PairwiseSelfAttention(channels, rel, mid, share_planes=8, kernel_size=k).to(device)
        q, kk = (torch.randn(batch, rel, size, size, device=device) for _ in range(2))
        v = torch.randn(batch, mid, size, size, device=device)
        row: dict[str, Any] = dict(stage=stage, k=k, batch=batch)
        calls = {"triton": ("triton", layer.attend), "reference": ("reference", layer.attend)}
        if authors is not None:
            calls["authors"] = ("reference", _authors_layer(authors, layer, k))
        for label, (backend, fn) in calls.items():
            leaves = [t.clone().requires_grad_(True) for t in (q, kk, v)]

            def step(fn=fn, leaves=leaves) -> None:
                out = fn(*leaves)
                torch.autograd.grad(out, leaves, torch.ones_like(out))

            with ops.use_backend(backend):
                try:
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    step()
                    if device == "cuda":
                        row[f"{label}_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                    row[f"{label}_ms"] = _time(step, device, repeats)
                except Exception as err:  # an out-of-memory reference at a large stage, say
                    row[f"{label}_ms"], row[f"{label}_error"] = None, f"{type(err).__name__}: {err}"[:200]
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _authors_layer(functions: Any, layer: Any, k: int) -> Callable[..., Any]:
    """The authors' pairwise layer after its transforms: their subtraction kernels and aggregation, our gamma."""
    import torch

    from torchsan.layers.attention import position_grid

    pad = (k - 1) // 2

    def attend(q: Any, kk: Any, v: Any) -> Any:
        p = functions.subtraction_refpad(layer.pos_proj(position_grid(q.shape[2], q.shape[3], q)), k, 1, pad, 1)
        z = torch.cat([functions.subtraction2_refpad(q, kk, k, 1, pad, 1), p.expand(q.shape[0], -1, -1, -1)], 1)
        w = layer.gamma(z).softmax(dim=2)
        return functions.aggregation_refpad(v, w, k, 1, pad, 1)

    return attend


def train_steps(device: str, batch: int, size: int, steps: int, models: list[str], tiny: bool) -> list[dict]:
    import torch

    import torchsan  # noqa: F401  (registers the models)

    rows = []
    for name in models:
        for precision in ("fp32", "bf16"):
            rows.append(_train_row(name, precision, device, batch, size, steps, tiny))
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _train_row(name: str, precision: str, device: str, batch: int, size: int, steps: int, tiny: bool) -> dict:
    """One model's training steps at one precision: step time, first step, peak memory (or the error)."""
    import timm
    import torch

    kwargs: dict[str, Any] = dict(num_classes=1000)
    if tiny:
        kwargs.update(num_classes=10, small_input=True)
        if "resnet" not in name:
            kwargs.update(layers=[1, 1, 1, 1, 1], widths=[16, 16, 32, 32, 32], stem_width=8, share_planes=4,
                          kernels=[3, 3, 3, 3, 3])
    channels_last = "resnet" in name
    row: dict[str, Any] = dict(model=name, precision=precision, batch=batch, image_size=size,
                               channels_last=channels_last)
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, **kwargs).to(device)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
        labels = torch.randint(0, kwargs["num_classes"], (batch,), device=device)

        def step() -> None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        row["first_step_ms"] = 1000 * (time.perf_counter() - t0)
        row["step_ms"] = _time(step, device, steps, warmup=2)
        row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:300]
    return row


def _tables(results: dict[str, Any]) -> str:
    fmt = _common.fmt
    parts = []
    rows = results["correctness"]
    parts.append("Correctness: triton backend against the reference (max relative error over output and gradients)")
    parts.append(_common.table(["check", "footprint", "dtype", "max rel error", "target", "ok"],
                               [[r["check"], r["footprint"], r["dtype"], f"{r['max_rel_error']:.1e}",
                                 f"{r['target']:.0e}", "yes" if r["ok"] else "NO"] for r in rows], left=3))
    rows = results["ops"]
    parts.append("\nOps, forward + backward (ms; ratios measured in this run)")
    parts.append(_common.table(
        ["op", "stage", "k", "triton", "reference", "authors", "ref/triton", "authors/triton"],
        [[r["op"], r["stage"], str(r["k"]), fmt(r.get("triton_ms"), ".3f"), fmt(r.get("reference_ms"), ".3f"),
          fmt(r.get("authors_ms"), ".3f"), fmt(_common.ratio(r.get("reference_ms"), r.get("triton_ms")), ".1f"),
          fmt(_common.ratio(r.get("authors_ms"), r.get("triton_ms")), ".1f")] for r in rows], left=2))
    rows = results["layers"]
    parts.append("\nA pairwise layer after its transforms, training forward + backward (ms; peak GiB above the inputs)")
    parts.append(_common.table(
        ["stage", "k", "triton", "reference", "authors", "ref/triton", "authors/triton", "triton GiB",
         "reference GiB", "authors GiB"],
        [[r["stage"], str(r["k"]), fmt(r.get("triton_ms"), ".3f"), fmt(r.get("reference_ms"), ".3f"),
          fmt(r.get("authors_ms"), ".3f"), fmt(_common.ratio(r.get("reference_ms"), r.get("triton_ms")), ".1f"),
          fmt(_common.ratio(r.get("authors_ms"), r.get("triton_ms")), ".1f"), fmt(r.get("triton_peak_gib"), ".2f"),
          fmt(r.get("reference_peak_gib"), ".2f"), fmt(r.get("authors_peak_gib"), ".2f")] for r in rows], left=1))
    rows = results["train"]
    base = {r["precision"]: r.get("step_ms") for r in rows if r["model"] == "san_resnet26"}
    parts.append("\nTraining steps (SGD; ms per step after warm-up, first step, peak memory)")
    parts.append(_common.table(
        ["model", "precision", "step ms", "first ms", "peak GiB", "/resnet26", "error"],
        [[r["model"], r["precision"], fmt(r.get("step_ms")), fmt(r.get("first_step_ms")),
          fmt(r.get("max_memory_gib"), ".2f"), fmt(_common.ratio(r.get("step_ms"), base.get(r["precision"])), ".2f"),
          r.get("error", "")[:60]] for r in rows], left=2))
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and models; on a CPU-only machine it runs "
                        "the kernels through Triton's interpreter (a check of this script, not a measurement)")
    parser.add_argument("--authors-repo", help="a copy of github.com/hszhao/SAN: also time their CuPy kernels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="output file (default benchmarks/results/gpu.json; gpu.smoke.json with --smoke)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.smoke and not os.path.exists("/dev/nvidiactl"):
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: it reads this once

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("benchmarks/gpu.py needs a CUDA GPU (or --smoke, which runs tiny shapes through Triton's "
              "interpreter on the CPU)", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _common.use_checkout()
    from torchsan.ops import _triton

    if not _triton.available():
        print(f"the triton backend cannot run here: {_triton.unavailable_reason()}", file=sys.stderr)
        return 2
    authors, authors_status = None, "not asked for (--authors-repo)"
    if args.authors_repo:
        try:
            authors, authors_status = _load_authors(args.authors_repo), "loaded"
        except Exception as err:
            authors_status = f"could not be loaded: {type(err).__name__}: {err}"
            traceback.print_exc()
    smoke = args.smoke
    batch = 2 if smoke else args.batch
    stages = [("s0", 8, 64, 3), ("s1", 6, 64, 5)] if smoke else SAN10_STAGES
    repeats = 1 if smoke else args.repeats
    machine = _common.machine_info()
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
        machine["cuda"] = torch.version.cuda
    import triton

    machine["triton"] = triton.__version__
    results = dict(correctness=correctness(device),
                   ops=op_speed(device, batch, stages, repeats, authors),
                   layers=layer_speed(device, batch, stages, repeats, authors),
                   train=train_steps(device, batch, 16 if smoke else 224, repeats,
                                     TRAIN_MODELS[:1] + TRAIN_MODELS[3:4] if smoke else TRAIN_MODELS, smoke))
    results["authors"] = authors_status
    text = _tables(results) + f"\n\nauthors' kernels: {authors_status}"
    path = args.json or str(_common.RESULTS / ("gpu.smoke.json" if smoke else "gpu.json"))
    config = dict(smoke=smoke, batch=batch, repeats=repeats, device=device, stages=[s[0] for s in stages])
    _common.finish("gpu", path, machine, config, [results], text, start)
    return 0 if all(r["ok"] for r in results["correctness"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
