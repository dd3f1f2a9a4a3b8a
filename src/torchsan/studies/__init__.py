"""The paper's studies as commands: ``torchsan robustness rotate`` (zero-shot rotations and flips)."""

from .rotate import TRANSFORMS, rotate

__all__ = ["TRANSFORMS", "rotate"]
