"""CPU inference time: torchsan eager and its InferenceSession against ONNX Runtime on the exported model, per model
and batch size.

    python benchmarks/inference.py [--models san10_pairwise san10_patchwise san_resnet26] [--batches 1 8]

Each model (eval mode, 224 px, random weights and input) runs in torchsan eager under ``torch.inference_mode``, in
``torchsan.InferenceSession`` (the eager forward recorded once per batch size and replayed without its Python) and
in ONNX Runtime (CPU provider, as many threads as torch uses) on the file ``torch.onnx.export(dynamo=True)``
writes, with a free batch dimension. Each (model, runtime) lives in a process of its own, as a deployment runs one
model: no other model's tensors (GBs for SAN's reference composition in ONNX Runtime) share its heap. Rounds are
interleaved over every (model, batch, runtime), one process timing at a time while the others wait, so a slow
phase of a shared machine hits all alike, and each timed call follows an untimed one of its own (``--lead-in``).
The table gives medians and each SAN's faster route over san_resnet26 in ONNX Runtime, which is what a deployment
of ResNet26 would use. ``--malloc system`` by default: a deployment script runs with glibc's default settings
unless told otherwise. Writes benchmarks/results/inference.json. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

BASELINE = "san_resnet26"
RUNTIMES = ("eager", "session", "onnxruntime")


def _worker(conn: Connection, name: str, runtime: str, batches: list[int], image_size: int, threads: int,
            malloc: str, folder: str) -> None:
    """One (model, runtime) in this process: builds it, then times one call per request (batch, calls before)."""
    _common.apply_malloc(malloc)
    import onnxruntime as ort
    import timm
    import torch

    import torchsan  # (registers the models)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    inputs = {b: torch.randn(b, 3, image_size, image_size) for b in batches}
    model = timm.create_model(name).eval()
    if runtime == "eager":
        def run(b: int) -> None:
            with torch.inference_mode():
                model(inputs[b])
    elif runtime == "session":
        replay = torchsan.InferenceSession(model)

        def run(b: int) -> None:
            replay(inputs[b])
    else:
        path = Path(folder) / f"{name}.onnx"
        dim = torch.export.Dim("batch", min=1, max=64)
        torch.onnx.export(model, (inputs[batches[0]],), str(path), dynamo=True, verbose=False,
                          dynamic_shapes=({0: dim},), report=False)
        del model
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # ONNX Runtime's threads otherwise spin for a while after each run, taking the cores from the next call
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        arrays = {b: x.numpy() for b, x in inputs.items()}

        def run(b: int) -> None:
            session.run(None, {feed: arrays[b]})
    conn.send(("ready", _common.apply_malloc(malloc), ort.__version__))
    while (request := conn.recv()) is not None:
        b, before = request
        for _ in range(before):
            run(b)
        t = time.perf_counter()
        run(b)
        conn.send(time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["san10_pairwise", "san10_patchwise", BASELINE])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--lead-in", type=int, default=1, help="untimed calls before each timed one in a round")
    p.add_argument("--threads", type=int, default=None, help="threads per runtime (default: torch's count here)")
    p.add_argument("--json", default=str(_common.RESULTS / "inference.json"))
    _common.add_malloc_flag(p)
    p.set_defaults(malloc="system")
    args = p.parse_args()
    start = time.perf_counter()
    import torch

    threads = args.threads or torch.get_num_threads()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: nothing inherited
    workers: dict[tuple[str, str], tuple[Connection, multiprocessing.process.BaseProcess]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in dict.fromkeys([*args.models, BASELINE]):
                for runtime in RUNTIMES:
                    parent, child = context.Pipe()
                    process = context.Process(target=_worker, args=(child, name, runtime, args.batches,
                                                                    args.image_size, threads, args.malloc, tmp))
                    process.start()
                    workers[(name, runtime)] = (parent, process)
            for conn, _ in workers.values():
                _, malloc, ort_version = conn.recv()  # (raises EOFError if the worker died while building)
            keys = [(name, b, runtime) for (name, runtime) in workers for b in args.batches]
            times: dict[tuple[str, int, str], list[float]] = {key: [] for key in keys}

            def timed(key: tuple[str, int, str], before: int) -> float:
                conn = workers[(key[0], key[2])][0]
                conn.send((key[1], before))
                return conn.recv()

            for key in keys:
                timed(key, max(0, args.warmup - 1))
            for _ in range(args.rounds):
                for key in keys:
                    # timed right after a call of its own, as a deployment runs one model again and again
                    times[key].append(timed(key, args.lead_in))
        finally:
            for conn, process in workers.values():
                try:
                    conn.send(None)
                except OSError:
                    pass
                process.join(timeout=60)
                if process.is_alive():
                    process.terminate()
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    rows, results = [], []
    for name in dict.fromkeys([*args.models, BASELINE]):
        for b in args.batches:
            ms = {runtime: med[(name, b, runtime)] for runtime in RUNTIMES}
            fastest = min(RUNTIMES, key=ms.__getitem__)
            base = med[(BASELINE, b, "onnxruntime")]
            rows.append([name, str(b), *(f"{ms[r]:.1f}" for r in RUNTIMES), fastest, f"{ms[fastest] / base:.2f}"])
            results.append(dict(model=name, batch=b, **{f"{r}_ms": ms[r] for r in RUNTIMES},
                                **{f"{r}_times_s": times[(name, b, r)] for r in RUNTIMES}, fastest=fastest,
                                best_over_baseline=ms[fastest] / base))
    text = (f"== inference (eval), {args.image_size} px, {threads} threads, a process per model and runtime, "
            f"{args.rounds} interleaved rounds after {args.warmup} warm-up runs each, each timed run after "
            f"{args.lead_in} of its own; malloc: {malloc}; onnxruntime {ort_version} ==\n"
            + _common.table(["model", "batch", "eager ms", "session ms", "onnxruntime ms", "fastest",
                             f"best / {BASELINE} ORT"], rows))
    machine = _common.machine_info() | {"malloc": malloc}
    _common.finish("inference", args.json, machine, vars(args), results, text, start)


if __name__ == "__main__":
    main()
