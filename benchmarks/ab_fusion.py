"""A/B of the layer-level fusions on a SAN train step, in one process.

    python benchmarks/ab_fusion.py [--models san10_pairwise san10_patchwise] [--rounds 4]

"modules": every layer runs module by module (``with torchsan.ops.fusion(False)``): gamma's BN, ReLU and 1x1
convolutions, each stage boundary's BN, ReLU and max-pool, phi, psi and beta as three convolutions, subtraction2
then torch.cat of the position encoding, the softmax and then the aggregation, the block's BN-ReLU-conv pairs.
"fused": the default, where ``torchsan.ops.should_fuse`` decides for each run of modules (see
``torchsan/ops/_fusion.py`` and the backend's ``fuses``). Both use the backend's aggregation and gather kernels.
The two settings alternate in one process after a warm-up step each, so both see the same allocator state. Prints
the median step of each, for SAN10 pairwise and patchwise by default, and writes benchmarks/results/ab_fusion.json
(``--json``). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common

_common.use_checkout()  # measure this checkout's src/, installed or not

import timm  # noqa: E402
import torch  # noqa: E402

from torchsan import ops  # noqa: E402


def measure(name: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """Train-step times of ``name`` with fusion off ("modules") and on ("fused"), alternating."""
    torch.manual_seed(0)
    model = timm.create_model(name).train()
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

    settings = {"modules": False, "fused": True}
    for enabled in settings.values():
        with ops.fusion(enabled):
            step()
    times: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(args.rounds):
        for setting, enabled in settings.items():
            with ops.fusion(enabled):
                times[setting] += [step() for _ in range(args.steps)]
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["san10_pairwise", "san10_patchwise"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per setting and round")
    p.add_argument("--json", default=str(_common.RESULTS / "ab_fusion.json"))
    _common.add_malloc_flag(p)
    args = p.parse_args()
    start, machine = time.perf_counter(), _common.machine_info()
    malloc = _common.apply_malloc(args.malloc)
    records, rows = [], []
    for name in args.models:
        times = measure(name, args)
        med = {k: statistics.median(v) for k, v in times.items()}
        records.append(dict(model=name, times_s=times, median_s=med))
        rows.append([name, f"{med['modules']:.3f}", f"{med['fused']:.3f}", f"{med['fused'] / med['modules']:.3f}"])
        print(f"{name} done", flush=True)
    text = (f"== train step, batch {args.batch}, {args.image_size} px, {torch.get_num_threads()} threads on "
            f"{machine['cpu_model']}, median of {args.rounds} rounds x {args.steps} steps; malloc: {malloc} ==\n"
            + _common.table(["model", "modules s", "fused s", "fused/modules"], rows))
    _common.finish("ab_fusion", args.json, machine, vars(args), records, text, start)


if __name__ == "__main__":
    main()
