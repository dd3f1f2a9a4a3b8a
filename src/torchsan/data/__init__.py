"""Data: the embedded default data set (Fashion-MNIST), ImageNet-layout folders, loaders, sample photos."""

from .build import EMBEDDED_DATA, DataInfo, EpochBatchSampler, build_datasets, build_loader
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from .folder import CorruptImageError, ImageFolderDataset
from .samples import sample_batch

__all__ = [
    "EMBEDDED_DATA", "FASHION_MNIST_CLASSES", "CorruptImageError", "DataInfo", "EpochBatchSampler",
    "ImageFolderDataset", "build_datasets", "build_loader", "load_fashion_mnist", "sample_batch",
]
