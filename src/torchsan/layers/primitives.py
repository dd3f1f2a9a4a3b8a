"""Thin ``nn.Module`` wrappers over :mod:`torchsan.ops`.

They hold the footprint so that a layer reads like the paper, and they give the MAC counter in
:mod:`torchsan.profile` a module to hook (``macs`` follows the authors' counting rules).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops


class _FootprintOp(nn.Module):
    def __init__(
        self,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        pad_mode: str = "reflect",
    ) -> None:
        super().__init__()
        fp = ops.resolve_footprint(kernel_size, stride, padding, dilation, pad_mode)
        self.kernel_size, self.stride, self.padding = fp.kernel_size, fp.stride, fp.padding
        self.dilation, self.pad_mode = fp.dilation, fp.pad_mode

    @property
    def args(self) -> tuple[int, int, int, int, str]:
        """(kernel_size, stride, padding, dilation, pad_mode): the footprint arguments of every op."""
        return self.kernel_size, self.stride, self.padding, self.dilation, self.pad_mode

    @property
    def footprint(self) -> ops.Footprint:
        return ops.Footprint(*self.args)

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, pad_mode={self.pad_mode!r}"
        )

    def macs(self, output: torch.Tensor) -> int:
        """Multiply-adds by the authors' rule: one per output element."""
        return output.numel()


class Aggregation(_FootprintOp):
    """(N, C, H, W) values, (N, Cw, K, L) weights -> (N, C, H_out, W_out); see ops.aggregation."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return ops.aggregation(x, weight, *self.args)

    def macs(self, output: torch.Tensor) -> int:
        """The authors' rule: output size x K."""
        return output.numel() * self.kernel_size**2


class Subtraction(_FootprintOp):
    """(N, C, H, W) -> (N, C, K, L): centre minus neighbour; see ops.subtraction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.subtraction(x, *self.args)


class Subtraction2(_FootprintOp):
    """(N, C, H, W) x 2 -> (N, C, K, L): x1 at the centre minus x2 at the neighbour.

    ``append`` (1 or N, E, K, L) is concatenated after the output channels in the same pass (see
    ops.subtraction2); the MAC counter's hooks see the module without it (see PairwiseSelfAttention).
    """

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, append: torch.Tensor | None = None) -> torch.Tensor:
        return ops.subtraction2(x1, x2, *self.args, append=append)


class Unfold(_FootprintOp):
    """(N, C, H, W) -> (N, C, K, L): the neighbours themselves (a gather, not counted)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.unfold(x, *self.args)

    def macs(self, output: torch.Tensor) -> int:
        return 0


class Centre(_FootprintOp):
    """(N, C, H, W) -> (N, C, 1, L): each output position's centre pixel (not counted)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.centre(x, *self.args)

    def macs(self, output: torch.Tensor) -> int:
        return 0
