"""The training and evaluation loops.

``train(config)`` runs on one process or, launched by ``torchrun``, on many (DistributedDataParallel,
gloo on the CPU, NCCL on GPUs). Every random draw is a function of (seed, rank, epoch, iteration)
and the checkpoint holds the whole state, so a resumed run, after a crash or a SIGKILL, continues
bit-for-bit where its last checkpoint left off (in deterministic mode on the CPU).

The steps of a run, in order: ``_check_settings`` and ``_check_model``, ``_lock_run_folder`` (one run
per folder), ``_find_resume_checkpoint`` (every check before anything is written), ``_build_data``,
``_build_parts`` (which also runs the model once at the image size), ``_resume_run``, ``_open_run_dir``,
then per epoch ``train_one_epoch``, ``validate`` and ``_end_epoch``, and last ``_finish`` (the summary).
"""

from __future__ import annotations

import errno
import math
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data import DataInfo, build_datasets, build_loader
from ..data.build import _mix
from ..models._helpers import load_converted, read_checkpoint
from .checkpoint import (
    CheckpointWriteError,
    checkpoint_name,
    latest_checkpoint,
    prune_checkpoints,
    rng_state,
    save_atomic,
    set_rng_state,
    write_text_atomic,
)
from .config import TrainConfig, load_config
from .distributed import DistEnv, all_reduce_sum, init_distributed, shutdown
from .logger import MetricsLogger
from .losses import mixup, smooth_targets, soft_cross_entropy
from .meters import EpochMeters
from .run_folder import RunFolderLock, remove_stale_temp_files

__all__ = ["train", "evaluate", "evaluate_checkpoint", "checkpoint_evaluation", "check_classes", "lr_factor",
           "SCHEDULE_KEYS"]

# Settings a resumed run must share with its checkpoint: they define the function being trained
# and the schedule. Everything else (workers, threads, progress, output, ...) may change.
SCHEDULE_KEYS = (
    "model", "model_kwargs", "data", "image_size", "train_subset", "augment", "epochs", "batch_size", "base_lr",
    "lr", "momentum", "weight_decay", "schedule", "schedule_unit", "step_milestones", "warmup_epochs",
    "label_smoothing", "mixup_alpha", "grad_clip", "amp", "seed",
)

# How a training loop writes a checkpoint: (epoch, step, epoch_sums) as in the checkpoint's fields.
SaveFn = Callable[[int, int, list[list[float]] | None], None]


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Iteration -> multiplier of the peak learning rate (warm-up, then cosine, step or constant)."""
    warm = cfg.warmup_epochs * steps_per_epoch

    def factor(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        e = it // steps_per_epoch if cfg.schedule_unit == "epoch" else it / steps_per_epoch
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(e, cfg.epochs) / cfg.epochs))
        if cfg.schedule == "step":
            return 0.1 ** sum(e >= m for m in cfg.step_milestones)
        return 1.0

    return factor


def _autocast(cfg_amp: str, device: torch.device):
    """The autocast context of an ``amp`` setting ("none", "bf16" or "fp16") on ``device``."""
    if cfg_amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg_amp == "bf16" else torch.float16)


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch moved to ``device`` (images in channels-last layout if asked)."""
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def _check_model_name(name: str) -> None:
    """Raise ValueError unless timm knows the model ``name`` (torchsan's models included)."""
    import timm

    import torchsan.models  # noqa: F401  (registers the models with timm)

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r} (torchsan models: {', '.join(torchsan.models.MODEL_NAMES)})")


def _check_model(cfg: TrainConfig) -> None:
    """Raise ValueError unless timm knows ``cfg.model`` and ``cfg.model_kwargs`` are its constructor's arguments."""
    from ..models import check_model_kwargs

    _check_model_name(cfg.model)
    check_model_kwargs(cfg.model, cfg.model_kwargs)


def _create_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """``cfg.model`` built by timm with ``cfg.model_kwargs``; ValueError if the arguments do not fit it."""
    import timm

    _check_model(cfg)  # model_kwargs may come from a file: only the model's own arguments reach timm
    try:
        return timm.create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, **cfg.model_kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model_kwargs {cfg.model_kwargs} do not fit {cfg.model!r}: {err}") from err


class _Progress:
    """A tqdm bar on a terminal, else a line every ~10% of the epoch (main process only)."""

    def __init__(self, mode: str, enabled: bool, total: int, initial: int, desc: str) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.total, self.desc, self.bar, self.start, self.done = total, desc, None, time.perf_counter(), initial
        self.images, self.every = 0, max(1, total // 10)
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True, leave=False)

    def update(self, images: int, **stats: float) -> None:
        """Count one iteration of ``images`` images (all ranks together) and show ``stats`` with the rate."""
        self.done += 1
        self.images += images
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        eta = (self.total - self.done) * (time.perf_counter() - self.start) / max(self.done, 1)
        text = {**{k: f"{v:.4g}" for k, v in stats.items()}, "img/s": f"{rate:.1f}"}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(1)
        elif self.mode == "lines" and (self.done % self.every == 0 or self.done == self.total):
            fields = " ".join(f"{k} {v}" for k, v in text.items())
            print(f"{self.desc} {self.done}/{self.total} {fields} eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        """Remove the bar (if any)."""
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, env: DistEnv, amp: str = "none",
             channels_last: bool = False, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
             predictions: bool = False) -> dict[str, Any]:
    """Loss (plain cross-entropy), top-1 and top-5 accuracy (%) over every sample of the loader's data set.

    ``transform``: applied to each (N, C, H, W) batch of normalised images first (a rotation, say).
    ``predictions``: also return ``labels`` and ``predictions`` (top-1 classes), one per image in the data set's
    order (every process gets them), for paired tests between models; None where corrupt images were skipped.
    """
    model.eval()
    loss_sum = correct1 = correct5 = count = skipped = 0.0
    seen: list[tuple[int, int]] = []  # (label, top-1 class) in this process's order
    for batch in loader:
        if batch is None:
            continue
        images, labels, n_skipped = batch
        if transform is not None:
            images = transform(images)
        images, labels = _to_device(images, labels, env.device, channels_last)
        with _autocast(amp, env.device):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels.unsqueeze(1)
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += labels.numel()
        skipped += n_skipped
        if predictions:
            seen += zip(labels.tolist(), top[:, 0].tolist())
    loss_sum, correct1, correct5, count, skipped = all_reduce_sum([loss_sum, correct1, correct5, count, skipped], env)
    if count == 0:
        raise ValueError("evaluation saw no images (every image was skipped as corrupt?)")
    result: dict[str, Any] = dict(loss=loss_sum / count, top1=100 * correct1 / count, top5=100 * correct5 / count,
                                  count=int(count), skipped=int(skipped))
    if predictions:
        pairs = _in_dataset_order(seen, env) if not skipped else None
        result["labels"] = None if pairs is None else [label for label, _ in pairs]
        result["predictions"] = None if pairs is None else [pred for _, pred in pairs]
    return result


def _in_dataset_order(seen: list[tuple[int, int]], env: DistEnv) -> list[tuple[int, int]]:
    """Every process's samples in the data set's order: process r evaluated samples r, r + W, r + 2W, ..."""
    if not env.distributed:
        return seen
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, seen)
    ordered = []
    for j in range(max(len(part) for part in gathered)):
        ordered += [part[j] for part in gathered if j < len(part)]
    return ordered


def validate(model: nn.Module, loader: DataLoader, env: DistEnv, cfg: TrainConfig,
             predictions_to: Path | None = None) -> dict[str, Any]:
    """``evaluate`` with the run's settings, timed; returns the history row's ``val_*`` fields.

    ``predictions_to``: the main process also writes every image's label and top-1 class there (JSON), for
    ``torchsan report``'s paired tests.
    """
    t1 = time.perf_counter()
    val = evaluate(model, loader, env, cfg.amp, cfg.channels_last, predictions=predictions_to is not None)
    if predictions_to is not None and env.is_main and val["predictions"] is not None:
        write_predictions(predictions_to, val["labels"], val["predictions"])
    return dict(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"], val_images=val["count"],
                val_skipped=val["skipped"], val_seconds=time.perf_counter() - t1)


PREDICTIONS_FILE = "val_predictions.json"


def write_predictions(path: Path | str, labels: list[int], predictions: list[int]) -> None:
    """Labels and top-1 classes of every validation image, in the data set's order, as JSON (written atomically)."""
    import json

    write_text_atomic(Path(path), json.dumps(dict(labels=labels, predictions=predictions), separators=(",", ":")))


# --- the pieces of a run --------------------------------------------------------------------------

@dataclass
class TrainData:
    """What a run trains and validates on: the data's description, both loaders, iterations per epoch."""

    info: DataInfo
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int


@dataclass
class TrainParts:
    """What a run trains with: the model, its DDP wrapper, the optimizer, schedule and gradient scaler."""

    model: nn.Module  # the bare model: what checkpoints hold and validation runs
    ddp: nn.Module  # what the loop trains: DistributedDataParallel(model) on several processes, else model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    n_params: int
    gmacs: float | None  # multiply-adds per image (None for models the counting rules do not cover)


@dataclass
class RunState:
    """Where a run stands: the iteration it (re)starts at, the epochs done, the best top-1 and its time so far."""

    start_epoch: int = 0
    start_step: int = 0  # iterations of ``start_epoch`` done before this session
    carried: EpochMeters = field(default_factory=EpochMeters)  # this rank's totals of those iterations
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per finished epoch
    best_top1: float = -1.0
    elapsed_before: float = 0.0  # training seconds of earlier sessions
    start_time: float = 0.0  # time.perf_counter() when this session's training began

    def elapsed(self) -> float:
        """Training seconds of the whole run up to now."""
        return self.elapsed_before + time.perf_counter() - self.start_time


def _configure_torch(cfg: TrainConfig) -> None:
    """Apply the process-wide settings: thread count, deterministic algorithms."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def _check_settings(cfg: TrainConfig, env: DistEnv) -> None:
    """Raise ValueError for settings this process group or device cannot run."""
    if cfg.batch_size % env.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {env.world_size} processes")
    if cfg.amp == "fp16" and env.device.type != "cuda":
        raise ValueError("amp fp16 needs a GPU; use bf16 on the CPU")
    if cfg.sync_bn and env.device.type != "cuda":
        raise ValueError("sync_bn needs GPUs (torch's SyncBatchNorm has no CPU implementation)")


def _find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint that ``resume`` names (a file, a folder's newest, "auto": ``run_dir``'s newest or None).

    Raises FileNotFoundError if a named folder holds none, FileExistsError if the run would write into a
    folder holding another run's checkpoints (or, without ``resume``, any checkpoints).
    """
    if resume is None:
        if latest_checkpoint(run_dir) is not None:
            raise FileExistsError(f"{str(run_dir)!r} already holds checkpoints: pass --resume to continue that run, "
                                  f"or choose another --output")
        return None
    target = run_dir if resume == "auto" else Path(resume)
    ckpt_path = latest_checkpoint(target) if target.is_dir() or resume == "auto" else target
    if ckpt_path is None and resume != "auto":
        raise FileNotFoundError(f"no checkpoint to resume from in {str(target)!r}")
    if ckpt_path is not None and ckpt_path.resolve().parent != run_dir.resolve() and latest_checkpoint(run_dir):
        raise FileExistsError(f"resuming {str(ckpt_path)!r} would write into {str(run_dir)!r}, which holds "
                              f"another run's checkpoints; choose another --output")
    return ckpt_path


def check_classes(saved: list[str] | None, current: list[str], what: str, data: str, ignore_names: bool = False,
                  hint: str = "pass --ignore-class-names to evaluate by class index anyway") -> None:
    """Raise ValueError unless the class names ``what`` was trained on are ``current`` (the data's), in order.

    ``ignore_names``: compare only the counts (a relabelled copy of the same data), warning about the names.
    A checkpoint without names (written by other tools) passes: loading its classifier checks the count.
    """
    if saved is None:
        return
    saved = [str(c) for c in saved]
    if len(saved) != len(current):
        raise ValueError(f"{what} has {len(saved)} classes, the data {data!r} {len(current)}")
    if saved == list(current):
        return
    differ = [f"{a!r} vs {b!r}" for a, b in zip(saved, current) if a != b]
    shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
    if not ignore_names:
        raise ValueError(f"{what} was trained on other classes than the data {data!r} has ({shown}); {hint}")
    import warnings

    warnings.warn(f"{what}: class names differ from the data's ({shown}); comparing by index", stacklevel=2)


def _resume_state(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    """The training checkpoint at ``path``, read; ValueError if it is not one or its settings differ from ``cfg``."""
    ckpt = read_checkpoint(path)
    missing = [k for k in ("state_dict", "optimizer", "scheduler", "epoch", "step", "config", "rng") if k not in ckpt]
    if missing:
        raise ValueError(f"{str(path)!r} is not a training checkpoint (no {', '.join(missing)}); "
                         f"model_best.pth holds weights only: use it with 'torchsan eval'")
    if ckpt.get("model") != cfg.model:
        raise ValueError(f"checkpoint {str(path)!r} is of model {ckpt.get('model')!r}, not {cfg.model!r}")
    saved = ckpt["config"]
    differ = [f"{k}: {saved.get(k)!r} in the checkpoint, {getattr(cfg, k)!r} now" for k in SCHEDULE_KEYS
              if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"cannot resume from {str(path)!r} with different settings ({'; '.join(differ)})")
    return ckpt


def _build_data(cfg: TrainConfig, env: DistEnv) -> TrainData:
    """The data sets and this rank's loaders (``cfg.batch_size`` split over the processes)."""
    datasets, info = build_datasets(cfg.data, cfg.image_size, cfg.train_subset, cfg.val_subset, cfg.augment,
                                    cfg.skip_corrupt)
    per_rank = cfg.batch_size // env.world_size
    pin = env.device.type == "cuda"
    train_loader = build_loader(datasets["train"], per_rank, train=True, rank=env.rank, world_size=env.world_size,
                                seed=cfg.seed, workers=cfg.workers, pin_memory=pin)
    val_loader = build_loader(datasets["val"], per_rank, train=False, rank=env.rank, world_size=env.world_size,
                              workers=cfg.workers, pin_memory=pin)
    return TrainData(info, train_loader, val_loader, train_loader.batch_sampler.steps_per_epoch())


def _build_parts(cfg: TrainConfig, env: DistEnv, data: TrainData) -> TrainParts:
    """A freshly initialised model (the same on every rank), wrapped for DDP, with its optimizer and schedule."""
    info = data.info
    torch.manual_seed(_mix(cfg.seed, 7))  # the same initial weights on every rank (DDP also broadcasts them)
    model = _create_model(cfg, info.num_classes, info.in_chans).to(env.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    n_params = sum(p.numel() for p in model.parameters())
    gmacs = _gmacs(model, cfg.model, info.in_chans, cfg.image_size)  # draws a random image: after the seeding
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None) if env.distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, data.steps_per_epoch))
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.amp == "fp16")
    return TrainParts(model, ddp, optimizer, scheduler, scaler, n_params, gmacs)


def _resume_run(ckpt: dict[str, Any] | None, ckpt_path: Path | None, parts: TrainParts, cfg: TrainConfig,
                env: DistEnv, data: TrainData) -> RunState:
    """Load ``ckpt`` (from ``ckpt_path``) into ``parts`` and the random generators; returns where the run stands.

    Without a checkpoint: seeds Python's generator and returns a fresh state.
    """
    if ckpt is None:
        random.seed(cfg.seed)
        return RunState()
    steps_per_epoch = data.steps_per_epoch
    check_classes(ckpt.get("classes"), data.info.classes, f"checkpoint {str(ckpt_path)!r}", data.info.name,
                  hint="resume on the data it was trained on")
    load_converted(parts.model, ckpt["state_dict"], f"checkpoint {str(ckpt_path)!r}")
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        parts.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    history, best_top1 = list(ckpt.get("history", [])), float(ckpt.get("best_top1", -1.0))
    start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step"])
    rank_sums = ckpt.get("epoch_sums") or [[0.0] * 5] * env.world_size  # one list of 5 sums per rank
    if len(rank_sums) != env.world_size:
        raise ValueError(f"checkpoint {str(ckpt_path)!r} was written mid-epoch by {len(rank_sums)} processes; "
                         f"resume it with the same number ({env.world_size} now), or from an epoch checkpoint")
    state = RunState(start_epoch, start_step, EpochMeters.from_list(rank_sums[env.rank]), history, best_top1,
                     elapsed_before=float(ckpt.get("elapsed", 0.0)))
    if env.is_main:
        if start_epoch >= cfg.epochs:
            print(f"{ckpt_path}: the run is already complete ({cfg.epochs} epochs); reporting it")
        else:
            print(f"resumed from {ckpt_path} (epoch {start_epoch + 1}, iteration {start_step}/{steps_per_epoch})")
    return state


def _open_run_dir(cfg: TrainConfig, run_dir: Path, env: DistEnv, state: RunState) -> MetricsLogger | None:
    """Write ``config.yaml`` into ``run_dir`` and return its metrics logger (main process; None elsewhere).

    The logs of the epochs in ``state.history`` are rewritten: a run killed between a checkpoint and its
    logs. A run that is already complete writes nothing (None).
    """
    if not env.is_main or state.start_epoch >= cfg.epochs:
        return None
    history = state.history
    write_text_atomic(run_dir / "config.yaml", _yaml(cfg.to_dict()))
    logger = MetricsLogger(run_dir, cfg.tensorboard)
    if history:
        logger.log_epoch(history, tensorboard=False)
    return logger


@dataclass
class _CheckpointWriter:
    """Writes the run's checkpoints and ``model_best.pth`` into ``run_dir`` (main process only)."""

    cfg: TrainConfig
    env: DistEnv
    run_dir: Path
    parts: TrainParts
    info: DataInfo
    state: RunState

    def training_state(self, epoch: int, step: int, epoch_sums: list[list[float]] | None) -> dict[str, Any]:
        """A training checkpoint's contents at iteration ``step`` of epoch ``epoch`` (see ``checkpoint.py``)."""
        p, state = self.parts, self.state
        return dict(state_dict=p.model.state_dict(), model=self.cfg.model, optimizer=p.optimizer.state_dict(),
                    scheduler=p.scheduler.state_dict(), scaler=p.scaler.state_dict(), epoch=epoch, step=step,
                    epoch_sums=epoch_sums, rng=rng_state(), config=self.cfg.to_dict(), history=state.history,
                    best_top1=state.best_top1, classes=list(self.info.classes), in_chans=self.info.in_chans,
                    torch_version=str(torch.__version__), elapsed=state.elapsed())

    def save(self, epoch: int, step: int, epoch_sums: list[list[float]] | None) -> None:
        """Write the checkpoint of (epoch, step) and prune the old ones; ``epoch_sums``: None at an epoch's end."""
        failed = None
        if self.env.is_main:
            try:
                self._write(self.training_state(epoch, step, epoch_sums), checkpoint_name(epoch, step))
                prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
            except CheckpointWriteError as err:
                failed = err
        if _any_rank(failed is not None, self.env):  # every rank stops, none waits in a collective
            raise failed or CheckpointWriteError(errno.EIO, "the main process could not write a checkpoint")

    def save_best(self, epochs_done: int, row: dict[str, Any]) -> None:
        """Write ``model_best.pth``: the weights, name, config and metrics ``row`` after ``epochs_done`` epochs."""
        failed = None
        if self.env.is_main:
            try:
                self._write(dict(state_dict=self.parts.model.state_dict(), model=self.cfg.model,
                                 config=self.cfg.to_dict(), epoch=epochs_done, metrics=row,
                                 classes=list(self.info.classes), in_chans=self.info.in_chans), "model_best.pth")
            except CheckpointWriteError as err:
                failed = err
        if _any_rank(failed is not None, self.env):
            raise failed or CheckpointWriteError(errno.EIO, "the main process could not write model_best.pth")

    def _write(self, obj: dict[str, Any], name: str) -> None:
        """``save_atomic`` into the run folder; its error also says which earlier checkpoint is intact."""
        try:
            save_atomic(obj, self.run_dir / name)
        except CheckpointWriteError as err:
            previous = latest_checkpoint(self.run_dir)
            kept = (f"the previous checkpoint {previous.name} is intact (resume with --resume)" if previous
                    else "no earlier checkpoint exists")
            raise CheckpointWriteError(err.errno, f"{err.strerror}; {kept}") from err


# --- the loop ---------------------------------------------------------------------------------------

def _train_step(parts: TrainParts, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, env: DistEnv,
                num_classes: int, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch (iteration ``step`` of ``epoch``); returns its loss and logits."""
    torch.manual_seed(_mix(cfg.seed, env.rank, epoch, step))  # dropout and friends
    q = smooth_targets(labels, num_classes, cfg.label_smoothing)
    if cfg.mixup_alpha > 0:
        g = torch.Generator().manual_seed(_mix(cfg.seed, env.rank, epoch, step, 2))
        images, q = mixup(images, q, cfg.mixup_alpha, g)
    with _autocast(cfg.amp, env.device):
        logits = parts.ddp(images)
    loss = soft_cross_entropy(logits, q)
    if _any_rank(not torch.isfinite(loss), env):
        raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, iteration {step}: lower "
                                 f"the learning rate (checkpoints so far are kept)")
    optimizer, scaler = parts.optimizer, parts.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(parts.ddp.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


def train_one_epoch(epoch: int, parts: TrainParts, data: TrainData, cfg: TrainConfig, env: DistEnv,
                    first_step: int, meters: EpochMeters, save: SaveFn) -> dict[str, Any]:
    """Train epoch ``epoch`` (0-based) from iteration ``first_step`` on.

    ``meters``: this rank's totals of the iterations before ``first_step`` (added to in place); ``save``
    writes the mid-epoch checkpoints (every ``cfg.checkpoint_every_steps`` iterations). Returns the
    history row's ``epoch``, ``lr`` and ``train_*`` fields, summed over the processes.
    """
    steps_per_epoch = data.steps_per_epoch
    data.train_loader.batch_sampler.set_epoch(epoch, first_step)
    # The rate at the epoch's first iteration (not the optimizer's now: a resumed epoch starts mid-way).
    epoch_lr = parts.scheduler.base_lrs[0] * parts.scheduler.lr_lambdas[0](epoch * steps_per_epoch)
    parts.ddp.train()
    progress = _Progress(cfg.progress, env.is_main, steps_per_epoch, first_step, f"epoch {epoch + 1}/{cfg.epochs}")
    t0 = time.perf_counter()
    for step, batch in enumerate(data.train_loader, start=first_step):
        if env.distributed and _any_rank(batch is None, env):  # all ranks stop together, none waits
            raise ValueError(f"every image of a batch is corrupt (epoch {epoch + 1}, iteration {step})")
        if batch is not None:
            images, labels, n_skipped = batch
            images, labels = _to_device(images, labels, env.device, cfg.channels_last)
            loss, logits = _train_step(parts, images, labels, cfg, env, data.info.num_classes, epoch, step)
            n = labels.numel()
            meters.update(loss.item(), (logits.argmax(dim=1) == labels).sum().item(), n, n_skipped)
            progress.update(n * env.world_size, loss=loss.item(), lr=parts.optimizer.param_groups[0]["lr"])
        parts.scheduler.step()  # per iteration; the factor function decides per-epoch or per-step annealing
        done = step + 1
        if cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0 and done < steps_per_epoch:
            save(epoch, done, meters.snapshot(t0).gather(env))
    progress.close()
    _sync_buffers(parts.model, env)  # BN running stats differ per rank: evaluate and save rank 0's
    totals = meters.snapshot(t0).all_reduce(env)
    count, seconds = totals.images, totals.seconds
    return dict(epoch=epoch + 1, lr=epoch_lr, train_loss=totals.loss_sum / max(count, 1),
                train_top1=None if cfg.mixup_alpha > 0 else 100 * totals.correct / max(count, 1),
                train_images=int(count), train_skipped=int(totals.skipped), train_seconds=seconds,
                train_images_per_s=count / max(seconds, 1e-9))


def _end_epoch(row: dict[str, Any], cfg: TrainConfig, env: DistEnv, state: RunState, writer: _CheckpointWriter,
               logger: MetricsLogger | None) -> None:
    """Record a finished epoch's metrics ``row``: history, best model, epoch checkpoint, logs, one printed line."""
    epochs_done = row["epoch"]
    state.history.append(row)
    is_best = row.get("val_top1") is not None and row["val_top1"] > state.best_top1
    if is_best:
        state.best_top1 = row["val_top1"]
        writer.save_best(epochs_done, row)  # before the epoch checkpoint, which records best_top1
    writer.save(epochs_done, 0, None)
    if env.is_main:
        logger.log_epoch(state.history)
        val_text = (f", val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
                    if "val_top1" in row else "")
        skipped_text = f", {row['train_skipped']} corrupt images skipped" if row["train_skipped"] else ""
        print(f"epoch {epochs_done}/{cfg.epochs}: train loss {row['train_loss']:.4f}{val_text}, "
              f"{row['train_images_per_s']:.1f} img/s, {row['train_seconds']:.0f} s{skipped_text}", flush=True)


def _fit(cfg: TrainConfig, env: DistEnv, data: TrainData, parts: TrainParts, state: RunState,
         writer: _CheckpointWriter, logger: MetricsLogger | None) -> None:
    """Run the epochs from ``state.start_epoch`` (at ``state.start_step``) to ``cfg.epochs``."""
    for epoch in range(state.start_epoch, cfg.epochs):
        resuming = epoch == state.start_epoch
        first_step = state.start_step if resuming else 0
        meters = state.carried if resuming else EpochMeters()
        row = train_one_epoch(epoch, parts, data, cfg, env, first_step, meters, writer.save)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            # The bare model: DDP's forward is a collective, and ranks may have unequal val batches.
            last = epoch + 1 == cfg.epochs
            row.update(validate(parts.model, data.val_loader, env, cfg,
                                predictions_to=writer.run_dir / PREDICTIONS_FILE if last else None))
        _end_epoch(row, cfg, env, state, writer, logger)


def _start_line(cfg: TrainConfig, env: DistEnv, data: TrainData, parts: TrainParts, run_dir: Path) -> str:
    """The line a run prints before its first epoch: model, data, processes, batch, schedule, folder."""
    info = data.info
    macs_text = f", {parts.gmacs:.3f} GMACs/image" if parts.gmacs is not None else ""
    return (f"training {cfg.model} ({parts.n_params / 1e6:.2f}M params{macs_text}) on {info.name}: {info.num_train} "
            f"train / {info.num_val} val images, {info.num_classes} classes, {cfg.image_size} px, {env.world_size} "
            f"process(es) on {env.device}, batch {cfg.batch_size}, peak lr {cfg.learning_rate:.4g}, {cfg.epochs} "
            f"epoch(s) x {data.steps_per_epoch} iterations -> {run_dir}")


def _finish(cfg: TrainConfig, env: DistEnv, run_dir: Path, data: TrainData, parts: TrainParts, state: RunState,
            logger: MetricsLogger | None) -> dict[str, Any]:
    """The run summary; the main process also writes ``summary.json``, closes the logger and prints it."""
    in_sync = _ranks_in_sync(parts.ddp, env)
    summary = dict(model=cfg.model, data=data.info.name, params=parts.n_params, gmacs=parts.gmacs,
                   epochs=cfg.epochs, image_size=cfg.image_size, world_size=env.world_size, device=str(env.device),
                   ranks_in_sync=in_sync, seconds=state.elapsed(), best_val_top1=state.best_top1,
                   final=state.history[-1] if state.history else {}, run_dir=str(run_dir))
    if env.is_main:
        import json

        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
        if logger is not None:
            logger.close()
        final = summary["final"]
        print(f"done: {cfg.model} val top-1 {final.get('val_top1', float('nan')):.2f}%, top-5 "
              f"{final.get('val_top5', float('nan')):.2f}% (best top-1 {state.best_top1:.2f}%) after {cfg.epochs} "
              f"epoch(s); run folder {run_dir} ({_contents(run_dir)})")
    if not in_sync:
        raise RuntimeError(f"the {env.world_size} processes ended with different weights (ranks_in_sync false in "
                           f"{run_dir / 'summary.json'}): the run is not a valid data-parallel run")
    return summary


def _contents(run_dir: Path) -> str:
    """What a finished run folder holds, as the "done" line lists it."""
    names = [name for name in ("model_best.pth", "metrics.csv", "metrics.json", "curves.png", "summary.json")
             if (run_dir / name).exists()]
    if latest_checkpoint(run_dir) is not None:
        names.insert(0, "checkpoints")
    if (run_dir / "tensorboard").is_dir():
        names.append("tensorboard/")
    return ", ".join(names)


def train(cfg: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data``; returns the run summary (also written to ``summary.json``).

    ``resume``: a checkpoint file, a run folder (its newest checkpoint), or "auto" (the newest
    checkpoint of this run's folder, if any).
    """
    env = init_distributed(cfg.device)
    try:
        return _train(cfg, env, resume)
    finally:
        shutdown()


def _train(cfg: TrainConfig, env: DistEnv, resume: str | None) -> dict[str, Any]:
    """``train`` within the process group ``env``: check, lock the folder, build, resume, run, summarise."""
    _configure_torch(cfg)
    _check_settings(cfg, env)
    _check_model(cfg)
    run_dir = cfg.run_dir()
    lock = _lock_run_folder(run_dir, env)
    try:
        return _train_locked(cfg, env, resume, run_dir)
    finally:
        if lock is not None:
            lock.release(remove_if_unused=True)  # a run that failed before writing anything leaves no folder


def _lock_run_folder(run_dir: Path, env: DistEnv) -> RunFolderLock | None:
    """The main process's lock on ``run_dir`` (None on the other ranks); every rank raises if it is taken."""
    lock, error = None, None
    if env.is_main:
        try:
            lock = RunFolderLock(run_dir).acquire()
        except OSError as err:
            error = err
    if env.distributed:
        message = [str(error) if error is not None else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            raise OSError(message[0])
    if error is not None:
        raise error
    return lock


def _train_locked(cfg: TrainConfig, env: DistEnv, resume: str | None, run_dir: Path) -> dict[str, Any]:
    """``_train`` once this run holds ``run_dir``: nothing else writes into it."""
    ckpt_path = _find_resume_checkpoint(resume, run_dir)
    ckpt = _resume_state(ckpt_path, cfg) if ckpt_path is not None else None  # all checks before any write
    if env.is_main:
        removed = remove_stale_temp_files(run_dir)
        if removed:
            mb = sum(size for _, size in removed) / 2**20
            print(f"removed {len(removed)} temporary file(s) ({mb:.1f} MB) that a killed run left in {run_dir}: "
                  f"{', '.join(name for name, _ in removed)}")
    data = _build_data(cfg, env)
    parts = _build_parts(cfg, env, data)
    state = _resume_run(ckpt, ckpt_path, parts, cfg, env, data)
    logger = _open_run_dir(cfg, run_dir, env, state)
    writer = _CheckpointWriter(cfg, env, run_dir, parts, data.info, state)
    if env.is_main and state.start_epoch < cfg.epochs:
        print(_start_line(cfg, env, data, parts, run_dir))
    state.start_time = time.perf_counter()
    _fit(cfg, env, data, parts, state, writer, logger)
    return _finish(cfg, env, run_dir, data, parts, state, logger)


# --- helpers ----------------------------------------------------------------------------------------

def _any_rank(flag: bool, env: DistEnv) -> bool:
    """Whether ``flag`` holds on any process (a collective: every rank must call it at the same point)."""
    if not env.distributed:
        return bool(flag)
    return all_reduce_sum([float(flag)], env)[0] > 0


def _sync_buffers(model: nn.Module, env: DistEnv) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if env.distributed:
        for buf in model.buffers():
            dist.broadcast(buf.data, src=0)


def _gmacs(model: nn.Module, name: str, in_chans: int, size: int) -> float | None:
    """Multiply-adds of one image with the authors' counting rules (None for models they do not cover).

    It runs the model on one image: ValueError if the model cannot run at ``size`` px.
    """
    from ..profile import profile_model

    try:
        gmacs = profile_model(model, (in_chans, size, size)).gmacs
    except (ValueError, RuntimeError) as err:
        text = " ".join(str(err).split())
        raise ValueError(f"{name} cannot run on {size} px images: {text[:300]}") from err
    return gmacs or None


def _ranks_in_sync(model: nn.Module, env: DistEnv) -> bool:
    """Whether every process holds bit-identical parameters (DDP keeps them so)."""
    if not env.distributed:
        return True
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])
    digest = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()])
    digest = digest.to(env.device)
    buffers = [b.detach().reshape(-1).double().cpu() for b in model.buffers() if b.is_floating_point()]
    if buffers:
        digest = torch.cat([digest, torch.cat(buffers).sum().reshape(1).to(env.device)])
    gathered = [torch.zeros_like(digest) for _ in range(env.world_size)]
    dist.all_gather(gathered, digest)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _yaml(values: dict[str, Any]) -> str:
    """``values`` as YAML, in their order."""
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def evaluate_checkpoint(path: str, ignore_class_names: bool = False, predictions_to: str | None = None,
                        **overrides: Any) -> dict[str, Any]:
    """Top-1/top-5 of a checkpoint (training checkpoint or model_best.pth) on its data or ``overrides["data"]``.

    ``overrides`` may set ``data``, ``image_size``, ``val_subset``, ``batch_size``, ``workers``, ``device``,
    ``amp``, ``channels_last``, ``skip_corrupt`` and ``threads``. The data's class names must be the checkpoint's
    (ValueError), unless ``ignore_class_names`` (then only their count must match). ``predictions_to``: also write
    every image's label and top-1 class there (see :func:`write_predictions`).
    """
    with checkpoint_evaluation(path, ignore_class_names, **overrides) as (model, loader, info, cfg, env):
        t0 = time.perf_counter()
        result = evaluate(model, loader, env, cfg.amp, cfg.channels_last, predictions=predictions_to is not None)
        if predictions_to is not None:
            labels, predictions = result.pop("labels"), result.pop("predictions")
            if predictions is None:
                raise ValueError("--predictions: corrupt images were skipped, so the predictions cannot be matched "
                                 "to the data set's images")
            if env.is_main:
                write_predictions(predictions_to, labels, predictions)
        result.update(model=cfg.model, data=info.name, image_size=cfg.image_size, checkpoint=path,
                      seconds=time.perf_counter() - t0)
        return result


@contextmanager
def checkpoint_evaluation(path: str, ignore_class_names: bool = False, **overrides: Any):
    """The pieces to evaluate a checkpoint: (model in eval mode, val loader, DataInfo, TrainConfig, DistEnv).

    ``overrides`` as for :func:`evaluate_checkpoint`. The process group (torchrun) lives as long as the block.
    """
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), str):
        raise ValueError(f"{path!r} has no torchsan training config; for other checkpoints build the model "
                         f"and use torchsan.models.load_checkpoint")
    saved = {k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__}
    cfg = load_config(None, **{**saved, **{k: v for k, v in overrides.items() if v is not None}})
    env = init_distributed(cfg.device)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        datasets, info = build_datasets(cfg.data, cfg.image_size, val_subset=cfg.val_subset,
                                        skip_corrupt=cfg.skip_corrupt, splits=("val",))
        check_classes(ckpt.get("classes"), info.classes, f"checkpoint {path!r}", info.name, ignore_class_names)
        model = _create_model(cfg, info.num_classes, int(ckpt.get("in_chans", info.in_chans)))
        load_converted(model, ckpt["state_dict"], f"checkpoint {path!r}")
        model.to(env.device).eval()
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        loader = build_loader(datasets["val"], max(1, cfg.batch_size // env.world_size), train=False, rank=env.rank,
                              world_size=env.world_size, workers=cfg.workers, pin_memory=env.device.type == "cuda")
        yield model, loader, info, cfg, env
    finally:
        shutdown()
