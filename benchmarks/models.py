"""Benchmark of whole models: train-step and inference throughput and peak memory, fused vs reference ops.

Run from the repository root (no install needed; with ``pip install -e .`` it measures the same code)::

    python benchmarks/models.py                       # batch 8, 224 px, every model (long: see below)
    python benchmarks/models.py --quick               # smoke run: SAN10 x 2 + ResNet26, batch 2, 128 px
    python benchmarks/models.py --models san10_pairwise san_resnet26 --backends cpu

Models: san10/15/19 pairwise and patchwise, san_resnet26/38/50 (the paper's baselines, built through
``timm.create_model``). Each SAN model runs on each requested torchsan backend: ``cpu`` (the fused
C++/OpenMP kernels) and ``reference`` (plain PyTorch unfold). The ResNets use no SAN op, so they run
once (backend ``-``). The reference backend is slow and memory-hungry (a SAN10 pairwise train step at
batch 8, 224 px takes about 10 s and about 6 GB), so by default it runs only for ``san10_pairwise`` and
``san10_patchwise``; ``--reference-models all`` (or a list) runs it for others, ``--backends cpu`` skips it.

Modes:
* ``train``: ``model.train()``; one step = forward, cross-entropy on random labels, backward, SGD step
  (momentum 0.9, weight decay 1e-4, a small learning rate so the random run stays finite);
* ``infer``: ``model.eval()`` under ``torch.no_grad()``; one step = one forward.
Inputs are random images (N, 3, S, S); 1000 classes.

Each (model, backend, mode) runs in a fresh subprocess, so that peak memories do not mix: the child
builds the model, runs ``--warmup`` untimed steps then ``--steps`` timed ones, and reports the step
times and its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). ``peak RSS``
includes the Python interpreter, torch, timm and the model (about 0.8 GB here); ``step RSS`` subtracts the peak
reached before the first step (imports, model, input), so it is what the steps themselves needed
(activations, gradients, momentum buffers). ``san_resnet26`` is always measured (it is added if missing)
and every train row shows its step time over san_resnet26's train step, measured in the same run.
The table shows the median step; ``img/s`` = batch / median step. ``--malloc keep`` (the default, as in
``torchsan train``) lets glibc keep freed memory for reuse; ``--malloc system`` measures glibc's defaults,
under which every large tensor is faulted in afresh each step (see ``torchsan/allocator.py``).

Output: a table and ``--json`` (default ``benchmarks/results/models.json``; ``models.quick.json``
with ``--quick``) with every step time, the machine and the command line. These are measurements,
not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common

SAN_MODELS = tuple(f"san{d}_{kind}" for d in (10, 15, 19) for kind in ("pairwise", "patchwise"))
RESNETS = ("san_resnet26", "san_resnet38", "san_resnet50")
MODELS = SAN_MODELS + RESNETS
BASELINE = "san_resnet26"
BACKENDS = ("cpu", "cpu-lean", "reference")  # cpu-lean: fused ops + memory_efficient=True
MODES = ("train", "infer")
DEFAULT_REFERENCE = ("san10_pairwise", "san10_patchwise")
QUICK_MODELS = ("san10_pairwise", "san10_patchwise", BASELINE)
RESULT_TAG = "BENCHMARK_RESULT "


# --- child: one measurement --------------------------------------------------------------------
def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _current_rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def child(spec: dict[str, Any]) -> dict[str, Any]:
    _common.use_checkout()
    import timm
    import torch
    import torch.nn.functional as F

    import torchsan
    from torchsan import ops

    malloc = _common.apply_malloc(spec.get("malloc", "keep"))
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    backend = spec["backend"]
    lean = backend == "cpu-lean"  # the fused backend with the attention's memory_efficient option
    if lean:
        backend = "cpu"
    if backend != "-":
        ops.set_backend(backend)  # TORCHSAN_BACKEND (set by the parent) covers the other threads too
        if backend == "cpu" and not ops._cpu.available():
            raise RuntimeError(f"the fused CPU kernels are unavailable: {ops._cpu.unavailable_reason()}")
    torch.manual_seed(0)
    model = timm.create_model(spec["model"], num_classes=1000, **({"memory_efficient": True} if lean else {}))
    n, size = spec["batch"], spec["image_size"]
    x = torch.randn(n, 3, size, size)
    y = torch.randint(0, 1000, (n,))
    if spec["mode"] == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    else:
        model.eval()

        def step() -> None:
            with torch.no_grad():
                model(x)

    rss_ready, rss_ready_now = _max_rss_bytes(), _current_rss_bytes()
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _max_rss_bytes()
    return {
        "times_s": times, "median_s": _common.median(times), "min_s": min(times),
        "images_per_s": n / _common.median(times), "peak_rss_bytes": peak,
        "rss_before_steps_bytes": rss_ready, "current_rss_before_steps_bytes": rss_ready_now,
        "step_rss_bytes": peak - rss_ready, "params": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(), "torchsan_backend": ops.get_backend(),
        "torchsan_path": str(Path(torchsan.__file__).parent), "malloc": malloc,
    }


# --- parent: the plan, the subprocesses, the report --------------------------------------------
def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    models = list(dict.fromkeys(args.models))
    if BASELINE not in models:
        models.append(BASELINE)
    reference = set(MODELS if "all" in args.reference_models else args.reference_models)
    jobs = []
    for model in models:
        if model in RESNETS:
            backends = ["-"]
        else:
            backends = [b for b in args.backends if b != "reference" or model in reference]
        for backend in backends:
            for mode in args.modes:
                if backend == "cpu-lean" and mode == "infer":
                    continue  # memory_efficient only changes training
                jobs.append({"model": model, "backend": backend, "mode": mode, "batch": args.batch,
                             "image_size": args.image_size, "warmup": args.warmup, "steps": args.steps,
                             "threads": args.threads, "malloc": args.malloc})
    return jobs


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["TORCHSAN_BACKEND"] = {"-": "auto", "cpu-lean": "cpu"}.get(job["backend"], job["backend"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):]) | {"wall_s": wall}
    tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
    return {"error": f"exit code {proc.returncode}: {tail[-800:]}", "wall_s": wall}


def report(records: Sequence[dict[str, Any]], args: argparse.Namespace, threads: int) -> str:
    base = next((r["result"].get("median_s") for r in records
                 if (r["model"], r["mode"]) == (BASELINE, "train") and "error" not in r["result"]), None)
    fused = {(r["model"], r["mode"]): r["result"].get("median_s") for r in records if r["backend"] == "cpu"}
    headers = ["model", "backend", "mode", "step s", "img/s", "peak RSS MB", "step RSS MB", "ref/cpu",
               "x resnet26"]
    rows = []
    for r in records:
        res = r["result"]
        if "error" in res:
            rows.append([r["model"], r["backend"], r["mode"], "ERR", *["-"] * 5])
            continue
        med = res["median_s"]
        rows.append([
            r["model"], r["backend"], r["mode"], _common.fmt(med, ".3f"), _common.fmt(res["images_per_s"], ".2f"),
            _common.fmt(res["peak_rss_bytes"] / 1e6, ".0f"), _common.fmt(res["step_rss_bytes"] / 1e6, ".0f"),
            _common.fmt(_common.ratio(med, fused.get((r["model"], r["mode"]))), ".2f")
            if r["backend"] == "reference" else "-",
            _common.fmt(_common.ratio(med, base), ".2f") if r["mode"] == "train" else "-",
        ])
    lines = [f"\n== batch {args.batch}, {args.image_size} px, {threads} threads; median of {args.steps} steps "
             f"after {args.warmup} warm-up; one subprocess per row ==", _common.table(headers, rows, left=3)]
    errors = [f"  {r['model']} [{r['backend']}, {r['mode']}]: {r['result']['error']}"
              for r in records if "error" in r["result"]]
    if errors:
        lines += ["\nProblems:", *errors]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {', '.join(QUICK_MODELS)}, batch 2, 128 px, 2 timed steps "
                        "(unless given explicitly)")
    p.add_argument("--models", nargs="+", choices=(*MODELS, "all"), default=None,
                   help="default: all nine (the three above with --quick)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--reference-models", nargs="+", choices=(*SAN_MODELS, "all"), default=list(DEFAULT_REFERENCE),
                   help="SAN models the reference backend runs for (default: san10_pairwise san10_patchwise)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch", type=int, default=None, help="default 8 (2 with --quick)")
    p.add_argument("--image-size", type=int, default=None,
                   help="default 224 (128 with --quick: SAN's 7x7 reflect footprint needs >= 128 px)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3; 2 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child")
    _common.add_malloc_flag(p)
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per subprocess (default 3600)")
    p.add_argument("--json", type=str, default=None,
                   help="output file (default benchmarks/results/models.json, or models.quick.json with --quick)")
    p.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    if args.models is None:
        args.models = list(QUICK_MODELS if quick else MODELS)
    elif "all" in args.models:
        args.models = list(MODELS)
    for name, full, small in (("batch", 8, 2), ("image_size", 224, 128), ("steps", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.json is None:
        args.json = str(_common.RESULTS / ("models.quick.json" if quick else "models.json"))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(RESULT_TAG + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    _common.use_checkout()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = _common.machine_info()
    threads = args.threads or machine["torch_threads"]
    print(f"{machine['cpu_model']}; torch {machine['torch_version']}, {threads} threads; "
          f"load average {machine['load_average_at_start']}", flush=True)
    jobs = plan(args)
    records = []
    start = time.perf_counter()
    for i, job in enumerate(jobs, 1):
        result = run_job(job, args.timeout)
        records.append(job | {"result": result})
        if "error" in result:
            summary = f"ERROR {result['error'][:200]}"
        else:
            summary = (f"{result['median_s']:.3f} s/step, {result['images_per_s']:.2f} img/s, "
                       f"peak RSS {result['peak_rss_bytes'] / 1e6:.0f} MB")
        print(f"  [{i}/{len(jobs)}] {job['model']:<16} {job['backend']:<9} {job['mode']:<5} {summary} "
              f"({result['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    config = {k: v for k, v in vars(args).items() if k != "child"} | {"dtype": "float32"}
    _common.finish("models", args.json, machine, config, records, report(records, args, threads), start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
