"""The ``torchsan`` command line (also ``python -m torchsan``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import torch

from . import __version__, ops


def _summary(args: argparse.Namespace) -> int:
    import timm

    from .data import sample_batch
    from .models import MODEL_NAMES
    from .profile import PAPER_TABLE, profile_model

    torch.manual_seed(args.seed)
    size = args.image_size
    print(f"torchsan {__version__}, torch {torch.__version__}, timm {timm.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"\nModels at {size} px (MACs counted with the authors' rules; paper = Table 1 at 224 px)")
    header = f"{'model':<16} {'params':>8} {'paper':>7} {'GMACs':>7} {'paper':>6} {'diff':>7}"
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.models or MODEL_NAMES:
        model = timm.create_model(name)
        prof = profile_model(model, (3, size, size))
        p_params, p_gmacs = PAPER_TABLE[name][:2]
        diff = f"{100 * (prof.gmacs / p_gmacs - 1):+.1f}%" if size == 224 else "-"
        print(f"{name:<16} {prof.mparams:>7.2f}M {p_params:>6.1f}M {prof.gmacs:>7.3f} {p_gmacs:>6.1f} {diff:>7}")
        rows.append(dict(model=name, params=prof.params, macs=prof.macs, paper_mparams=p_params,
                         paper_gmacs=p_gmacs, image_size=size))

    images, names = sample_batch(size)
    model = timm.create_model(args.model)
    model.train()
    backend = ops.backend_for(images)  # builds the fused CPU kernels on first use, outside the timing
    print(f"\nOne training step of {args.model} on {len(names)} real images shipped with matplotlib "
          f"({', '.join(names)}), {size} px, ops backend {backend!r}:")
    start = time.perf_counter()
    logits = model(images)
    # A fixed, arbitrary target per image: the point is a real forward and backward pass.
    target = torch.arange(len(names)) % logits.shape[1]
    loss = torch.nn.functional.cross_entropy(logits, target)
    loss.backward()
    elapsed = time.perf_counter() - start
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    ok = all(torch.isfinite(g).all() for g in grads) and bool(torch.isfinite(loss))
    print(f"  logits {tuple(logits.shape)}, loss {loss.item():.4f}, gradient norm {grad_norm.item():.4f}, "
          f"{sum(g is not None for g in grads)} parameter tensors with gradients, "
          f"forward+backward {elapsed:.2f} s -> {'ok' if ok else 'NON-FINITE VALUES'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(models=rows, step=dict(model=args.model, loss=loss.item(),
                                                  grad_norm=grad_norm.item(), seconds=elapsed)), f, indent=2)
    return 0 if ok else 1


def _convert(args: argparse.Namespace) -> int:
    import timm

    from .models._helpers import convert_state_dict, load_converted, read_checkpoint

    if not timm.is_model(args.model):
        raise ValueError(f"unknown model {args.model!r}; see timm.list_models('san*')")
    checkpoint = read_checkpoint(args.src)
    model = timm.create_model(args.model)
    state_dict = convert_state_dict(checkpoint, model)
    fc = state_dict.get("fc.weight")
    if isinstance(fc, torch.Tensor) and fc.dim() == 2 and fc.shape[0] != model.num_classes:
        model = timm.create_model(args.model, num_classes=fc.shape[0])  # a fine-tuned head
        state_dict = convert_state_dict(checkpoint, model)
    load_converted(model, state_dict, f"checkpoint {args.src!r}")  # strict; names what does not fit
    converted = model.state_dict()
    dst = os.fspath(args.dst)
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        torch.save({"state_dict": converted, "model": args.model}, tmp)
        os.replace(tmp, dst)  # atomic: never a half-written DST
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    n_values = sum(p.numel() for p in model.parameters())
    print(f"converted {args.src} -> {dst}: {len(converted)} tensors, {n_values / 1e6:.2f}M parameters, "
          f"loads strictly into {args.model} (num_classes={model.num_classes})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchsan", description=__doc__)
    parser.add_argument("--version", action="version", version=f"torchsan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="params and GMACs of every model beside the paper's, and one "
                       "training step of SAN10 pairwise on real images that ship with matplotlib")
    p.add_argument("--models", nargs="*", help="models to tabulate (default: all nine)")
    p.add_argument("--model", default="san10_pairwise", help="model for the training step")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=_summary)
    p = sub.add_parser("convert", help="convert the authors' SAN/ResNet checkpoint (model_best.pth) to this "
                       "package's names, checking that it loads strictly into the model")
    p.add_argument("src", help="the authors' checkpoint (or any state dict file the model accepts)")
    p.add_argument("dst", help="output file: {'state_dict': ..., 'model': NAME}")
    p.add_argument("--model", required=True, help="timm model name, e.g. san10_pairwise or san_resnet26")
    p.set_defaults(func=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"torchsan: error: {err}", file=sys.stderr)
        return 2
