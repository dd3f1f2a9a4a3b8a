"""torch.distributed set-up for runs launched by ``torchrun`` (one process when launched plainly)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "all_reduce_sum", "shutdown"]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, NCCL on GPU).

    Multi-node: run the same ``torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d
    --rdzv-endpoint HOST:PORT -m torchsan train ...`` on every node.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    env = DistEnv(rank, world_size, local_rank, _pick_device(device, local_rank))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=env.device if backend == "nccl" else None)
    return env


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few numbers over the processes (float64, on the collective's device)."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
