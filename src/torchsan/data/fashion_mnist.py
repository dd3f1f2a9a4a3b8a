"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package: the embedded default data set.

Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; Zalando Research, MIT licence): 70,000 greyscale
28x28 photographs of clothing in 10 classes, 60,000 for training and 10,000 for testing. Debian
ships the original gzipped IDX files (30 MB) under ``/usr/share/datasets/fashion-mnist/``:

    sudo apt-get update && sudo apt-get install dataset-fashion-mnist

Nothing is downloaded at run time. ``TORCHSAN_FASHION_MNIST`` points to another folder holding
the same four files (e.g. torchvision's ``FashionMNIST/raw``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["FASHION_MNIST_CLASSES", "fashion_mnist_root", "load_fashion_mnist"]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}


def fashion_mnist_root() -> Path:
    """The folder with the IDX files: ``$TORCHSAN_FASHION_MNIST`` or Debian's location."""
    return Path(os.environ.get("TORCHSAN_FASHION_MNIST", DEFAULT_ROOT))


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {str(root)!r}. Install the embedded default data with "
        f"'sudo apt-get install dataset-fashion-mnist' (Debian), set TORCHSAN_FASHION_MNIST to a folder with "
        f"the four IDX files, or pass --data PATH to an ImageNet-layout folder"
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes: magic (0, 0, 0x08, ndim), ndim big-endian sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip raises these for truncated or corrupt archives
        raise ValueError(f"cannot read {str(path)!r}: {err}") from err
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise ValueError(f"{str(path)!r} is not an IDX file of {ndim}-D unsigned bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{str(path)!r} is truncated: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


def load_fashion_mnist(split: str, root: str | os.PathLike[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) uint8 and labels (N,) int64 of ``split`` ("train": 60,000, "val": 10,000)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root) if root is not None else fashion_mnist_root()
    image_stem, label_stem, count = _FILES[split]
    images = _read_idx(_find(root, image_stem), 3)
    labels = _read_idx(_find(root, label_stem), 1)
    if len(images) != len(labels) or len(images) != count:
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images and {len(labels)} labels, expected {count}")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Fashion-MNIST {split}: label {labels.max()} out of range")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
