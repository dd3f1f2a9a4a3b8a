"""The self-attention bottleneck block (paper Fig. 2, the authors' ``Bottleneck``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention import PairwiseSelfAttention, PatchwiseSelfAttention
from .fused import fuses_norm_act_conv1x1, norm_act_conv, norm_act_conv1x1

ATTENTION_TYPES = {"pairwise": PairwiseSelfAttention, "patchwise": PatchwiseSelfAttention}


class SelfAttentionBlock(nn.Module):
    """Pre-activation residual block with identity shortcut, nothing after the add:

        y = x + proj(ReLU(BN(SA(ReLU(BN(x))))))

    SA maps channels -> channels / mid_reduction (its relation width is channels / rel_reduction)
    and ``proj`` (1x1 conv with bias) maps back. Shapes: (N, C, H, W) -> (N, C, H, W).

    Args:
        channels: C, in and out.
        sa_type: ``"pairwise"`` or ``"patchwise"``.
        rel_reduction / mid_reduction: r1 and r2 of the paper (16 and 4 in the authors' model).
        **attn_kwargs: passed to the attention layer (relation, mapping, position_encoding, ...).
    """

    def __init__(
        self,
        channels: int,
        sa_type: str = "pairwise",
        kernel_size: int = 7,
        share_planes: int = 8,
        rel_reduction: int = 16,
        mid_reduction: int = 4,
        dilation: int = 1,
        pad_mode: str = "reflect",
        **attn_kwargs: Any,
    ) -> None:
        super().__init__()
        if sa_type not in ATTENTION_TYPES:
            raise ValueError(f"sa_type must be one of {tuple(ATTENTION_TYPES)}, got {sa_type!r}")
        if channels % rel_reduction or channels % mid_reduction:
            raise ValueError(
                f"channels ({channels}) must be divisible by rel_reduction ({rel_reduction}) "
                f"and mid_reduction ({mid_reduction})"
            )
        mid = channels // mid_reduction
        self.norm1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU(inplace=True)
        self.attn = ATTENTION_TYPES[sa_type](
            channels, channels // rel_reduction, mid, share_planes=share_planes,
            kernel_size=kernel_size, dilation=dilation, pad_mode=pad_mode, **attn_kwargs,
        )
        self.norm2 = nn.BatchNorm2d(mid)
        self.act2 = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(mid, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_act_conv(self.norm2, self.act2, self.proj, self._attention(x), residual=x)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """attn(act1(norm1(x))). With phi, psi and beta stacked into one convolution, norm1, act1 and that
        convolution run as one fused op where allowed."""
        attn = self.attn
        if attn.stacks_transforms(x) and fuses_norm_act_conv1x1(
                self.norm1, self.act1, x, attn.phi.out_channels + attn.psi.out_channels + attn.beta.out_channels,
                attn, attn.phi, attn.psi, attn.beta):
            attn._check_input(x)
            weight, bias, splits = attn.stacked_transform()
            return attn.attend(*norm_act_conv1x1(self.norm1, x, weight, bias).split(splits, dim=1))
        return attn(self.act1(self.norm1(x)))
