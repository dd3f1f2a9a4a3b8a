"""Parameters and multiply-accumulates (MACs), counted with the authors' rules.

The rules of the authors' counter (their ``util/complexity.py``, after sovrasov's
flops-counter.pytorch), per forward call of each module, at batch 1:

* Conv2d: output positions x (kernel area x in / groups x out) + output size if it has a bias;
* BatchNorm: 2 x input size (affine); ReLU: output size; max/avg pools: input size;
* Linear: in x out (no bias term);
* SAN primitives: subtraction / subtraction2 / element-wise relations: output size;
  aggregation: output size x K;
* not counted: softmax, unfold/gathers, padding, concatenation, additions of the residual.

The paper's GMACs column was produced with these rules, so they are what we compare against.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .layers import primitives

# The paper's Table 1 (ImageNet, 224 px): params (M), GMACs, top-1, top-5.
PAPER_TABLE: dict[str, tuple[float, float, float, float]] = {
    "san_resnet26": (13.7, 2.4, 73.6, 91.7),
    "san10_pairwise": (10.5, 2.2, 74.9, 92.1),
    "san10_patchwise": (11.8, 1.9, 77.1, 93.5),
    "san_resnet38": (19.6, 3.2, 76.0, 93.0),
    "san15_pairwise": (14.1, 3.0, 76.6, 93.1),
    "san15_patchwise": (16.2, 2.6, 78.0, 93.9),
    "san_resnet50": (25.6, 4.1, 76.9, 93.5),
    "san19_pairwise": (17.6, 3.8, 76.9, 93.4),
    "san19_patchwise": (20.5, 3.3, 78.2, 93.9),
}


def _conv_macs(m: nn.Conv2d, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> int:
    kh, kw = m.kernel_size
    positions = out.numel() // out.shape[1]
    macs = positions * kh * kw * (m.in_channels // m.groups) * m.out_channels
    return macs + (out.numel() if m.bias is not None else 0)


def _bn_macs(m: nn.modules.batchnorm._BatchNorm, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> int:
    return inputs[0].numel() * (2 if m.affine else 1)


def _linear_macs(m: nn.Linear, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> int:
    return inputs[0].numel() // m.in_features * m.in_features * m.out_features


_RULES = {
    nn.Conv2d: _conv_macs,
    nn.BatchNorm2d: _bn_macs,
    nn.Linear: _linear_macs,
    nn.ReLU: lambda m, i, o: o.numel(),
    nn.MaxPool2d: lambda m, i, o: i[0].numel(),
    nn.AvgPool2d: lambda m, i, o: i[0].numel(),
    nn.AdaptiveAvgPool2d: lambda m, i, o: i[0].numel(),
    nn.AdaptiveMaxPool2d: lambda m, i, o: i[0].numel(),
}


@dataclass
class Profile:
    """Counts for one model at one input size (MACs per image)."""

    params: int
    macs: int
    macs_by_type: dict[str, int] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def mparams(self) -> float:
        return self.params / 1e6


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def profile_model(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> Profile:
    """Params and MACs of one forward pass of a single image of ``input_size`` (C, H, W)."""
    counts: dict[str, int] = defaultdict(int)

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(module, primitives._FootprintOp):
            macs = module.macs(output)
        else:
            macs = _RULES[type(module)](module, inputs, output)
        counts[type(module).__name__] += int(macs)

    stack = contextlib.ExitStack()
    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if type(m) in _RULES or isinstance(m, primitives._FootprintOp)
    ]
    was_training = model.training
    try:
        model.eval()
        # Every module runs by itself, so every counted module's hook fires (hooks alone switch fusion off too).
        stack.enter_context(ops.fusion(False))
        param = next(model.parameters(), None)
        kw = dict(device=param.device, dtype=param.dtype) if param is not None else {}
        model(torch.randn(1, *input_size, **kw))
    finally:
        stack.close()
        model.train(was_training)
        for h in handles:
            h.remove()
    return Profile(count_params(model), sum(counts.values()), dict(counts))
