"""The self-attention bottleneck block (paper Fig. 2, the authors' ``Bottleneck``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import ops
from .attention import PairwiseSelfAttention, PatchwiseSelfAttention
from .mapping import MAX_FUSED_OUT_CHANNELS, bn_relu_conv1x1, fusable_triple, has_hooks

# The block's BN-ReLU-conv1x1 pairs run as one fused op (torchsan.ops.batchnorm_relu_conv) on maps of at least this
# many pixels. There the fused op saves the BN and ReLU passes over the activations; on smaller maps (SAN stages 3-4:
# 14x14 and 7x7, with 256-2048 channels) oneDNN's convolution is 2-5x faster than the fused kernel.
# (Measured at batch 8 on 2 cores: fused/unfused 0.65-0.79 at 112 and 56 px, 0.93-1.01 at 28 px, 1.8-5 at 14-7 px.)
MIN_FUSED_PIXELS = 1024

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
        fuse = ops.backend_for(x) == "cpu" and x.dim() == 4 and x.shape[2] * x.shape[3] >= MIN_FUSED_PIXELS
        stacked = self.attn.stacked_transform() if fuse and not has_hooks(self.attn) else None
        if (stacked is not None and fusable_triple(self.norm1, self.act1, self.attn.phi)
                and sum(stacked[2]) <= MAX_FUSED_OUT_CHANNELS):
            # norm1, act1 and the attention's stacked phi/psi/beta convolution as one op (same function).
            self.attn._check_input(x)
            weight, bias, splits = stacked
            q, k, v = bn_relu_conv1x1(self.norm1, x, weight, bias).split(splits, dim=1)
            out = self.attn.attend(q, k, v)
        else:
            out = self.attn(self.act1(self.norm1(x)))
        if fuse and fusable_triple(self.norm2, self.act2, self.proj):
            out = bn_relu_conv1x1(self.norm2, out, self.proj.weight, self.proj.bias)
        else:
            out = self.proj(self.act2(self.norm2(out)))
        return out + x
