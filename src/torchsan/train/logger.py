"""Per-epoch metrics to CSV, JSON, TensorBoard and a PNG plot, in the run folder (main process only)."""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any

from .checkpoint import save_figure_atomic, write_text_atomic

__all__ = ["MetricsLogger", "plot_history"]


class MetricsLogger:
    """Writes ``metrics.csv``, ``metrics.json``, ``curves.png`` and TensorBoard events under ``run_dir``.

    The whole history is rewritten each epoch from the checkpointed list, so a resumed run's files
    hold exactly one row per finished epoch.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.run_dir, self.writer = run_dir, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a trimmed install may lack it
                warnings.warn("tensorboard is not installed: no TensorBoard logs", stacklevel=2)

    def log_epoch(self, history: list[dict[str, Any]], tensorboard: bool = True) -> None:
        row = history[-1]
        keys = list(dict.fromkeys(k for r in history for k in r))
        table = io.StringIO(newline="")
        w = csv.DictWriter(table, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
        write_text_atomic(self.run_dir / "metrics.csv", table.getvalue())
        write_text_atomic(self.run_dir / "metrics.json", json.dumps(history, indent=1))
        if self.writer is not None and tensorboard:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
            self.writer.flush()
        plot_history(history, self.run_dir / "curves.png")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and top-1 accuracy against epochs, training and validation, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "top1", "top-1 accuracy (%)")):
        for split, style in (("train", "-o"), ("val", "-s")):
            pts = [(e, r[f"{split}_{key}"]) for e, r in zip(epochs, history) if r.get(f"{split}_{key}") is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(path.parent.name)
    fig.tight_layout()
    save_figure_atomic(fig, path)
