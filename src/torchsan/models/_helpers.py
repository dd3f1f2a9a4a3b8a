"""Loading checkpoints into this package's models.

:func:`load_checkpoint` reads a file written by ``torch.save`` (with ``weights_only=True``, so a
file cannot run code), converts it to our parameter names and loads it strictly. It accepts:

- the authors' ``model_best.pth`` (https://github.com/hszhao/SAN): ``{"epoch", "state_dict",
  "top1_val", ...}`` whose ``state_dict`` keys carry DDP's ``module.`` prefix;
- a file written by ``torchsan convert`` (``{"state_dict": ..., "model": name}``), or any dict
  with a ``state_dict`` (or ``model``) entry holding a state dict;
- a plain state dict, in the authors' naming or ours, with or without ``module.``.

The conversion is the model family's ``checkpoint_filter_fn`` (the one timm applies for
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from . import resnet, san

__all__ = ["checkpoint_filter_for", "convert_state_dict", "load_checkpoint", "load_converted", "read_checkpoint"]

_SHOW = 5  # how many offending names an error message lists per kind


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` onto the CPU, with clear errors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable checkpoint (truncated, corrupt, not a dict, or it
            needs pickled objects that ``weights_only=True`` refuses).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... by cause
        reason = " ".join(str(err).split()).split(". ")[0][:160] or type(err).__name__
        raise ValueError(
            f"cannot read checkpoint {path!r} ({os.path.getsize(path)} bytes): the file is truncated, "
            f"corrupt, or not a PyTorch checkpoint of tensors ({type(err).__name__}: {reason})"
        ) from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, not a dict of tensors")
    return dict(checkpoint)


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict inside a checkpoint dict (``state_dict`` or ``model`` entry), else itself."""
    for key in ("state_dict", "model"):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            return dict(inner)
    return dict(checkpoint)


def _strip_module(state_dict: dict[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def checkpoint_filter_for(model: nn.Module) -> Callable[..., dict[str, Any]]:
    """The converter for ``model``'s family: SAN's, the ResNets', or plain ``module.`` stripping."""
    if isinstance(model, san.SAN):
        return san.checkpoint_filter_fn
    if isinstance(model, resnet.ResNet):
        return resnet.checkpoint_filter_fn
    return _strip_module


def convert_state_dict(checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """A checkpoint dict (any accepted layout) -> a state dict in ``model``'s names. No loading."""
    state_dict = _unwrap(checkpoint)
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ValueError(
            f"the checkpoint's state dict has {len(non_tensors)} entries that are not tensors "
            f"(e.g. {non_tensors[:_SHOW]}); it is not a model state dict"
        )
    return checkpoint_filter_for(model)(state_dict, model)


def _mismatch_report(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> str:
    """One line naming missing/unexpected keys and shape mismatches; '' when they all match."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    # BatchNorm fills in a missing num_batches_tracked for old checkpoints (as load_state_dict does).
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            parts.append(f"{len(items)} {label} [{', '.join(items[:_SHOW])}{more}]")
    return "; ".join(parts)


def load_converted(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Load a state dict already in ``model``'s names strictly; ``ValueError`` naming what does not fit."""
    report = _mismatch_report(state_dict, model)
    if report:
        raise ValueError(f"{source} does not fit {type(model).__name__}: {report}")
    model.load_state_dict(state_dict, strict=True)
    return model


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint file into ``model`` strictly, converting the authors' names to ours.

    >>> model = timm.create_model("san10_pairwise")
    >>> load_checkpoint(model, "model_best.pth")  # the authors' file, or one of ours

    Returns ``model``. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an
    unreadable file or one that does not fit the model (the message names the missing and
    unexpected keys and the shape mismatches, e.g. a pairwise checkpoint for a patchwise model).
    """
    checkpoint = read_checkpoint(path)
    name = checkpoint.get("model") if isinstance(checkpoint.get("model"), str) else None
    source = f"checkpoint {os.fspath(path)!r}" + (f" (written for {name!r})" if name else "")
    return load_converted(model, convert_state_dict(checkpoint, model), source)
