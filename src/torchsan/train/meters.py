"""Running totals of a training epoch, on one process, in the checkpoint's list form and summed over ranks."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .distributed import DistEnv, all_reduce_sum

__all__ = ["EpochMeters"]


@dataclass
class EpochMeters:
    """One rank's totals over the iterations of an epoch done so far.

    ``seconds`` is the training time of the epoch before the current (re)start: a run resumed mid-epoch
    carries the time its checkpoint recorded; ``snapshot`` adds the time since.
    """

    loss_sum: float = 0.0  # the batch losses times the batch sizes
    correct: float = 0.0  # top-1 hits against the hard labels
    images: float = 0.0
    skipped: float = 0.0  # corrupt images dropped from the batches
    seconds: float = 0.0

    def update(self, loss: float, correct: float, images: int, skipped: int) -> None:
        """Add one batch: its mean ``loss``, its top-1 hits, its size and its corrupt images."""
        self.loss_sum += loss * images
        self.correct += correct
        self.images += images
        self.skipped += skipped

    def snapshot(self, since: float) -> EpochMeters:
        """A copy whose ``seconds`` includes the time from ``since`` (a ``time.perf_counter()`` reading) to now."""
        return replace(self, seconds=self.seconds + time.perf_counter() - since)

    def to_list(self) -> list[float]:
        """The checkpoint's form: ``[loss_sum, correct, images, skipped, seconds]``."""
        return [self.loss_sum, self.correct, self.images, self.skipped, self.seconds]

    @classmethod
    def from_list(cls, values: list[float]) -> EpochMeters:
        """The inverse of ``to_list`` (five numbers, as a checkpoint's ``epoch_sums`` holds per rank)."""
        loss_sum, correct, images, skipped, seconds = values
        return cls(loss_sum, correct, images, skipped, seconds)

    def all_reduce(self, env: DistEnv) -> EpochMeters:
        """The counts summed over the processes (a collective); ``seconds`` stays this rank's."""
        loss_sum, correct, images, skipped = all_reduce_sum(self.to_list()[:4], env)
        return EpochMeters(loss_sum, correct, images, skipped, self.seconds)

    def gather(self, env: DistEnv) -> list[list[float]]:
        """Every rank's ``to_list()``, rank 0 first (a collective), for a mid-epoch checkpoint's ``epoch_sums``."""
        if not env.distributed:
            return [self.to_list()]
        t = torch.tensor(self.to_list(), dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
        gathered = [torch.zeros_like(t) for _ in range(env.world_size)]
        dist.all_gather(gathered, t)
        return [g.tolist() for g in gathered]
