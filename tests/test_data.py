"""The data layer: Fashion-MNIST IDX reading, ImageNet-layout folders and their errors, samplers."""

import gzip
import os

import numpy as np
import pytest
import torch

from torchsan.data import build_datasets, build_loader, load_fashion_mnist
from torchsan.data.build import EpochBatchSampler, balanced_subset
from torchsan.data.fashion_mnist import DEFAULT_ROOT
from torchsan.data.folder import CorruptImageError, ImageFolderDataset, scan_split


def _write_idx(path, array):
    header = bytes((0, 0, 0x08, array.ndim)) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(root, n_train=60000, n_val=10000, truncate=False):
    rng = np.random.default_rng(0)
    for stem, n, ndim in (("train-images-idx3-ubyte", n_train, 3), ("train-labels-idx1-ubyte", n_train, 1),
                          ("t10k-images-idx3-ubyte", n_val, 3), ("t10k-labels-idx1-ubyte", n_val, 1)):
        arr = rng.integers(0, 256, size=(n, 28, 28)) if ndim == 3 else rng.integers(0, 10, size=(n,))
        _write_idx(root / f"{stem}.gz", arr)
    if truncate:
        raw = gzip.open(root / "t10k-images-idx3-ubyte.gz").read()
        with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
            f.write(raw[: len(raw) // 2])
    return root


def test_idx_reader_roundtrip(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    monkeypatch.setenv("TORCHSAN_FASHION_MNIST", str(tmp_path))
    images, labels = load_fashion_mnist("val")
    expected = np.frombuffer(gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read()[16:], dtype=np.uint8)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images.reshape(-1), torch.from_numpy(expected.copy()))
    assert labels.dtype == torch.int64 and labels.shape == (10000,)


def test_idx_reader_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSAN_FASHION_MNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train")
    _fake_fashion(tmp_path, truncate=True)
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist("val")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("test")


@pytest.mark.skipif(not os.path.isdir(DEFAULT_ROOT), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    images, labels = load_fashion_mnist("val")
    assert images.shape == (10000, 1, 28, 28)
    assert torch.bincount(labels).tolist() == [1000] * 10  # the published test set is balanced
    assert 60 < images.float().mean() < 85  # mean pixel ~72.9 (0.286 * 255)


def test_folder_errors(tmp_path, image_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_split(tmp_path / "nope", "train")
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="no 'train' folder"):
        scan_split(tmp_path / "a", "train")
    (tmp_path / "a" / "train").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        scan_split(tmp_path / "a", "train")
    (tmp_path / "a" / "train" / "cat").mkdir()
    (tmp_path / "a" / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="class folder .*cat.* has no images"):
        scan_split(tmp_path / "a", "train")
    classes, samples = scan_split(image_folder, "train")
    assert classes == ["class_0", "class_1", "class_2"] and len(samples) == 36
    with pytest.raises(ValueError, match="classes differ"):
        ImageFolderDataset(image_folder, "val", transform=lambda x: x, classes=["class_0", "x", "y"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_datasets(str(tmp_path / "missing"), 16)


def test_corrupt_image_error_and_skip(tmp_path):
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=4, val_per_class=2)
    victim = root / "train" / "class_1" / "img_002.png"
    victim.write_bytes(victim.read_bytes()[:60])  # truncated PNG
    datasets, _ = build_datasets(str(root), 16)
    loader = build_loader(datasets["train"], 8, train=True)
    with pytest.raises(CorruptImageError, match="img_002.png.*--skip-corrupt"):
        list(loader)
    datasets, _ = build_datasets(str(root), 16, skip_corrupt=True)
    batches = list(build_loader(datasets["train"], 8, train=True))
    assert len(batches) == 1
    images, labels, skipped = batches[0]
    assert skipped == 1 and images.shape == (7, 3, 16, 16) and labels.shape == (7,)


def test_sampler_partitions_and_resumes():
    size, world = 103, 3
    seen = []
    for rank in range(world):
        s = EpochBatchSampler(size, 5, rank, world, seed=4)
        s.set_epoch(2)
        batches = list(s)
        assert len(batches) == len(s) == (size // world) // 5
        seen += [i for b in batches for i, _ in b]
        s.set_epoch(2, start_step=3)  # a resumed epoch: the same batches, minus the first three
        assert list(s) == batches[3:]
    assert len(seen) == len(set(seen))  # no sample on two ranks
    a, b = EpochBatchSampler(size, 5, seed=4), EpochBatchSampler(size, 5, seed=4)
    a.set_epoch(0)
    b.set_epoch(1)
    assert list(a) != list(b)  # a new order each epoch
    ev = [i for r in range(world) for batch in EpochBatchSampler(size, 7, r, world, shuffle=False) for i, _ in batch]
    assert sorted(ev) == list(range(size))  # evaluation sees every sample exactly once
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatchSampler(10, 8, 0, 2)


def test_augmentation_independent_of_workers(image_folder):
    datasets, _ = build_datasets(str(image_folder), 16)
    runs = []
    for workers in (0, 2):
        loader = build_loader(datasets["train"], 6, train=True, seed=3, workers=workers)
        loader.batch_sampler.set_epoch(1)
        runs.append(torch.cat([b[0] for b in loader]))
    assert torch.equal(runs[0], runs[1])
    assert runs[0].std() > 0.1


def test_balanced_subset():
    targets = [i % 4 for i in range(400)]
    chosen = balanced_subset(targets, 40, 4)
    assert len(chosen) == 40 and sorted(chosen) == chosen
    assert [sum(targets[i] == c for i in chosen) for c in range(4)] == [10] * 4
    assert balanced_subset(targets, 0, 4) == list(range(400))
