"""The ``torchsan`` command line (also ``python -m torchsan``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__, ops
from .allocator import keep_freed_memory


def _summary(args: argparse.Namespace) -> int:
    import timm

    from .data import sample_batch
    from .models import MODEL_NAMES
    from .profile import PAPER_TABLE, profile_model

    torch.manual_seed(args.seed)
    size = args.image_size
    print(f"torchsan {__version__}, torch {torch.__version__}, timm {timm.__version__}, "
          f"{torch.get_num_threads()} threads")
    from .ops import _cpu

    print(f"CPU kernels: {_cpu.describe()}")
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

    from .models import check_model_kwargs
    from .models._helpers import convert_state_dict, load_converted, read_checkpoint

    checkpoint = read_checkpoint(args.src)
    name = args.model or (checkpoint.get("model") if isinstance(checkpoint.get("model"), str) else None)
    if name is None:
        raise ValueError(f"{args.src!r} does not name its model: pass --model (e.g. san10_pairwise)")
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; see timm.list_models('san*')")
    # A torchsan checkpoint knows its model's arguments and input channels; flags come on top.
    saved = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    kwargs = dict(saved.get("model_kwargs") or {}) if name == saved.get("model") else {}
    kwargs.update(_key_values(args.model_kwargs or [], "--model-kwargs"))
    sizes = {k: kwargs.pop(k) for k in ("in_chans", "num_classes") if k in kwargs}  # legitimate here
    check_model_kwargs(name, kwargs, "--model-kwargs" if args.model_kwargs else "the checkpoint's model_kwargs")
    kwargs.update(sizes)
    if isinstance(checkpoint.get("in_chans"), int):
        kwargs.setdefault("in_chans", checkpoint["in_chans"])
    model = timm.create_model(name, **kwargs)
    state_dict = convert_state_dict(checkpoint, model)
    fc = state_dict.get("fc.weight")
    if isinstance(fc, torch.Tensor) and fc.dim() == 2 and fc.shape[0] != model.num_classes:
        model = timm.create_model(name, **{**kwargs, "num_classes": fc.shape[0]})  # a fine-tuned head
        state_dict = convert_state_dict(checkpoint, model)
    load_converted(model, state_dict, f"checkpoint {args.src!r}")  # strict; names what does not fit
    converted = model.state_dict()
    dst = os.fspath(args.dst)
    tmp = f"{dst}.tmp{os.getpid()}"
    out = {"state_dict": converted, "model": name}
    for key in ("classes", "in_chans"):
        if key in checkpoint:
            out[key] = checkpoint[key]
    try:
        torch.save(out, tmp)
        os.replace(tmp, dst)  # atomic: never a half-written DST
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    n_values = sum(p.numel() for p in model.parameters())
    print(f"converted {args.src} -> {dst}: {len(converted)} tensors, {n_values / 1e6:.2f}M parameters, "
          f"loads strictly into {name} (num_classes={model.num_classes}, in_chans={getattr(model, 'in_chans', '?')})")
    return 0


def _key_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``["a=1", "b=[2, 3]"]`` -> ``{"a": 1, "b": [2, 3]}`` (each value read as YAML)."""
    import yaml

    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            parsed[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"{flag} {item!r}: the value is not valid YAML") from None
    return parsed


def _config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--base-lr 0.05``, ``--no-augment``), all defaulting to "not given"."""
    import dataclasses
    import typing

    from .train import TrainConfig
    from .train.config import field_help

    hints, helps = typing.get_type_hints(TrainConfig), field_help()
    group = parser.add_argument_group("recipe (every key of a config file; defaults: the authors' ImageNet recipe)")
    for f in dataclasses.fields(TrainConfig):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f"{helps.get(f.name, '')} (default {default!r})".strip().replace("%", "%%")
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name == "model_kwargs":
            group.add_argument(flag, action="append", metavar="KEY=VALUE", default=None,
                               help="a model constructor argument, YAML value, e.g. width=0.5 (repeatable); added "
                               "to the config's model_kwargs, replacing only the same key")
            group.add_argument("--drop-model-kwarg", action="append", metavar="KEY", default=None,
                               help="remove KEY from the config's model_kwargs (repeatable)")
        elif f.name == "step_milestones":
            group.add_argument(flag, type=int, nargs="+", default=None, help=text)
        else:
            kind = {int: int, float: float, str: str}.get(hint, float)  # float | None -> float
            group.add_argument(flag, type=kind, default=None, help=text)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from .train import TrainConfig

    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "model_kwargs":
            value = _key_values(value, "--model-kwargs")
        values[f.name] = value
    return values


def _train(args: argparse.Namespace) -> int:
    import timm

    import torchsan.models  # noqa: F401

    from .train import train
    from .train.checkpoint import latest_checkpoint, read_checkpoint

    overrides = _overrides(args)
    source = args.config
    if source is not None and timm.is_model(source):  # "torchsan train san10_pairwise"
        overrides.setdefault("model", source)
        source = None
    if source is None and args.resume not in (None, "auto"):
        # Resuming from a checkpoint alone: its own recipe, with any flags on top. The run folder is the
        # checkpoint's own (or --output): never a folder named inside the file.
        path = latest_checkpoint(args.resume) if os.path.isdir(args.resume) else args.resume
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {args.resume!r}")
        saved = read_checkpoint(path).get("config")
        if not isinstance(saved, dict):
            raise ValueError(f"{str(path)!r} holds no training config: not a torchsan training checkpoint")
        own_folder = os.path.dirname(os.path.abspath(path)).replace("{", "{{").replace("}", "}}")
        overrides = {**{k: v for k, v in saved.items() if k != "output"}, "output": own_folder, **overrides}
    cfg = _merge_model_kwargs(source, overrides, args.drop_model_kwarg or [])
    summary = train(cfg, resume=args.resume)
    final = summary["final"]
    if args.json and _is_rank0():
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if final.get("val_top1") is not None or cfg.eval_every > cfg.epochs else 1


def _merge_model_kwargs(source: str | None, overrides: dict[str, Any], drop: list[str]) -> Any:
    """The config of ``source`` with ``overrides``, where ``--model-kwargs`` adds to (or replaces single keys of)
    the config's ``model_kwargs`` instead of replacing all of them, and ``--drop-model-kwarg KEY`` removes one."""
    from .train import load_config

    flags = overrides.pop("model_kwargs", None)
    cfg = load_config(source, **overrides)
    if flags is None and not drop:
        return cfg
    merged = {**cfg.model_kwargs, **(flags or {})}
    for key in drop:
        if key not in merged:
            raise ValueError(f"--drop-model-kwarg {key}: not among the model_kwargs ({', '.join(merged) or 'none'})")
        del merged[key]
    return load_config(source, **overrides, model_kwargs=merged)


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _eval(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint

    overrides = dict(data=args.data, image_size=args.image_size, val_subset=args.val_subset,
                     batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
                     channels_last=args.channels_last, skip_corrupt=args.skip_corrupt or None, threads=args.threads)
    result = evaluate_checkpoint(args.checkpoint, ignore_class_names=args.ignore_class_names,
                                 predictions_to=args.predictions, **overrides)
    if not _is_rank0():
        return 0
    skipped = f", {result['skipped']} corrupt images skipped" if result["skipped"] else ""
    print(f"{result['model']} on {result['data']} ({result['count']} images, {result['image_size']} px): "
          f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%, loss {result['loss']:.4f}, "
          f"{result['seconds']:.1f} s{skipped}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


_SUMMARY_FIELDS = {"model": str, "params": int, "epochs": int, "image_size": int, "best_val_top1": (int, float),
                   "seconds": (int, float), "final": dict}


def _read_summary(run: str) -> dict[str, Any]:
    """A run folder's (or file's) ``summary.json``; ValueError naming the file if it is not one torchsan wrote."""
    path = os.path.join(run, "summary.json") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run!r} has no summary.json (is it a finished torchsan run folder?)")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path!r} is not readable JSON ({' '.join(str(err).split())})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path!r} is not a torchsan run summary (it holds a {type(summary).__name__})")
    wrong = [k for k, kind in _SUMMARY_FIELDS.items() if not isinstance(summary.get(k), kind)
             or isinstance(summary.get(k), bool)]
    if wrong:
        raise ValueError(f"{path!r} is not a torchsan run summary (missing or malformed: {', '.join(wrong)})")
    return summary


def _results(args: argparse.Namespace) -> int:
    rows = [_read_summary(run) for run in args.runs]
    header = (f"{'model':<18} {'params':>8} {'GMACs':>6} {'epochs':>6} {'px':>4} {'val top-1':>9} {'top-5':>7} "
              f"{'best':>7} {'minutes':>7}  run")
    print(header)
    print("-" * len(header))
    nan = float("nan")
    for r in rows:
        final = r["final"]
        top1, top5 = (final.get(k) for k in ("val_top1", "val_top5"))
        gmacs = f"{r['gmacs']:.3f}" if isinstance(r.get("gmacs"), (int, float)) else "-"
        print(f"{r['model']:<18} {r['params'] / 1e6:>7.2f}M {gmacs:>6} {r['epochs']:>6} {r['image_size']:>4} "
              f"{top1 if isinstance(top1, (int, float)) else nan:>8.2f}% "
              f"{top5 if isinstance(top5, (int, float)) else nan:>6.2f}% "
              f"{r['best_val_top1']:>6.2f}% {r['seconds'] / 60:>7.1f}  {r.get('run_dir', '')}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .studies.report import report

    print(f"wrote {report(args.dir, args.output, args.title, collect=args.collect, claims=args.claims)}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from .studies import rotate

    overrides = dict(data=args.data, image_size=args.image_size, val_subset=args.val_subset,
                     batch_size=args.batch_size, workers=args.workers, device=args.device, threads=args.threads)
    rows = rotate(args.checkpoints, args.output, **overrides)
    if _is_rank0():
        print((Path(args.output) / "rotate.md").read_text(), end="")
        print(f"wrote {args.output}/rotate.md, rotate.csv, rotate.json, rotate.png ({len(rows)} checkpoint(s))")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    import timm

    import torchsan.models  # noqa: F401

    from .studies import ablate

    overrides = _overrides(args)
    output = overrides.pop("output", "runs/ablate")
    source = args.config
    if timm.is_model(source):
        overrides.setdefault("model", source)
        source = None
    base = _merge_model_kwargs(source, overrides, args.drop_model_kwarg or [])
    rows = ablate(args.study, base, output, reuse=args.reuse or [], jobs=args.jobs)
    if _is_rank0():
        print((Path(output) / f"ablate-{args.study}.md").read_text(), end="")
        print(f"wrote {output}/ablate-{args.study}.md, .csv, .json, .png ({len(rows)} runs)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"torchsan export needs onnx and onnxscript ({err}): pip install 'torchsan[onnx]'") from None
    result = export_checkpoint(args.checkpoint, args.output, image_size=args.image_size, batch=args.batch,
                               dynamic_batch=not args.fixed_batch, include_normalization=args.pixels,
                               check=not args.no_check)
    batch = "any batch size" if result["dynamic_batch"] else f"batch {args.batch}"
    print(f"wrote {result['path']}: {result['model']}, input (N, C, {result['image_size']}, {result['image_size']}) "
          f"= {result['input']}, {batch}, {result['classes']} classes")
    if result["checked"]:
        print(f"checked in ONNX Runtime at batch {', '.join(map(str, result['batches']))}: logits within "
              f"{result['max_relative_error']:.1e} of eager PyTorch (relative to their size)")
    elif not args.no_check:
        print(f"not checked: {result.get('reason')}")
    return 0


def _pixels(text: str) -> float:
    """A pixel-scale amount: "8/255" or "0.0314"."""
    from fractions import Fraction

    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from None


def _attack(args: argparse.Namespace) -> int:
    from .studies import attack

    overrides = dict(data=args.data, image_size=args.image_size, val_subset=args.val_subset,
                     batch_size=args.batch_size, workers=args.workers, device=args.device, threads=args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    results = attack(args.checkpoints, args.output, args.epsilon, args.step_size, steps, args.seed, **overrides)
    print((Path(args.output) / "attack.md").read_text(), end="")
    print(f"wrote {args.output}/attack.md, attack.csv, attack.json, attack.png ({len(results)} checkpoint(s))")
    return 0


def _evaluation_flags(p: argparse.ArgumentParser) -> None:
    """The flags that override a checkpoint's data and evaluation settings (eval and the studies)."""
    p.add_argument("--data", help="an ImageNet-layout folder (its val/ split) or fashion-mnist (default: the run's)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--val-subset", type=int, help="use this many validation images (balanced); 0 = all")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--device")


def _study_flags(p: argparse.ArgumentParser, output: str) -> None:
    p.add_argument("checkpoints", nargs="+", help="checkpoints written by torchsan train (model_best.pth ...)")
    p.add_argument("--output", default=output, help="folder for the result files")
    _evaluation_flags(p)
    p.add_argument("--threads", type=int)


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
    p.add_argument("--model", help="timm model name, e.g. san10_pairwise or san_resnet26 (default: the one a "
                   "torchsan checkpoint names)")
    p.add_argument("--model-kwargs", action="append", metavar="KEY=VALUE", default=None,
                   help="a model constructor argument, YAML value, e.g. in_chans=1 (repeatable; a torchsan "
                   "checkpoint's own are used by default)")
    p.set_defaults(func=_convert)
    p = sub.add_parser("train", help="train a model on an ImageNet-layout folder or the embedded Fashion-MNIST",
                       description="Train a model. CONFIG is a YAML file, a packaged config name "
                       "(fashion_mnist/san10_pairwise, imagenet/san10_pairwise, ...) or a model name; "
                       "flags override its values. Launch with torchrun for several processes.")
    p.add_argument("config", nargs="?", help="YAML file, packaged config name, or model name")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from a checkpoint file or run folder; alone: this run's newest checkpoint")
    p.add_argument("--json", help="also write the run summary to this JSON file")
    _config_flags(p)
    p.set_defaults(func=_train)
    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on its data set or another folder")
    p.add_argument("checkpoint", help="a training checkpoint or model_best.pth written by torchsan train")
    _evaluation_flags(p)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: the run's setting)")
    p.add_argument("--predictions", metavar="FILE",
                   help="also write every image's label and top-1 class (JSON, the data set's order) to FILE")
    p.add_argument("--threads", type=int)
    p.add_argument("--skip-corrupt", action="store_true", help="skip and count corrupt images")
    p.add_argument("--ignore-class-names", action="store_true",
                   help="evaluate even if the data's class names differ from the checkpoint's (same count)")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.set_defaults(func=_eval)
    p = sub.add_parser("ablate", help="the paper's ablations: one training run per variant of one option",
                       description="Train every variant of STUDY from a base config (CONFIG: a YAML file, a "
                       "packaged config or a SAN model name; flags override its values), each into "
                       "OUTPUT/STUDY/VARIANT, resuming runs that were stopped; then tabulate top-1, top-5, "
                       "parameters and MACs.")
    from .studies.ablate import STUDIES

    p.add_argument("study", choices=STUDIES)
    p.add_argument("config", nargs="?", default="fashion_mnist/san10_pairwise",
                   help="the base: YAML file, packaged config or SAN model name (default fashion_mnist/san10_pairwise)")
    p.add_argument("--reuse", nargs="+", metavar="RUN",
                   help="run folders that stand for the variant whose config they trained (same recipe and model; "
                        "an option left out counts as its default) instead of training it again; give it after "
                        "STUDY and CONFIG")
    p.add_argument("--jobs", type=int, default=1, metavar="J",
                   help="train J variants at a time, each in a process of its own on 1/J of the threads (on 2 "
                        "cores, --jobs 2 trains small models faster than one run on both; default 1)")
    _config_flags(p)
    p.set_defaults(func=_ablate)
    p = sub.add_parser("export", help="a checkpoint as an ONNX file (standard operators only), checked in ONNX Runtime",
                       description="Export a torchsan train checkpoint to ONNX. The graph holds only standard "
                       "operators (torchsan's ops exported as their plain PyTorch composition), so ONNX Runtime or "
                       "any ONNX consumer runs it without torchsan. Needs pip install 'torchsan[onnx]'.")
    p.add_argument("checkpoint", help="a training checkpoint or model_best.pth written by torchsan train")
    p.add_argument("output", help="the .onnx file to write")
    p.add_argument("--image-size", type=int, help="input size (default: the training size)")
    p.add_argument("--batch", type=int, default=1, help="the example batch the export traces with (default 1)")
    p.add_argument("--fixed-batch", action="store_true", help="fix the batch size in the graph (default: free)")
    p.add_argument("--pixels", action="store_true",
                   help="the graph takes pixels in [0, 1] and normalises them itself (default: normalised input; "
                        "the mean and std are in the file's metadata)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with eager PyTorch in ONNX Runtime")
    p.set_defaults(func=_export)
    p = sub.add_parser("robustness", help="zero-shot robustness of checkpoints (the paper's Section 5.4)")
    studies = p.add_subparsers(dest="study", required=True)
    p = studies.add_parser("rotate", help="top-1/top-5 on the validation images as given, rotated by 90 (cw and "
                           "ccw) and 180 degrees and flipped up-down and left-right; resumes where it stopped")
    _study_flags(p, "runs/robustness")
    p.set_defaults(func=_rotate)
    p = studies.add_parser("attack", help="targeted L-infinity PGD in pixel space: success rate and top-1 after 1 "
                           "to 32 steps; random targets from (seed, image index); resumes where it stopped")
    _study_flags(p, "runs/robustness")
    p.add_argument("--epsilon", type=_pixels, default=8 / 255, help="L-infinity radius in pixels (default 8/255)")
    p.add_argument("--step-size", type=_pixels, default=2 / 255, help="per step (default 2/255)")
    p.add_argument("--steps", default="1,2,4,8,16,32", help="report after these step counts (default 1,2,4,8,16,32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the target classes")
    p.set_defaults(func=_attack)
    p = sub.add_parser("results", help="a table of finished runs (their summary.json)")
    p.add_argument("runs", nargs="+", help="run folders")
    p.set_defaults(func=_results)
    p = sub.add_parser("report", help="one Markdown page from the result files under DIR, with paired tests",
                       description="Build a Markdown page from the stored results under DIR (run folders, "
                       "ablate-*.json, rotate.json, attack.json): their tables, and McNemar's exact test for each "
                       "comparison (gaps with p >= 0.05 are written as not resolved).")
    p.add_argument("dir", help="a folder of results (searched recursively)")
    p.add_argument("--output", help="the page to write (default DIR/report.md)")
    p.add_argument("--title", default="torchsan results")
    p.add_argument("--collect", metavar="FOLDER",
                   help="first copy the result files (no checkpoints or TensorBoard logs) to FOLDER, keeping their "
                        "layout, and build the page from there: a copy small enough to commit beside the page")
    p.add_argument("--claims", metavar="FILE",
                   help="a YAML file of claims, each a comparison of two results with an expectation: the page "
                        "opens with each claim's verdict (agrees, disagrees, not resolved); see "
                        "torchsan.studies.claims")
    p.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "eval", "summary", "ablate", "robustness"):
        keep_freed_memory()  # large tensors are reused instead of faulted in afresh every step (allocator.py)
    try:
        return args.func(args)
    except (ValueError, TypeError, KeyError, RuntimeError, OSError, FloatingPointError) as err:
        if os.environ.get("TORCHSAN_DEBUG"):
            raise
        # A data loader worker re-raises with its traceback in the message: keep the original last line.
        text = str(err).strip().splitlines()
        print(f"torchsan: error: {text[-1] if text else type(err).__name__}", file=sys.stderr)
        return 2
