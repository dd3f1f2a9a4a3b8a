"""ImageNet-layout folders (``<root>/train/<class>/*.jpg``, ``<root>/val/<class>/*.jpg``).

Unlike ``torchvision.datasets.ImageFolder``, every problem is reported with the path at fault: a
missing split folder, a split with no class folders, a class folder with no images, train and val
with different classes, and a corrupt or truncated image (an error by default; with
``skip_corrupt=True`` the sample is dropped from its batch and counted).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "CorruptImageError", "ImageFolderDataset", "scan_split"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")


class CorruptImageError(ValueError):
    """An image file that PIL cannot decode completely."""


def scan_split(root: str | os.PathLike[str], split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted folder names) and (path, class index) samples of ``root/split``."""
    folder = Path(root) / split
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data folder {str(root)!r} has no {split!r} folder (expected {split}/<class>/<images>)")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"{str(folder)!r} has no class folders (expected {split}/<class>/<images>)")
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        files = sorted(
            str(p) for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not files:
            raise ValueError(f"class folder {str(folder / name)!r} has no images ({', '.join(IMAGE_EXTENSIONS[:8])})")
        samples.extend((f, index) for f in files)
    return classes, samples


def load_image(path: str, mode: str = "RGB") -> Image.Image:
    """Decode an image completely (a truncated file fails here, not later in a transform)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(
            f"corrupt or truncated image {path!r} ({err}); pass --skip-corrupt to skip such files") from err


class ImageFolderDataset(torch.utils.data.Dataset):
    """Samples of one split of an ImageNet-layout folder; ``transform`` maps a PIL image to a tensor.

    Items are ``(image, label)``, or ``None`` for a corrupt image when ``skip_corrupt`` is set
    (the collate function drops and counts those).
    """

    def __init__(self, root: str | os.PathLike[str], split: str, transform: Callable[[Any], torch.Tensor],
                 mode: str = "RGB", skip_corrupt: bool = False, classes: list[str] | None = None) -> None:
        self.classes, self.samples = scan_split(root, split)
        if classes is not None and self.classes != classes:
            extra, missing = sorted(set(self.classes) - set(classes)), sorted(set(classes) - set(self.classes))
            raise ValueError(f"{split!r} classes differ from the training classes in {str(root)!r}: "
                             f"extra {extra[:5]}, missing {missing[:5]}")
        self.targets = [label for _, label in self.samples]
        self.transform, self.mode, self.skip_corrupt = transform, mode, skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        try:
            image = load_image(path, self.mode)
        except CorruptImageError:
            if self.skip_corrupt:
                return None
            raise
        return self.transform(image), label
