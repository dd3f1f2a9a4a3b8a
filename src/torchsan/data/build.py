"""Data sets, transforms, samplers and loaders for training and evaluation.

Every random choice of the input pipeline is a function of (seed, epoch, sample index): the batch
sampler draws each epoch's order from a generator seeded with (seed, epoch), and each sample's
augmentation runs under its own seed. A run therefore sees the same batches whatever the number
of loader workers, and a resumed run continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2

from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from .folder import ImageFolderDataset

__all__ = ["DataInfo", "EpochBatchSampler", "build_datasets", "build_loader", "EMBEDDED_DATA"]

EMBEDDED_DATA = "fashion-mnist"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


@dataclass
class DataInfo:
    """What a model and a report need to know about the data."""

    name: str
    classes: list[str]
    in_chans: int
    image_size: int
    num_train: int
    num_val: int
    mean: Sequence[float] = field(default_factory=tuple)
    std: Sequence[float] = field(default_factory=tuple)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class TensorImageDataset(Dataset):
    """Images held in memory as uint8 (N, C, H, W), with a tensor-to-tensor transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(v2.functional.to_image(self.images[index])), int(self.labels[index])


class SeededDataset(Dataset):
    """Wraps a data set so that item ``(index, seed)`` runs its random transform under ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps: nearby inputs give unrelated seeds)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, sample_seed)`` for one process of ``world_size``.

    Training (``shuffle=True``): each epoch is a permutation drawn from (seed, epoch), cut to a
    multiple of ``world_size``, dealt round-robin to the ranks, in full batches (``drop_last``).
    Evaluation (``shuffle=False``): rank r takes indices r, r + world, ..., every sample exactly once.
    ``set_epoch(epoch, start_step)`` skips the first ``start_step`` batches (mid-epoch resume).
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size per process must be >= 1, got {batch_size}")
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle, self.epoch, self.start_step = seed, shuffle, 0, 0
        if shuffle and self.steps_per_epoch() == 0:
            raise ValueError(f"{size} training images are fewer than one batch of {batch_size} per process "
                             f"x {world_size} processes; lower the batch size")

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world_size))
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        per_rank = self.size // self.world_size
        order = torch.randperm(self.size, generator=g)[: per_rank * self.world_size]
        return order[self.rank:: self.world_size].tolist()

    def steps_per_epoch(self) -> int:
        if self.shuffle:
            return (self.size // self.world_size) // self.batch_size
        return math.ceil(len(range(self.rank, self.size, self.world_size)) / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = self._indices()
        for step in range(self.start_step, self.steps_per_epoch()):
            chunk = indices[step * self.batch_size: (step + 1) * self.batch_size]
            yield [(i, _mix(self.seed, self.epoch, i, 1)) for i in chunk]

    def __len__(self) -> int:
        return self.steps_per_epoch() - self.start_step


def collate_skipping(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Default collate after dropping ``None`` items (skipped corrupt images); returns their count too."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    images, labels = default_collate(kept)
    return images, labels, len(batch) - len(kept)


def balanced_subset(targets: Sequence[int], count: int, num_classes: int) -> list[int]:
    """``count`` indices, the same number per class (fixed choice, independent of the training seed)."""
    if count <= 0 or count >= len(targets):
        return list(range(len(targets)))
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0)).tolist()
    per_class, taken, chosen = math.ceil(count / num_classes), [0] * num_classes, []
    for i in order:
        if taken[targets[i]] < per_class and len(chosen) < count:
            taken[targets[i]] += 1
            chosen.append(i)
    return sorted(chosen)


def _tensor_transforms(size: int, mean: Sequence[float], std: Sequence[float], train: bool, augment: bool) -> Any:
    steps: list[Any] = []
    if train and augment:  # the small-image recipe: shift by up to 1/8 of the side, mirror
        steps += [v2.RandomCrop(size, padding=max(1, size // 8)), v2.RandomHorizontalFlip()]
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _folder_transforms(size: int, train: bool, augment: bool) -> Any:
    if train and augment:  # the authors' ImageNet recipe
        steps: list[Any] = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([v2.PILToTensor(), *steps, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def normalization(data: str) -> tuple[Sequence[float], Sequence[float]]:
    """The (mean, std) that ``build_datasets`` normalises ``data``'s images with (per channel, pixels in [0, 1])."""
    if data == EMBEDDED_DATA:
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return IMAGENET_MEAN, IMAGENET_STD


def build_datasets(data: str, image_size: int, train_subset: int = 0, val_subset: int = 0, augment: bool = True,
                   skip_corrupt: bool = False, splits: Sequence[str] = ("train", "val")
                   ) -> tuple[dict[str, Dataset], DataInfo]:
    """The ``splits`` of ``data`` (``"fashion-mnist"`` or an ImageNet-layout folder) and their description."""
    subsets = dict(train=train_subset, val=val_subset)
    datasets: dict[str, Dataset] = {}
    sizes = dict(train=0, val=0)
    if data == EMBEDDED_DATA:
        classes, in_chans, (mean, std) = list(FASHION_MNIST_CLASSES), 1, normalization(data)
        for split in splits:
            images, labels = load_fashion_mnist(split)
            keep = balanced_subset(labels.tolist(), subsets[split], len(classes))
            images, labels = images[keep], labels[keep]
            if image_size != images.shape[-1]:  # resize once, not per sample; in chunks to bound the memory
                images = torch.cat([
                    F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                                  align_corners=False).round().clamp(0, 255).to(torch.uint8)
                    for chunk in images.split(2048)
                ])
            tf = _tensor_transforms(image_size, mean, std, split == "train", augment)
            datasets[split] = TensorImageDataset(images, labels, tf)
            sizes[split] = len(images)
    else:
        if not os.path.isdir(data):
            raise FileNotFoundError(f"data folder {data!r} does not exist (give an ImageNet-layout folder with "
                                    f"train/<class>/ and val/<class>/, or '{EMBEDDED_DATA}')")
        classes, in_chans, (mean, std) = [], 3, normalization(data)
        for split in splits:
            ds = ImageFolderDataset(data, split, _folder_transforms(image_size, split == "train", augment),
                                    skip_corrupt=skip_corrupt, classes=classes or None)
            classes = ds.classes
            keep = balanced_subset(ds.targets, subsets[split], len(classes))
            datasets[split] = ds if len(keep) == len(ds) else torch.utils.data.Subset(ds, keep)
            sizes[split] = len(keep)
    info = DataInfo(name=data, classes=classes, in_chans=in_chans, image_size=image_size,
                    num_train=sizes["train"], num_val=sizes["val"], mean=mean, std=std)
    return datasets, info


def build_loader(dataset: Dataset, batch_size: int, *, train: bool, rank: int = 0, world_size: int = 1,
                 seed: int = 0, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader over ``(index, seed)`` batches from :class:`EpochBatchSampler`; ``loader.batch_sampler.set_epoch``."""
    sampler = EpochBatchSampler(len(dataset), batch_size, rank, world_size, seed, shuffle=train)  # type: ignore[arg-type]
    return DataLoader(SeededDataset(dataset), batch_sampler=sampler, num_workers=workers,
                      collate_fn=collate_skipping, pin_memory=pin_memory, persistent_workers=False)
