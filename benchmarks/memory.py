"""Where SAN training memory goes: activation bytes kept for backward, by part of the network.

For one training forward pass (batch 8, 224 px by default) this records every tensor autograd saves for
backward (``torch.autograd.graph.saved_tensors_hooks``), counts each storage once, leaves out
parameters, and attributes the bytes to the part of the network whose module was running:

    stem/transitions/head, block BN+ReLU, block proj, phi/psi/beta, position encoding,
    relation (subtraction2 / unfold / concatenation of z), gamma (the mapping over the (K, L) grid),
    softmax, aggregation

It does this for SAN10 pairwise and patchwise on the fused ``cpu`` backend, with and without
``memory_efficient=True`` (which recomputes the relation and gamma in backward), and on the reference
backend. Saved activations are what a training step holds between forward and backward, so they are
the part of the peak memory that the model design controls. (With ``memory_efficient=True`` the
checkpoint keeps phi(x) and psi(x) itself, outside these hooks: about 2% of the rest, not counted.)

    python benchmarks/memory.py [--batch 8] [--image-size 224] [--json benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import _common

PARTS = ("stem/transitions/head", "block BN+ReLU", "block proj", "phi/psi/beta", "position encoding",
         "relation", "gamma", "softmax", "aggregation")


def _part(name: str) -> str:
    """The part of the network a module (by qualified name) belongs to."""
    leaf = name.rsplit(".", 1)[-1]
    if ".attn." in name + ".":
        if ".gamma" in name:
            return "gamma"
        if leaf in ("phi", "psi", "beta"):
            return "phi/psi/beta"
        if leaf in ("pos_proj", "subtraction"):
            return "position encoding"
        if leaf in ("softmax", "aggregation"):
            return leaf
        return "relation"  # subtraction2, unfold, centre, and the attention module's own ops (cat of z)
    if ".blocks." in name and leaf in ("norm1", "norm2", "act1", "act2"):
        return "block BN+ReLU"
    if ".blocks." in name and leaf == "proj":
        return "block proj"
    return "stem/transitions/head"


def measure(model_name: str, backend: str, memory_efficient: bool, batch: int, size: int) -> dict[str, Any]:
    import timm
    import torch
    import torch.nn.functional as F

    from torchsan import ops

    torch.manual_seed(0)
    model = timm.create_model(model_name, memory_efficient=memory_efficient).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[str] = []
    seen: set[int] = set()
    bytes_by_part: dict[str, int] = defaultdict(int)

    def pre(module, args, name):
        stack.append(name)

    def post(module, args, output, name):
        stack.pop()

    # Hooks only where they do not switch off a fusion: the fused gamma and BN-ReLU-max-pool ops run only on
    # modules without hooks (so that hooks see every module), so gamma and the stem/stage modules get none;
    # gamma is attributed by wrapping run_mapping, and the rest falls to "stem/transitions/head".
    import torchsan.layers.attention as attention

    handles = []
    for name, module in model.named_modules():
        if ".blocks." in name and ".gamma" not in name:
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: pre(m, a, n)))
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: post(m, a, o, n)))
    names = {id(m): n for n, m in model.named_modules()}
    run_mapping = attention.run_mapping

    def tracked_mapping(seq, z):
        stack.append(names.get(id(seq), "gamma"))
        try:
            return run_mapping(seq, z)
        finally:
            stack.pop()

    attention.run_mapping = tracked_mapping

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params and t.device.type == "cpu":
            seen.add(key)
            bytes_by_part[_part(stack[-1] if stack else "")] += storage.nbytes()
        return t

    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 1000, (batch,))
    with ops.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), target)
    for h in handles:
        h.remove()
    attention.run_mapping = run_mapping
    del loss
    total = sum(bytes_by_part.values())
    return {"model": model_name, "backend": backend, "memory_efficient": memory_efficient, "batch": batch,
            "image_size": size, "saved_bytes_total": total, "saved_bytes_by_part": dict(bytes_by_part)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--json", default=str(_common.RESULTS / "memory.json"))
    args = p.parse_args(argv)
    _common.use_checkout()
    configs = [(model, backend, lean) for model in ("san10_pairwise", "san10_patchwise")
               for backend, lean in (("cpu", False), ("cpu", True), ("reference", False))]
    records = [measure(m, b, me, args.batch, args.image_size) for m, b, me in configs]
    headers = ["model", "backend", "memory_efficient", *PARTS, "total"]
    rows = [[r["model"], r["backend"], str(r["memory_efficient"]),
             *[f"{r['saved_bytes_by_part'].get(part, 0) / 1e6:.0f}" for part in PARTS],
             f"{r['saved_bytes_total'] / 1e6:.0f}"] for r in records]
    print(f"Activations saved for backward (MB), one training forward, batch {args.batch}, {args.image_size} px")
    print(_common.table(headers, rows, left=3))
    _common.write_json(Path(args.json), {"machine": _common.machine_info(), "command": _common.command_line(),
                                         "records": records})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
