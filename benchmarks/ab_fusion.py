"""A/B of the layer-level fusions on a SAN train step, in one process.

    python benchmarks/ab_mapping.py [--model san10_pairwise] [--rounds 4]

"modules": gamma's BN, ReLU and 1x1 convolutions, each stage boundary's BN, ReLU and max-pool, the
attention's phi, psi and beta convolutions, the relation and position encoding (subtraction2, then torch.cat),
the softmax and the aggregation, and the block's BN-ReLU-conv pairs, all run module by module. "fused": the
default on the ``cpu`` backend: each gamma BN-ReLU-conv triple as one op with its batch statistics
(``torchsan.ops.batchnorm_relu_conv``), each BN-ReLU-max-pool as ``torchsan.ops.batchnorm_relu_maxpool``,
phi/psi/beta as one convolution with stacked weights, z never written on maps of >= 14 x 14 (its statistics and
gamma's first triple gather it: ``subtraction2_batchnorm_relu_conv``) and written by ``subtraction2(..., append=p)``
on smaller ones, the softmax inside the aggregation (``softmax_aggregation``), and the block's BN-ReLU-conv pairs
fused on maps of >= 1024 px. Both use the fused aggregation and subtraction kernels. The two settings alternate in
one process after warm-up steps, so both see the same allocator state. Prints the median step of each and writes
benchmarks/results/ab_mapping.json.
A measurement, not a test.
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
import torchsan.layers.attention as attention  # noqa: E402
import torchsan.layers.mapping as mapping  # noqa: E402
import torchsan.models.san as san  # noqa: E402


def _unfused_norm_act_pool(norm: torch.nn.Module, act: torch.nn.Module, pool: torch.nn.Module,
                           x: torch.Tensor) -> torch.Tensor:
    return pool(act(norm(x)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="san10_pairwise")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per setting and round")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "ab_mapping.json"))
    _common.add_malloc_flag(p)
    args = p.parse_args()
    malloc = _common.apply_malloc(args.malloc)
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

    limits = mapping.MAX_FUSED_IN_CHANNELS, mapping.MAX_FUSED_OUT_CHANNELS
    fused_pool, hooks = san._norm_act_pool, attention.has_hooks
    # (the attention stacks phi/psi/beta unless has_hooks says a hook is registered)
    settings = {"modules": (0, 0, _unfused_norm_act_pool, lambda *m: True), "fused": (*limits, fused_pool, hooks)}
    for _ in range(3):
        step()
    times: dict[str, list[float]] = {k: [] for k in settings}
    try:
        for _ in range(args.rounds):
            for name, (max_in, max_out, pool, has_hooks) in settings.items():
                mapping.MAX_FUSED_IN_CHANNELS, mapping.MAX_FUSED_OUT_CHANNELS = max_in, max_out
                san._norm_act_pool, attention.has_hooks = pool, has_hooks
                times[name] += [step() for _ in range(args.steps)]
    finally:
        mapping.MAX_FUSED_IN_CHANNELS, mapping.MAX_FUSED_OUT_CHANNELS = limits
        san._norm_act_pool, attention.has_hooks = fused_pool, hooks
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}, batch {args.batch}, {args.image_size} px, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps each; malloc: {malloc}")
    for name, value in med.items():
        print(f"  {name:<8} median train step {value:.3f} s")
    print(f"  fused/modules {med['fused'] / med['modules']:.3f}")
    Path(args.json).write_text(json.dumps(dict(args=vars(args), malloc=malloc, times=times, median=med), indent=1))


if __name__ == "__main__":
    main()
