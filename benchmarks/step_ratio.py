"""Train-step time of SAN models over san_resnet26's, interleaved in one process.

    python benchmarks/step_ratio.py [--models san10_pairwise san10_patchwise] [--rounds 8]

``models.py`` runs each model in its own process, one after the other, so a change in the shared
machine's speed between rows moves the ratios (ResNet26's median step varied from 1.3 to 1.7 s between
runs here). This script builds every model (plus san_resnet26) in one process, warms each up, then runs
rounds of one train step per model in turn and reports the median step of each and its ratio to
san_resnet26's: slow phases of the machine hit every model alike. Batch 8, 224 px, random data, SGD with
momentum, as in ``models.py``. Writes benchmarks/results/step_ratio.json. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import torchsan  # noqa: E402, F401

BASELINE = "san_resnet26"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["san10_pairwise", "san10_patchwise"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--json", default=str(_common.RESULTS / "step_ratio.json"))
    _common.add_malloc_flag(p)
    args = p.parse_args()
    start = time.perf_counter()
    malloc = _common.apply_malloc(args.malloc)
    names = list(dict.fromkeys([*args.models, BASELINE]))
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 1000, (args.batch,))
    steps = {}
    for name in names:
        model = timm.create_model(name).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> float:
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            return time.perf_counter() - t

        steps[name] = step
    for name in names:
        for _ in range(args.warmup):
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            times[name].append(steps[name]())
    med = {name: statistics.median(v) for name, v in times.items()}
    rows = [[name, f"{med[name]:.3f}", f"{min(times[name]):.3f}", f"{max(times[name]):.3f}",
             f"{med[name] / med[BASELINE]:.2f}"] for name in names]
    text = (f"== train step, batch {args.batch}, {args.image_size} px, {torch.get_num_threads()} threads, "
            f"{args.rounds} interleaved rounds after {args.warmup} warm-up steps each; malloc: {malloc} ==\n"
            + _common.table(["model", "median s", "min s", "max s", f"x {BASELINE}"], rows))
    machine = _common.machine_info() | {"malloc": malloc}
    _common.finish("step_ratio", args.json, machine, vars(args), [{"model": n, "times_s": times[n],
                   "median_s": med[n]} for n in names], text, start)


if __name__ == "__main__":
    main()
