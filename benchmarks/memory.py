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
import time
from collections import defaultdict
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
        if leaf in ("phi", "psi", "beta", "attn"):
            return "phi/psi/beta"  # (the attention module's own op: phi, psi and beta as one stacked convolution)
        if leaf in ("pos_proj", "subtraction"):
            return "position encoding"
        if leaf in ("softmax", "aggregation"):
            return leaf
        return "relation"  # subtraction2 (with the position encoding appended), unfold, centre
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

    # No module hooks: the fused routes run only on modules without hooks (so that hooks see every module), and
    # hooks here would measure the unfused model. Instead nn.Module.__call__ is wrapped for the duration, which
    # tracks the running module without registering anything, and the fused calls made outside any submodule's
    # __call__ are wrapped by name: gamma (run_mapping, and ops.subtraction2_batchnorm_relu_conv1x1, z with gamma's
    # first triple), the block's BN-ReLU-conv1x1 pairs (norm_act_conv1x1), the softmax + aggregation
    # (ops.softmax_aggregation) and the attention after its transforms (attend).
    import torchsan.layers.attention as attention
    import torchsan.layers.block as block
    import torchsan.layers.fused as fused

    names = {id(m): n for n, m in model.named_modules()}
    module_call = torch.nn.Module.__call__

    def tracked_call(module, *args, **kwargs):
        stack.append(names.get(id(module), ""))
        try:
            return module_call(module, *args, **kwargs)
        finally:
            stack.pop()

    def tracked(fn, label):
        def wrapper(*args, **kwargs):
            stack.append(label(*args) if callable(label) else label)
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()
        return wrapper

    def gamma_label(seq, z):
        return names.get(id(seq), "x.attn.gamma")

    def pair_label(bn, *args):
        return names.get(id(bn), "")

    wrapped = [(attention, "run_mapping", gamma_label), (fused, "run_mapping", gamma_label),
               (block, "norm_act_conv1x1", pair_label), (fused, "norm_act_conv1x1", pair_label),
               (ops, "softmax_aggregation", "x.attn.aggregation"),
               # z + gamma's first triple as one op (z never written): its saved tensors count as gamma's
               (ops, "subtraction2_batchnorm_relu_conv1x1", "x.attn.gamma"),
               # the block calls attend directly when it has fused the attention's transforms into its BN-ReLU
               (attention._SelfAttention, "attend", lambda a, *r: names.get(id(a), "x.attn"))]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in wrapped]
    for owner, attr, label in wrapped:
        setattr(owner, attr, tracked(getattr(owner, attr), label))
    torch.nn.Module.__call__ = tracked_call

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params and t.device.type == "cpu":
            seen.add(key)
            bytes_by_part[_part(stack[-1] if stack else "")] += storage.nbytes()
        return t

    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 1000, (batch,))
    try:
        with ops.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), target)
    finally:
        torch.nn.Module.__call__ = module_call
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)
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
    start = time.perf_counter()
    _common.use_checkout()
    configs = [(model, backend, lean) for model in ("san10_pairwise", "san10_patchwise")
               for backend, lean in (("cpu", False), ("cpu", True), ("reference", False))]
    records = [measure(m, b, me, args.batch, args.image_size) for m, b, me in configs]
    headers = ["model", "backend", "memory_efficient", *PARTS, "total"]
    rows = [[r["model"], r["backend"], str(r["memory_efficient"]),
             *[f"{r['saved_bytes_by_part'].get(part, 0) / 1e6:.0f}" for part in PARTS],
             f"{r['saved_bytes_total'] / 1e6:.0f}"] for r in records]
    text = (f"Activations saved for backward (MB), one training forward, batch {args.batch}, {args.image_size} px\n"
            + _common.table(headers, rows, left=3))
    _common.finish("memory", args.json, _common.machine_info(), vars(args), records, text, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
