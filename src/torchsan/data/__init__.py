"""Data: embedded sample images (and, later, data sets and loaders)."""

from .samples import sample_batch

__all__ = ["sample_batch"]
