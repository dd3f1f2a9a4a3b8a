"""A/B of the fused mapping's two latest changes on a SAN10 train step, in one process.

    python benchmarks/ab_mapping.py [--model san10_pairwise] [--rounds 4]

"before": BN statistics through autograd's ``var_mean`` and fusion only up to 1024 channel pairs;
"after": the lean ``_VarMean`` backward and fusion up to 2048 pairs (the current defaults). The two
settings alternate in one process after warm-up steps, so both see the same allocator state (a fresh
process pays page faults that a long run does not; see docs/performance.md). Prints the median step
of each and writes benchmarks/results/ab_mapping.json. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import timm  # noqa: E402
import torch  # noqa: E402

import torchsan  # noqa: E402, F401
import torchsan.layers.mapping as mapping  # noqa: E402


def _autograd_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="san10_pairwise")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per setting and round")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "ab_mapping.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model).train()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 1000, (args.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> float:
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    lean, limit = mapping._VarMean.apply, mapping.MAX_FUSED_CHANNEL_PAIRS
    settings = {"before": (_autograd_var_mean, 1024), "after": (lean, limit)}
    for _ in range(3):
        step()
    times: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(args.rounds):
        for name, (var_mean, pairs) in settings.items():
            mapping._VarMean.apply, mapping.MAX_FUSED_CHANNEL_PAIRS = var_mean, pairs
            times[name] += [step() for _ in range(args.steps)]
    mapping._VarMean.apply, mapping.MAX_FUSED_CHANNEL_PAIRS = lean, limit
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}, batch {args.batch}, {args.image_size} px, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps each")
    for name, value in med.items():
        print(f"  {name:<7} median train step {value:.3f} s")
    print(f"  after/before {med['after'] / med['before']:.3f}")
    Path(args.json).write_text(json.dumps(dict(args=vars(args), times=times, median=med), indent=1))


if __name__ == "__main__":
    main()
