"""Robustness to a targeted adversarial attack (the paper's Section 5.4): ``torchsan robustness attack``.

A targeted L-infinity PGD in pixel space: the images are taken back from the loader's normalisation to [0, 1], and
the attacked function is ``model(normalise(x))``. Every image gets a random target class other than its own, drawn
from (seed, the image's index in the validation set), so every model faces the same targets (they are saved).
Each step moves the pixels by ``step_size`` against the sign of the gradient of the cross-entropy with the
target, then projects back into the epsilon ball around the image and into [0, 1]. No random start: the attack is
a function of the model and the images. The model stays in eval mode; its BatchNorm statistics are not touched.
The paper does not give its attack's settings, so the defaults here (epsilon 8/255, step 2/255) are ours.
Reported after 1, 2, 4, 8, 16 and 32 steps: the success rate (the prediction is the target) and the top-1
accuracy (the prediction is still the label).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..train.checkpoint import save_figure_atomic
from ._store import ResultStore, pack_bits, result_settings

__all__ = ["EPSILON", "STEP_SIZE", "STEPS", "attack", "pgd", "targets_for"]

EPSILON = 8 / 255
STEP_SIZE = 2 / 255
STEPS = (1, 2, 4, 8, 16, 32)


def targets_for(labels: torch.Tensor, first_index: int, num_classes: int, seed: int) -> torch.Tensor:
    """A target class other than the label for images ``first_index, first_index + 1, ...``: a function of (seed,
    image index) alone, whatever the batch size."""
    from ..data.build import _mix

    offsets = [int(torch.randint(1, num_classes, (1,), generator=torch.Generator().manual_seed(_mix(seed, i))))
               for i in range(first_index, first_index + len(labels))]
    return (labels + torch.tensor(offsets, device=labels.device)) % num_classes


def pgd(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
        epsilon: float, step_size: float, steps: int, record: Sequence[int] = ()) -> tuple[torch.Tensor, dict]:
    """Targeted L-infinity PGD on pixel images (N, C, H, W) in [0, 1].

    Returns (the adversarial images after ``steps`` steps, {step: logits after that step} for the steps in
    ``record``).
    """
    x0 = images.detach()
    x = x0.clone()
    recorded = {}
    for step in range(1, steps + 1):
        x.requires_grad_(True)
        loss = F.cross_entropy(model((x - mean) / std), targets)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x - step_size * grad.sign()  # down the target's loss
            x = torch.min(torch.max(x, x0 - epsilon), x0 + epsilon).clamp(0.0, 1.0)
        if step in record:
            with torch.no_grad():
                recorded[step] = model((x - mean) / std)
    return x.detach(), recorded


def attack_checkpoint(path: str, epsilon: float, step_size: float, steps: Sequence[int], seed: int,
                      **overrides: Any) -> dict[str, Any]:
    """One checkpoint under the attack: success rate and top-1 after each of ``steps``, and the targets."""
    from ..train.engine import checkpoint_evaluation

    with checkpoint_evaluation(path, **overrides) as (model, loader, info, cfg, env):
        if env.distributed:
            raise ValueError("torchsan robustness attack runs in one process (the targets follow the image order)")
        mean = torch.tensor(info.mean, device=env.device).view(1, -1, 1, 1)
        std = torch.tensor(info.std, device=env.device).view(1, -1, 1, 1)
        for p in model.parameters():
            p.requires_grad_(False)  # gradients w.r.t. the pixels only
        success = {s: 0 for s in steps}
        correct = {s: 0 for s in steps}
        clean, count, all_targets, hits = 0, 0, [], []
        for batch in loader:
            if batch is None:
                continue
            images, labels, _ = batch
            images, labels = images.to(env.device), labels.to(env.device)
            pixels = (images * std + mean).clamp(0.0, 1.0)
            targets = targets_for(labels, count, info.num_classes, seed)
            with torch.no_grad():
                clean += (model((pixels - mean) / std).argmax(1) == labels).sum().item()
            _, logits = pgd(model, pixels, targets, mean, std, epsilon, step_size, max(steps), record=steps)
            for s, out in logits.items():
                prediction = out.argmax(1)
                success[s] += (prediction == targets).sum().item()
                correct[s] += (prediction == labels).sum().item()
                if s == max(steps):
                    hits += (prediction == targets).tolist()
            count += len(labels)
            all_targets += targets.tolist()
        if count == 0:
            raise ValueError("the attack saw no images")
        rows = [dict(steps=s, success=100 * success[s] / count, top1=100 * correct[s] / count) for s in steps]
        return dict(checkpoint=path, model=cfg.model, model_kwargs=cfg.model_kwargs, data=info.name, images=count,
                    clean_top1=100 * clean / count, epsilon=epsilon, step_size=step_size, seed=seed, rows=rows,
                    targets=all_targets, success_bits=pack_bits(hits))  # per image, at the most steps


def attack(checkpoints: Sequence[str], output: str, epsilon: float = EPSILON, step_size: float = STEP_SIZE,
           steps: Sequence[int] = STEPS, seed: int = 0, **overrides: Any) -> list[dict[str, Any]]:
    """Attack each checkpoint; write ``attack.json`` (resumable), ``attack.md``, ``attack.csv`` and ``attack.png``."""
    if not (0 < epsilon <= 1 and 0 < step_size <= 1):
        raise ValueError(f"epsilon and step size must be in (0, 1] (pixel scale), got {epsilon} and {step_size}")
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be positive step counts, got {list(steps)}")
    steps = sorted(set(steps))
    ResultStore.check_exist(list(checkpoints))
    store = ResultStore(output, "attack.json")
    settings = dict(epsilon=epsilon, step_size=step_size, steps=steps, seed=seed, **result_settings(overrides))
    results = [store.get_or_compute(
        path, lambda path=path: attack_checkpoint(path, epsilon, step_size, steps, seed, **overrides), **settings)
        for path in checkpoints]
    store.write("attack.md", table(results))
    store.write("attack.csv", _csv(results))
    _plot(results, store.folder / "attack.png")
    return results


def table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: per checkpoint, clean top-1, then success rate and top-1 after each number of steps."""
    if not results:
        return ""
    steps = [r["steps"] for r in results[0]["rows"]]
    first = results[0]
    head = ["model", "images", "clean top-1", *[f"{s} step{'s' if s > 1 else ''}: success / top-1" for s in steps]]
    lines = [f"Targeted L-inf PGD in pixel space, epsilon {first['epsilon'] * 255:.3g}/255, step "
             f"{first['step_size'] * 255:.3g}/255, no random start, targets from seed {first['seed']} (our settings: "
             f"the paper does not give its own).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["model"], str(r["images"]), f"{r['clean_top1']:.2f}",
                 *[f"{row['success']:.2f} / {row['top1']:.2f}" for row in r["rows"]]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(results: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["checkpoint", "model", "images", "epsilon", "step_size", "steps", "success", "top1"])
    for r in results:
        for row in r["rows"]:
            writer.writerow([r["checkpoint"], r["model"], r["images"], r["epsilon"], r["step_size"], row["steps"],
                             f"{row['success']:.4f}", f"{row['top1']:.4f}"])
    return buffer.getvalue()


def _plot(results: Sequence[dict[str, Any]], path: Any) -> None:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        steps = [row["steps"] for row in r["rows"]]
        ax_s.plot(steps, [row["success"] for row in r["rows"]], "-o", label=r["model"])
        ax_t.plot(steps, [row["top1"] for row in r["rows"]], "-o", label=r["model"])
    for ax, label in ((ax_s, "targeted success (%)"), (ax_t, "top-1 (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("PGD steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)
