"""Loss with the authors' label smoothing, and mixup."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["smooth_targets", "soft_cross_entropy", "mixup"]


def smooth_targets(target: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """(N,) class indices -> (N, classes): 1 - eps on the target, eps / (classes - 1) on every other class.

    This is the authors' formula (hszhao/SAN ``util/util.py``); timm and torch's ``label_smoothing``
    instead spread eps over all classes, target included.
    """
    off = eps / (num_classes - 1) if num_classes > 1 else 0.0
    q = torch.full((target.shape[0], num_classes), off, dtype=torch.float32, device=target.device)
    return q.scatter_(1, target.unsqueeze(1), 1.0 - eps)


def soft_cross_entropy(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c q_c log softmax(logits)_c; logits (N, C), q (N, C)."""
    return -(q * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def mixup(images: torch.Tensor, q: torch.Tensor, alpha: float, generator: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): one lambda ~ Beta(alpha, alpha) per batch, pairs by a permutation."""
    beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        lam = float(beta.sample())
    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    return lam * images + (1 - lam) * images[perm], lam * q + (1 - lam) * q[perm]
