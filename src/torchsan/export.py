"""ONNX export of a trained checkpoint (``torchsan export``).

``torch.onnx.export(model, (x,), path, dynamo=True)`` works on any torchsan model as it is: while a model is exported
the ``auto`` backend runs the plain PyTorch reference ops (see :mod:`torchsan.ops`), so the ONNX graph holds only
standard operators and runs in ONNX Runtime without torchsan. This module adds what a deployment needs around it:
the model built from a checkpoint, a batch dimension left free, the preprocessing written into the file's metadata
(or into the graph), and ONNX Runtime's output checked against eager PyTorch on the same input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Normalized", "export_checkpoint", "export_onnx", "load_trained_model"]


class Normalized(nn.Module):
    """``model`` behind its input normalisation: takes pixels in [0, 1], (N, C, H, W) -> logits (N, classes)."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def load_trained_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a ``torchsan train`` checkpoint in eval mode, and what a deployment needs to feed it.

    The second item holds ``model``, ``image_size``, ``in_chans``, ``classes`` and the ``mean`` and ``std`` the
    training data were normalised with.
    """
    from .data.build import normalization
    from .models._helpers import load_converted, read_checkpoint
    from .train.config import TrainConfig, load_config
    from .train.engine import _create_model

    ckpt = read_checkpoint(str(path))
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), str):
        raise ValueError(f"{str(path)!r} has no torchsan training config; for other checkpoints build the model "
                         f"and call torch.onnx.export on it")
    classes = ckpt.get("classes")
    if not isinstance(classes, list) or not classes:
        raise ValueError(f"{str(path)!r} does not record its classes")
    saved = {k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__}
    cfg = load_config(None, **saved)
    in_chans = int(ckpt.get("in_chans", 3))
    model = _create_model(cfg, len(classes), in_chans)
    load_converted(model, ckpt["state_dict"], f"checkpoint {str(path)!r}")
    mean, std = normalization(cfg.data)
    info = dict(model=cfg.model, image_size=cfg.image_size, in_chans=in_chans, classes=[str(c) for c in classes],
                mean=list(mean), std=list(std))
    return model.eval(), info


def export_onnx(model: nn.Module, path: str | os.PathLike[str], example: torch.Tensor, dynamic_batch: bool = True,
                metadata: dict[str, str] | None = None, check: bool = True) -> dict[str, Any]:
    """Export ``model`` (eval mode, CPU) to ONNX at ``path``; returns what was done and checked.

    ``example``: an input (N, C, H, W); ``dynamic_batch`` leaves N free in the graph. ``metadata``: key-value pairs
    stored in the file. ``check``: run the file in ONNX Runtime (when installed) on ``example`` and on a batch of
    another size, and compare with eager PyTorch (ValueError beyond 1e-4 relative to the logits' size).
    """
    import onnx  # before any work: a missing extra fails here (pip install 'torchsan[onnx]')

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    tmp = path.with_name(path.name + ".tmp")
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=["x"], output_names=["logits"], verbose=False, report=False)
    except Exception as err:  # the exporter's own message ends in a pointer to its report: name the cause
        cause = err.__cause__ or err
        first = next((line for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        raise RuntimeError(f"torch.onnx.export failed: {type(cause).__name__}: {first.strip()}") from err
    program.save(str(tmp))
    if metadata:
        proto = onnx.load(str(tmp))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
    result: dict[str, Any] = dict(path=str(path), dynamic_batch=dynamic_batch, checked=False)
    if check:
        result.update(_check(model, tmp, example, dynamic_batch))
    os.replace(tmp, path)
    return result


def _check(model: nn.Module, path: Path, example: torch.Tensor, dynamic_batch: bool) -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        return dict(checked=False, reason="onnxruntime is not installed")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [example]
    if dynamic_batch:
        generator = torch.Generator().manual_seed(0)
        inputs.append(torch.randn((example.shape[0] + 2, *example.shape[1:]), generator=generator))
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            expected = model(x).float()
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        error = (torch.from_numpy(got) - expected).abs().max().item() / max(1.0, expected.abs().max().item())
        worst = max(worst, error)
        if error > 1e-4:
            raise ValueError(f"ONNX Runtime's logits differ from eager PyTorch's by {error:.2e} (relative) at batch "
                             f"{x.shape[0]}; the file is left at {str(path)!r} for inspection")
    return dict(checked=True, max_relative_error=worst, batches=[int(x.shape[0]) for x in inputs])


def export_checkpoint(checkpoint: str | os.PathLike[str], output: str | os.PathLike[str],
                      image_size: int | None = None, batch: int = 1, dynamic_batch: bool = True,
                      include_normalization: bool = False, check: bool = True) -> dict[str, Any]:
    """Export a ``torchsan train`` checkpoint to ONNX (see :func:`export_onnx`).

    The graph takes normalised images (N, C, S, S), S = ``image_size`` (default: the training size); with
    ``include_normalization`` it takes pixels in [0, 1] and normalises them itself. The file's metadata records the
    model, the size, the classes and the normalisation.
    """
    if batch < 1 or (image_size is not None and image_size < 1):
        raise ValueError(f"the batch and the image size must be positive, got {batch} and {image_size}")
    model, info = load_trained_model(checkpoint)
    size = image_size or info["image_size"]
    if include_normalization:
        model = Normalized(model, info["mean"], info["std"]).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.rand((batch, info["in_chans"], size, size), generator=generator)
    if not include_normalization:
        mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
        example = (example - mean) / torch.tensor(info["std"]).view(1, -1, 1, 1)
    metadata = dict(model=info["model"], image_size=str(size), classes=json.dumps(info["classes"]),
                    input="pixels in [0, 1]" if include_normalization else "(pixels - mean) / std",
                    mean=json.dumps(info["mean"]), std=json.dumps(info["std"]), exported_by="torchsan")
    result = export_onnx(model, output, example, dynamic_batch=dynamic_batch, metadata=metadata, check=check)
    result.update(model=info["model"], image_size=size, classes=len(info["classes"]),
                  input=metadata["input"])
    return result
