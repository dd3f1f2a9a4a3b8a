"""CPU inference time: torchsan eager against ONNX Runtime on the exported model, per model and batch size.

    python benchmarks/inference.py [--models san10_pairwise san10_patchwise san_resnet26] [--batches 1 8]

Each model (eval mode, 224 px, random weights and input) runs in torchsan eager under ``torch.inference_mode``
and in ONNX Runtime (CPU provider, as many threads as torch uses) on the file ``torch.onnx.export(dynamo=True)``
writes, with a free batch dimension. Rounds are interleaved over every (model, batch, runtime), so a slow phase of
a shared machine hits all alike, and each timed call follows an untimed one of its own (``--lead-in``). The table
gives medians and each SAN's faster route over san_resnet26 in ONNX Runtime, which is what a deployment of ResNet26
would use. ``--malloc system`` by default: a deployment script
runs with glibc's default settings unless told otherwise. Writes benchmarks/results/inference.json.
A measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import onnxruntime as ort  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import torchsan  # noqa: E402, F401

BASELINE = "san_resnet26"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["san10_pairwise", "san10_patchwise", BASELINE])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--lead-in", type=int, default=1, help="untimed calls before each timed one in a round")
    p.add_argument("--json", default=str(_common.RESULTS / "inference.json"))
    _common.add_malloc_flag(p)
    p.set_defaults(malloc="system")
    args = p.parse_args()
    start = time.perf_counter()
    malloc = _common.apply_malloc(args.malloc)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    inputs = {b: torch.randn(b, 3, args.image_size, args.image_size) for b in args.batches}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in dict.fromkeys([*args.models, BASELINE]):
            model = timm.create_model(name).eval()
            path = Path(tmp) / f"{name}.onnx"
            dim = torch.export.Dim("batch", min=1, max=64)
            torch.onnx.export(model, (inputs[args.batches[0]],), str(path), dynamo=True, verbose=False,
                              dynamic_shapes=({0: dim},), report=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            # ONNX Runtime's threads otherwise spin for a while after each run, taking the cores from the next call
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = session.get_inputs()[0].name
            for b, x in inputs.items():
                def eager(model: torch.nn.Module = model, x: torch.Tensor = x) -> None:
                    with torch.inference_mode():
                        model(x)

                def onnx(session: ort.InferenceSession = session, feed: str = feed, x: torch.Tensor = x) -> None:
                    session.run(None, {feed: x.numpy()})

                runs[(name, b, "eager")] = eager
                runs[(name, b, "onnxruntime")] = onnx
        for run in runs.values():
            for _ in range(args.warmup):
                run()
        times: dict[tuple[str, int, str], list[float]] = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, run in runs.items():
                # timed right after a call of its own, as a deployment runs one model again and again: the other
                # runtime's last run (GBs of the reference's tensors in ONNX Runtime) leaves caches and pages cold
                for _ in range(args.lead_in):
                    run()
                t = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - t)
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    rows, results = [], []
    for name in dict.fromkeys([*args.models, BASELINE]):
        for b in args.batches:
            eager, onnx = med[(name, b, "eager")], med[(name, b, "onnxruntime")]
            best = min(eager, onnx)
            base = med[(BASELINE, b, "onnxruntime")]
            rows.append([name, str(b), f"{eager:.1f}", f"{onnx:.1f}", "eager" if eager <= onnx else "onnxruntime",
                         f"{best / base:.2f}"])
            results.append(dict(model=name, batch=b, eager_ms=eager, onnxruntime_ms=onnx,
                                eager_times_s=times[(name, b, "eager")],
                                onnxruntime_times_s=times[(name, b, "onnxruntime")], best_over_baseline=best / base))
    text = (f"== inference (eval), {args.image_size} px, {threads} threads, {args.rounds} interleaved rounds after "
            f"{args.warmup} warm-up runs each, each timed run after {args.lead_in} of its own; malloc: {malloc}; "
            f"onnxruntime {ort.__version__} ==\n"
            + _common.table(["model", "batch", "eager ms", "onnxruntime ms", "faster", f"best / {BASELINE} ORT"],
                            rows))
    machine = _common.machine_info() | {"malloc": malloc}
    _common.finish("inference", args.json, machine, vars(args), results, text, start)


if __name__ == "__main__":
    main()
