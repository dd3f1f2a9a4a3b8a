"""The paper's studies as commands: ``torchsan ablate`` (the ablations), ``torchsan robustness rotate``
(zero-shot rotations and flips) and ``torchsan robustness attack`` (targeted PGD)."""

from .ablate import STUDIES, ablate, variants
from .attack import attack, pgd, targets_for
from .rotate import TRANSFORMS, rotate

__all__ = ["STUDIES", "TRANSFORMS", "ablate", "attack", "pgd", "rotate", "targets_for", "variants"]
