"""Zero-shot robustness to rotations and flips (the paper's Section 5.4): ``torchsan robustness rotate``.

Each checkpoint is evaluated on its validation images as given, rotated by 90 degrees clockwise, by 180 degrees,
by 90 degrees counter-clockwise, flipped up-down and flipped left-right. No training on transformed images: the
question is how much of what a model learned survives a change of pose. Rows: top-1 and top-5 per transform and
the drop from the images as given. The results go to ``rotate.json`` (one entry per checkpoint, so a run that
stops resumes with the checkpoints not yet done), ``rotate.csv``, ``rotate.md`` and ``rotate.png`` (one image
under every transform).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..train.checkpoint import save_figure_atomic
from ._store import ResultStore, pack_bits, result_settings

__all__ = ["TRANSFORMS", "rotate"]

# name -> transform of an (N, C, H, W) batch; torch.rot90 with k=1 turns the picture counter-clockwise.
TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "as given": lambda x: x,
    "rotated 90 cw": lambda x: torch.rot90(x, -1, dims=(2, 3)),
    "rotated 180": lambda x: torch.rot90(x, 2, dims=(2, 3)),
    "rotated 90 ccw": lambda x: torch.rot90(x, 1, dims=(2, 3)),
    "flipped up-down": lambda x: torch.flip(x, dims=(2,)),
    "flipped left-right": lambda x: torch.flip(x, dims=(3,)),
}


def evaluate_transforms(path: str, **overrides: Any) -> dict[str, Any]:
    """One checkpoint under every transform: {"model", "data", "images", "results": {name: {top1, top5}}}."""
    from ..train.engine import checkpoint_evaluation, evaluate

    with checkpoint_evaluation(path, **overrides) as (model, loader, info, cfg, env):
        results = {}
        for name, transform in TRANSFORMS.items():
            r = evaluate(model, loader, env, cfg.amp, transform=transform, predictions=True)
            results[name] = dict(top1=r["top1"], top5=r["top5"], images=r["count"])
            if r["predictions"] is not None:  # per-image hits, for torchsan report's paired tests
                results[name]["hits"] = pack_bits([p == t for p, t in zip(r["predictions"], r["labels"])])
        return dict(checkpoint=path, model=cfg.model, model_kwargs=cfg.model_kwargs, data=info.name,
                    image_size=cfg.image_size, images=results["as given"]["images"], results=results)


def rotate(checkpoints: Sequence[str], output: str | os.PathLike[str], **overrides: Any) -> list[dict[str, Any]]:
    """Evaluate each checkpoint under every transform; write the tables and figure into ``output``; return the rows.

    A checkpoint already in ``output/rotate.json`` (same file, same size and time) is not evaluated again.
    """
    ResultStore.check_exist(list(checkpoints))
    store = ResultStore(output, "rotate.json")
    rows = [store.get_or_compute(path, lambda path=path: evaluate_transforms(path, **overrides),
                                 **result_settings(overrides)) for path in checkpoints]
    store.write("rotate.md", table(rows))
    store.write("rotate.csv", _csv(rows))
    if rows:
        figure(rows[0], store.folder / "rotate.png",
               **{k: v for k, v in overrides.items() if k in ("data", "image_size")})
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one row per checkpoint, top-1 (drop from "as given") and top-5 per transform."""
    names = list(TRANSFORMS)
    head = ["model", "images", *[f"{n} top-1 (drop)" for n in names], *[f"{n} top-5" for n in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        base = row["results"]["as given"]["top1"]
        cells = [_label(row), str(row["images"])]
        for n in names:
            top1 = row["results"][n]["top1"]
            cells.append(f"{top1:.2f}" if n == "as given" else f"{top1:.2f} ({top1 - base:+.2f})")
        cells += [f"{row['results'][n]['top5']:.2f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _label(row: dict[str, Any]) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in row.get("model_kwargs", {}).items() if k in ("width", "relation",
                                                                                          "position_encoding"))
    return f"{row['model']}" + (f" ({extra})" if extra else "")


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["checkpoint", "model", "data", "images", "transform", "top1", "top5", "top1_drop"])
    for row in rows:
        base = row["results"]["as given"]["top1"]
        for name, r in row["results"].items():
            writer.writerow([row["checkpoint"], row["model"], row["data"], row["images"], name, f"{r['top1']:.4f}",
                             f"{r['top5']:.4f}", f"{r['top1'] - base:.4f}"])
    return buffer.getvalue()


def figure(row: dict[str, Any], path: Path, **overrides: Any) -> None:
    """The first validation image of ``row``'s checkpoint under every transform, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.engine import checkpoint_evaluation

    with checkpoint_evaluation(row["checkpoint"], val_subset=1, **overrides) as (_, loader, info, _cfg, _env):
        images = next(batch for batch in loader if batch is not None)[0][:1]
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    fig, axes = plt.subplots(1, len(TRANSFORMS), figsize=(2.2 * len(TRANSFORMS), 2.6))
    for ax, (name, transform) in zip(axes, TRANSFORMS.items()):
        picture = (transform(images) * std + mean).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        ax.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    save_figure_atomic(fig, path)
