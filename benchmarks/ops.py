"""Benchmark of the SAN primitives at SAN10's real shapes: fused CPU kernels vs reference vs convolutions.

Run from the repository root (no install needed; with ``pip install -e .`` it measures the same code)::

    python benchmarks/ops.py                 # batch 8, 224 px: every op at every SAN10 stage
    python benchmarks/ops.py --quick         # smoke run: batch 2, fewer repetitions
    python benchmarks/ops.py --threads 2 --json benchmarks/results/ops.json

What is measured, for each op at each stage of SAN10 (224 px, stages at 112/56/28/14/7 px; block
channels C = 64/256/512/1024/2048, so the aggregation's values have mid = C/4 channels, its weights
Cw = mid/8 channels, and the relation maps rel = C/16 channels; footprint 3x3 in stage 0, 7x7 after;
reflect padding, float32):

* ``aggregation``  x (N, mid, H, W), weights (N, Cw, K, L) (softmax-normalised random numbers);
* ``subtraction2`` phi(x), psi(x): (N, rel, H, W) x 2 -> (N, rel, K, L);
* ``subtraction``  the position grid (1, 2, H, W) -> (1, 2, K, L);
* ``unfold``       psi(x) (N, rel, H, W) -> (N, rel, K, L) (patchwise attention's patch);
* ``clique_products`` the unfolded phi(x), psi(x): (N, rel, K, L) x 2 -> (N, K, K, L) (the patchwise clique
  relation).

Implementations, all measured in the same run on the same tensors:

* ``fused``      ``torchsan.ops.use_backend("cpu")``: the fused C++/OpenMP kernels;
* ``reference``  ``torchsan.ops.use_backend("reference")``: plain PyTorch (F.unfold);
* ``depthwise``  a convolution baseline on the same input. For the aggregation: the depthwise k x k
  convolution (groups=C; same multiply-adds as the aggregation, the fused kernel's natural target).
  For the gathers (subtraction2, subtraction, unfold): the depthwise k x k convolution with K
  output channels per input channel, which produces a tensor of exactly the op's output size (an
  unfold written as a convolution: K times more multiply-adds than a gather needs). For clique_products: a
  1x1 convolution rel -> K * K channels of one tap of q, (N, rel, 1, L): the same output size and multiply-adds;
* ``traffic``    gathers only: the memory traffic any gather must cause, as a yardstick. A Python
  ``torch.autograd.Function`` whose forward writes a tensor of the op's output size (``fill_``) and
  whose backward reads the output gradient once (``sum``) and writes the input-sized gradients
  (``full_like``). So ``ref/traffic`` bounds what ``ref/fused`` can be for a kernel that writes its
  output with ordinary stores (streaming stores, which skip reading each line first, can beat it);
* ``dense3x3``   aggregation only: a dense 3x3 convolution C -> C on the same input.
  Convolutions pad with zeros (PyTorch's native padding); the SAN ops pad by reflection.
  Convolutions run on a channels-last copy of the input (made once, outside the timing): that is
  oneDNN's fast CPU path. In NCHW the depthwise weight gradient is pathological here (0.3 to 8 s
  for the headline shape, against about 0.05 s channels-last); ``--conv-layout nchw`` measures it.

Modes: ``forward`` (under ``torch.no_grad()``) and ``forward_backward`` (forward with autograd, then
``torch.autograd.grad`` of the output, with a fixed random output gradient, with respect to every
input: x and the weights for the aggregation, both maps for subtraction2, the weights of the
convolutions too).

Time: each implementation is warmed up, then each sample times enough back-to-back calls to last at
least ``--min-sample-ms`` (one call for everything but the smallest shapes) and divides; samples of
the implementations of one case are taken round-robin, so that a disturbance on this shared machine
spreads over all of them; the table shows the median sample.

Memory: PyTorch has no allocator statistics on CPU, and RSS is too coarse (the allocator keeps
freed pages), so the script records every allocation and free of the call with
``torch.profiler.profile(profile_memory=True)`` (one extra, untimed call) and takes the peak of the
running sum of allocated bytes: ``peak`` = the most bytes the call had allocated at any moment
beyond what existed before it (its outputs and returned gradients included). This reproduces the
known fact that the reference aggregation allocates the (N, C, K, L) unfolded tensor (and the
product with the weights, of the same size), about 2K times its input, while the fused kernel
allocates only its output (``ref/in`` column: peak over input bytes). Not seen by the profiler:
the fused kernels' per-thread scratch (a few padded planes, std::vector) and oneDNN's internal
buffers; both are small next to the tensors. ``kept`` is measured in a separate forward with
autograd: the bytes of the tensors autograd saves for backward (``saved_tensors_hooks``, distinct
storages, the op's own inputs excluded) plus the output: what the op holds alive between forward and
backward inside a model (the reference aggregation keeps the unfolded tensor, the fused one nothing).

Output: a table per mode and ``--json`` (default ``benchmarks/results/ops.json``;
``ops.quick.json`` with ``--quick``) with every sample, the machine and the command line.
These are measurements, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Kineto (the profiler) prints a line per session on stderr otherwise; must be set before torch loads.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import _common  # noqa: E402

_common.use_checkout()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from torchsan import ops  # noqa: E402

OPS = ("aggregation", "subtraction2", "subtraction", "unfold", "clique_products")
MODES = ("forward", "forward_backward")
# SAN10 stages: (block channels C, footprint k); mid = C/4, rel = C/16, Cw = mid/8 (share_planes 8).
STAGES = ((64, 3), (256, 7), (512, 7), (1024, 7), (2048, 7))
SHARE = 8
HEADLINE = ("aggregation", 1)  # (8, 64, 56, 56), k = 7, 8 weight channels at batch 8, 224 px


@dataclass
class Impl:
    """One implementation of one case: a forward closure and the tensors gradients are taken for."""

    forward: Callable[[], torch.Tensor]
    grad_inputs: tuple[torch.Tensor, ...]
    backend: str | None = None  # torchsan backend to select around the call
    grad_output: torch.Tensor | None = None
    iters: dict[str, int] = field(default_factory=dict)

    def call(self, mode: str) -> Any:
        if self.backend is None:
            return self._run(mode)
        with ops.use_backend(self.backend):
            return self._run(mode)

    def _run(self, mode: str) -> Any:
        if mode == "forward":
            with torch.no_grad():
                return self.forward()
        out = self.forward()
        return torch.autograd.grad(out, self.grad_inputs, self.grad_output)


@dataclass
class Case:
    op: str
    stage: int
    kernel_size: int
    weight_channels: int | None
    shapes: dict[str, tuple[int, ...]]
    impls: dict[str, Impl]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return next(iter(self.shapes.values()))

    @property
    def input_bytes(self) -> int:
        return math.prod(self.input_shape) * 4


class _Traffic(torch.autograd.Function):
    """Writes an output of the given shape, then reads its gradient once: a gather's unavoidable traffic."""

    @staticmethod
    def forward(ctx, shape: tuple[int, ...], *inputs: torch.Tensor) -> torch.Tensor:
        ctx.like = inputs
        return inputs[0].new_empty(shape).fill_(1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        total = grad.sum()
        return (None, *(torch.full_like(t, total.item()) for t in ctx.like))


def _param(*shape: int, softmax_dim: int | None = None) -> torch.Tensor:
    t = torch.randn(*shape)
    if softmax_dim is not None:
        t = t.softmax(softmax_dim)
    return t.requires_grad_()


def build_case(op: str, stage: int, batch: int, image_size: int, conv_layout: str = "channels_last") -> Case:
    channels, k = STAGES[stage]
    mid, rel = channels // 4, channels // 16
    cw = mid // SHARE
    h = image_size // 2 ** (stage + 1)
    area, pad = k * k, k // 2
    impls: dict[str, Impl] = {}
    fmt = torch.channels_last if conv_layout == "channels_last" else torch.contiguous_format

    def conv_input(t: torch.Tensor) -> torch.Tensor:  # the same values, in the convolutions' layout
        return t.detach().contiguous(memory_format=fmt).requires_grad_()

    def san(fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
        impls["fused"] = Impl(fn, inputs, backend="cpu")
        impls["reference"] = Impl(fn, inputs, backend="reference")

    if op == "aggregation":
        x, w = _param(batch, mid, h, h), _param(batch, cw, area, h * h, softmax_dim=2)
        shapes = {"x": tuple(x.shape), "weight": tuple(w.shape)}
        san(lambda: ops.aggregation(x, w, k), (x, w))
        xc, dw, dense = conv_input(x), _param(mid, 1, k, k), _param(mid, mid, 3, 3)
        impls["depthwise"] = Impl(lambda: F.conv2d(xc, dw, padding=pad, groups=mid), (xc, dw))
        impls["dense3x3"] = Impl(lambda: F.conv2d(xc, dense, padding=1), (xc, dense))
        return Case(op, stage, k, cw, shapes, impls)

    if op == "clique_products":
        q, kk = _param(batch, rel, area, h * h), _param(batch, rel, area, h * h)
        shapes = {"q": tuple(q.shape), "k": tuple(kk.shape)}
        san(lambda: ops.clique_products(q, kk), (q, kk))
        qc, w = conv_input(q[:, :, :1]), _param(area * area, rel, 1, 1)  # same output size and multiply-adds
        impls["depthwise"] = Impl(lambda: F.conv2d(qc, w), (qc, w))
        inputs = impls["fused"].grad_inputs
        out_shape = (batch, area, area, h * h)
        impls["traffic"] = Impl(lambda: _Traffic.apply(out_shape, *inputs), inputs)
        return Case(op, stage, k, None, shapes, impls)

    if op == "subtraction2":
        x1, x2 = _param(batch, rel, h, h), _param(batch, rel, h, h)
        shapes = {"x1": tuple(x1.shape), "x2": tuple(x2.shape)}
        san(lambda: ops.subtraction2(x1, x2, k), (x1, x2))
        x, c = x2, rel
    elif op == "subtraction":
        x = _param(1, 2, h, h)
        shapes = {"x": tuple(x.shape)}
        san(lambda: ops.subtraction(x, k), (x,))
        c = 2
    elif op == "unfold":
        x = _param(batch, rel, h, h)
        shapes = {"x": tuple(x.shape)}
        san(lambda: ops.unfold(x, k), (x,))
        c = rel
    else:
        raise ValueError(f"unknown op {op!r}")
    xc, wg = conv_input(x), _param(c * area, 1, k, k)  # K outputs per channel: the op's output size
    impls["depthwise"] = Impl(lambda: F.conv2d(xc, wg, padding=pad, groups=c), (xc, wg))
    inputs = impls["fused"].grad_inputs
    out_shape = (x.shape[0], c, area, h * h)
    impls["traffic"] = Impl(lambda: _Traffic.apply(out_shape, *inputs), inputs)
    return Case(op, stage, k, None, shapes, impls)


# --- measurement -------------------------------------------------------------------------------
def profiled_peak(fn: Callable[[], Any]) -> int | None:
    """Peak bytes allocated beyond the starting point during one call (see the module docstring)."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch without this (semi-private) accessor
        return None
    allocs = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"), key=lambda a: a[0])
    live = peak = 0
    for _, nbytes in allocs:
        live += nbytes
        peak = max(peak, live)
    return peak


def kept_bytes(impl: Impl) -> int:
    """Bytes of saved-for-backward tensors (not the op's inputs) plus the output, after a forward."""
    inputs = {t.untyped_storage().data_ptr() for t in impl.grad_inputs}
    held: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if impl.backend is None:
            out = impl.forward()
        else:
            with ops.use_backend(impl.backend):
                out = impl.forward()
    held[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    del out
    return sum(held.values())


def calibrate(impl: Impl, mode: str, warmup: int, min_sample_s: float) -> int:
    """Warm up; return how many calls one timing sample needs to last ``min_sample_s``."""
    for _ in range(max(warmup, 1)):
        impl.call(mode)
    start = time.perf_counter()
    impl.call(mode)
    once = time.perf_counter() - start
    return max(1, min(10_000, math.ceil(min_sample_s / max(once, 1e-7))))


def sample(impl: Impl, mode: str) -> float:
    n = impl.iters[mode]
    start = time.perf_counter()
    for _ in range(n):
        impl.call(mode)
    return (time.perf_counter() - start) / n


def measure_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """All implementations, both modes: samples (round-robin), peaks, kept bytes, agreement."""
    record: dict[str, Any] = {
        "op": case.op, "stage": case.stage, "kernel_size": case.kernel_size,
        "weight_channels": case.weight_channels, "shapes": case.shapes, "input_bytes": case.input_bytes,
        "impls": {name: {"error": None} for name in case.impls},
    }
    alive = dict(case.impls)

    def fail(name: str, err: BaseException) -> None:
        record["impls"][name]["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"
        if args.verbose:
            traceback.print_exc()
        alive.pop(name, None)

    for name, impl in list(alive.items()):
        try:
            with torch.no_grad():
                out = impl.call("forward")
            impl.grad_output = torch.randn_like(out)
            record["impls"][name]["output_shape"] = tuple(out.shape)
            del out
        except Exception as err:  # record and carry on: one broken shape must not stop the run
            fail(name, err)

    if "fused" in alive and "reference" in alive:
        try:
            with torch.no_grad():
                diff = (case.impls["fused"].call("forward") - case.impls["reference"].call("forward")).abs().max()
            record["max_abs_diff_fused_vs_reference"] = float(diff)
        except Exception as err:
            record["max_abs_diff_fused_vs_reference"] = f"{type(err).__name__}: {err}"

    for mode in MODES:
        for name, impl in list(alive.items()):
            try:
                impl.iters[mode] = calibrate(impl, mode, args.warmup, args.min_sample_ms / 1e3)
            except Exception as err:
                fail(name, err)
        samples: dict[str, list[float]] = {name: [] for name in alive}
        for _ in range(args.reps):
            for name, impl in list(alive.items()):
                try:
                    samples[name].append(sample(impl, mode))
                except Exception as err:
                    fail(name, err)
        for name, impl in list(alive.items()):
            try:
                peak = profiled_peak(lambda impl=impl, mode=mode: impl.call(mode))
            except Exception as err:
                fail(name, err)
                continue
            times_ms = [s * 1e3 for s in samples[name]]
            record["impls"][name][mode] = {
                "times_ms": times_ms, "median_ms": _common.median(times_ms), "min_ms": min(times_ms),
                "calls_per_sample": impl.iters[mode], "peak_bytes": peak,
            }
    for name, impl in list(alive.items()):
        try:
            record["impls"][name]["kept_bytes"] = kept_bytes(impl)
        except Exception as err:
            fail(name, err)
    record["ratios"] = ratios(record)
    return record


def _get(record: dict[str, Any], impl: str, mode: str, key: str) -> float | None:
    return record["impls"].get(impl, {}).get(mode, {}).get(key)


def ratios(record: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    out = {}
    for mode in MODES:
        fused, ref = _get(record, "fused", mode, "median_ms"), _get(record, "reference", mode, "median_ms")
        out[mode] = {
            "reference_over_fused_time": _common.ratio(ref, fused),
            "fused_over_depthwise_time": _common.ratio(fused, _get(record, "depthwise", mode, "median_ms")),
            "fused_over_dense3x3_time": _common.ratio(fused, _get(record, "dense3x3", mode, "median_ms")),
            "reference_over_traffic_time": _common.ratio(ref, _get(record, "traffic", mode, "median_ms")),
            "fused_over_traffic_time": _common.ratio(fused, _get(record, "traffic", mode, "median_ms")),
            "fused_over_reference_peak": _common.ratio(_get(record, "fused", mode, "peak_bytes"),
                                                       _get(record, "reference", mode, "peak_bytes")),
            "reference_peak_over_input": _common.ratio(_get(record, "reference", mode, "peak_bytes"),
                                                       record["input_bytes"]),
        }
    return out


# --- report ------------------------------------------------------------------------------------
MB = 1e6


def _ms(record: dict[str, Any], impl: str, mode: str) -> str:
    if record["impls"].get(impl, {}).get("error"):
        return "ERR"
    value = _get(record, impl, mode, "median_ms")
    return _common.fmt(value, ".3f" if value is not None and value < 1 else ".2f")


def _mb(value: float | None) -> str:
    return _common.fmt(None if value is None else value / MB, ".1f" if value is None or value >= 1e5 else ".3f")


def _x(value: float | None) -> str:
    return _common.fmt(value, ".2f" if value is not None and value < 10 else ".1f")


def report(records: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = []
    for mode in MODES:
        headers = ["op", "stage", "input", "k", "Cw", "fused ms", "ref ms", "dw ms", "dense3 ms", "traffic ms",
                   "ref/fused", "fused/dw", "ref/traffic", "fused/traffic", "peak fused MB", "peak ref MB",
                   "fused/ref", "ref/in"]
        if mode == "forward":
            headers += ["kept fused MB", "kept ref MB"]
        rows = []
        for r in records:
            ra = r["ratios"][mode]
            row = [r["op"], str(r["stage"]), "x".join(map(str, r["input_shape"])), str(r["kernel_size"]),
                   _common.fmt(r["weight_channels"], "d"),
                   _ms(r, "fused", mode), _ms(r, "reference", mode), _ms(r, "depthwise", mode),
                   _ms(r, "dense3x3", mode) if "dense3x3" in r["impls"] else "-",
                   _ms(r, "traffic", mode) if "traffic" in r["impls"] else "-",
                   _x(ra["reference_over_fused_time"]), _x(ra["fused_over_depthwise_time"]),
                   _x(ra["reference_over_traffic_time"]), _x(ra["fused_over_traffic_time"]),
                   _mb(_get(r, "fused", mode, "peak_bytes")), _mb(_get(r, "reference", mode, "peak_bytes")),
                   _x(ra["fused_over_reference_peak"]), _x(ra["reference_peak_over_input"])]
            if mode == "forward":
                row += [_mb(r["impls"].get("fused", {}).get("kept_bytes")),
                        _mb(r["impls"].get("reference", {}).get("kept_bytes"))]
            rows.append(row)
        title = "forward (no_grad)" if mode == "forward" else "forward + backward (grads of every input)"
        lines += [f"\n== {title}: batch {args.batch}, {args.image_size} px, float32, {torch.get_num_threads()} "
                  f"threads, median of {args.reps} samples, convolutions {args.conv_layout} ==",
                  _common.table(headers, rows, left=3)]
    head = [r for r in records if (r["op"], r["stage"]) == HEADLINE]
    if head:
        r = head[0]
        fb = "forward_backward"
        ra = r["ratios"][fb]
        lines += [
            f"\nHeadline: aggregation {tuple(r['shapes']['x'])}, k={r['kernel_size']}, "
            f"{r['weight_channels']} weight channels, forward+backward: fused {_ms(r, 'fused', fb)} ms, "
            f"reference {_ms(r, 'reference', fb)} ms ({_x(ra['reference_over_fused_time'])}x), "
            f"depthwise {r['kernel_size']}x{r['kernel_size']} conv {_ms(r, 'depthwise', fb)} ms "
            f"(fused/dw {_x(ra['fused_over_depthwise_time'])}), dense 3x3 conv {_ms(r, 'dense3x3', fb)} ms; "
            f"peak fused {_mb(_get(r, 'fused', fb, 'peak_bytes'))} MB vs reference "
            f"{_mb(_get(r, 'reference', fb, 'peak_bytes'))} MB.",
        ]
    problems = []
    for r in records:
        where = f"{r['op']} stage {r['stage']} {r['input_shape']}"
        for name, info in r["impls"].items():
            if info.get("error"):
                problems.append(f"  {where} [{name}]: {info['error']}")
        diff = r.get("max_abs_diff_fused_vs_reference")
        if isinstance(diff, str) or (diff is not None and diff > 1e-4):
            problems.append(f"  {where}: fused and reference forward outputs differ by {diff}")
    if problems:
        lines += ["\nProblems:", *problems]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 2, 3 samples, 1 warm-up, 5 ms samples (unless given explicitly)")
    p.add_argument("--json", type=str, default=None,
                   help="output file (default benchmarks/results/ops.json, or ops.quick.json with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; 2 with --quick)")
    p.add_argument("--image-size", type=int, default=224, help="image size the stage shapes derive from")
    p.add_argument("--reps", type=int, default=None, help="timed samples per implementation (default 7; 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per implementation (default 2; 1)")
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="a sample repeats the call until it lasts this long (default 20; 5 with --quick)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--stages", nargs="+", type=int, choices=range(len(STAGES)), default=list(range(len(STAGES))))
    p.add_argument("--conv-layout", choices=("channels_last", "nchw"), default="channels_last",
                   help="memory layout of the convolution baselines (default channels_last: see the docstring)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing measurements")
    _common.add_malloc_flag(p)
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("batch", 8, 2), ("reps", 7, 3), ("warmup", 2, 1), ("min_sample_ms", 20.0, 5.0)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.json is None:
        args.json = str(_common.RESULTS / ("ops.quick.json" if quick else "ops.json"))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    malloc = _common.apply_malloc(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from torchsan.ops import _cpu

    if not _cpu.available():
        print(f"warning: the fused CPU kernels are unavailable ({_cpu.unavailable_reason()}); "
              "the 'fused' column will show errors", file=sys.stderr)
    machine = _common.machine_info() | {"malloc": malloc}
    print(f"{machine['cpu_model']}; torch {machine['torch_version']}, {machine['torch_threads']} threads; "
          f"load average {machine['load_average_at_start']}; malloc: {malloc}", flush=True)
    records = []
    start = time.perf_counter()
    for op in args.ops:
        for stage in args.stages:
            case = build_case(op, stage, args.batch, args.image_size, args.conv_layout)
            t0 = time.perf_counter()
            record = measure_case(case, args)
            record["input_shape"] = case.input_shape
            records.append(record)
            print(f"  {op:<12} stage {stage} {str(case.input_shape):<20} {time.perf_counter() - t0:6.1f} s",
                  file=sys.stderr, flush=True)
            del case
    config = vars(args) | {"dtype": "float32", "pad_mode": "reflect", "share_planes": SHARE}
    _common.finish("ops", args.json, machine, config, records, report(records, args), start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
