"""Training and evaluation: configuration, the loops, checkpoints, logging (see ``torchsan train --help``)."""

from .config import TrainConfig, load_config
from .engine import evaluate, evaluate_checkpoint, lr_factor, train
from .losses import smooth_targets, soft_cross_entropy

__all__ = ["TrainConfig", "evaluate", "evaluate_checkpoint", "load_config", "lr_factor", "smooth_targets",
           "soft_cross_entropy", "train"]
