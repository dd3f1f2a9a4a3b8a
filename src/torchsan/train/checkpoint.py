"""Checkpoints: written atomically, the newest N kept, read back with ``weights_only=True``.

A checkpoint is a dict of tensors and plain values (so ``torch.load(weights_only=True)`` reads it):
``state_dict`` (the model), ``model`` (its name), ``optimizer``, ``scheduler``, ``scaler``,
``epoch`` and ``step`` (the position in the schedule: ``step`` iterations of epoch ``epoch`` are
done), ``epoch_sums`` (each rank's running totals of an unfinished epoch, or None), ``rng``, ``config``,
``history`` (per-epoch metrics), ``best_top1``, ``classes``, ``in_chans``, ``torch_version`` and ``elapsed``
(seconds of training so far).
``model_best.pth`` holds only the model, its name, config and metrics; ``torchsan eval`` and
``torchsan.models.load_checkpoint`` read both kinds.
"""

from __future__ import annotations

import errno
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from ..models._helpers import read_checkpoint

__all__ = ["CheckpointWriteError", "save_atomic", "save_figure_atomic", "write_text_atomic", "list_checkpoints",
           "latest_checkpoint", "prune_checkpoints", "rng_state",
           "set_rng_state", "checkpoint_name", "read_checkpoint"]

_PATTERN = re.compile(r"^checkpoint-e(\d+)-s(\d+)\.pth$")


def checkpoint_name(epoch: int, step: int) -> str:
    """``checkpoint-e0003-s000000.pth``: epoch 3 starts (3 epochs done); sorted by name = by progress."""
    return f"checkpoint-e{epoch:04d}-s{step:06d}.pth"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the file it would replace is intact)."""

    def __str__(self) -> str:
        return str(self.strerror)


class _Sink:
    """A binary file for ``torch.save`` that keeps the first OS error of a write.

    torch's zip writer reports a failed write as "unexpected pos N vs M"; the kept error says why.
    """

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A reader (or a crash at any moment) sees either the old file or the complete new one. Raises
    :class:`CheckpointWriteError` (errno ENOSPC for a full disk) if the file cannot be written; the
    temporary file is removed and an older ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    sink = None
    try:
        with open(tmp, "wb") as f:
            sink = _Sink(f)
            torch.save(obj, sink)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        raise _write_error(sink.error if sink is not None and sink.error is not None else err, path) from err
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        raise _write_error(err, path) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def save_figure_atomic(fig: Any, path: str | os.PathLike[str]) -> None:
    """Save a matplotlib figure as PNG through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def _write_error(cause: BaseException, path: Path) -> CheckpointWriteError:
    """The error of a failed write of ``path``: what happened and where, in one line."""
    code = getattr(cause, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointWriteError(code, f"no space left on {_mount_point(path.parent)} (folder "
                                          f"{str(path.parent)!r}) while writing {path.name}; it was not written")
    reason = getattr(cause, "strerror", None) or " ".join(str(cause).split())[:200]
    return CheckpointWriteError(code or errno.EIO, f"cannot write {str(path)!r}: {reason}")


def _mount_point(folder: Path) -> str:
    """The mount point of the file system that holds ``folder`` (the device a full disk is on)."""
    path = folder.resolve()
    try:
        dev = path.stat().st_dev
        while path.parent != path and path.parent.stat().st_dev == dev:
            path = path.parent
    except OSError:
        pass
    return str(path)


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The run's training checkpoints, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _PATTERN.match(p.name))


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest ``keep`` training checkpoints (``model_best.pth`` is never touched)."""
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
