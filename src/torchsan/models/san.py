"""SAN10/15/19, pairwise and patchwise (Zhao, Jia, Koltun, CVPR 2020, Table 1), timm style.

Architecture (the authors' ``model/san.py``): a stem conv1x1(in_chans -> 64)-BN-ReLU at full
resolution, then five stages, each MaxPool 2x2 -> transition conv1x1 (no bias) -> blocks -> BN
-> ReLU, then global average pooling and a linear classifier. Footprint 3x3 in stage 0 and 7x7
after. At 224 px the stages run at 112, 56, 28, 14 and 7 px. In the modules here each max-pool ends
the module before the stage it downsamples for (see :class:`SANStage`); parameter names follow the
stages as the paper draws them.

Small images (16-64 px, e.g. CIFAR or Fashion-MNIST): pass ``small_input=True``. A 7x7 reflect-
padded footprint needs a map of at least 4 px, which five poolings break below 128 px, so the
small-input form pools only before stages 1 and 2 (output stride 4; a 32 px image runs its
stages at 32, 16, 8, 8 and 8 px). ``stage_pools`` sets the pooling of each stage explicitly.
An input too small for the chosen footprints raises a ``ValueError`` that says so.

Authors' checkpoints (``model_best.pth``) load through :func:`checkpoint_filter_fn`, which timm
applies for ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from ..layers import SelfAttentionBlock
from ..layers.fused import conv1x1, conv_norm_act_pool, norm_act_pool
from ..ops import default_padding
from ._width import scale_channels

__all__ = ["SAN", "SANStage", "SANStem", "checkpoint_filter_fn", "SMALL_INPUT_POOLS"]

SMALL_INPUT_POOLS = (False, True, True, False, False)
IMAGENET_POOLS = (True, True, True, True, True)
SAN_LAYERS = {10: (2, 1, 2, 4, 1), 15: (3, 2, 3, 5, 2), 19: (3, 3, 4, 6, 3)}


class SANStem(nn.Module):
    """conv1x1 (no bias) -> BN -> ReLU at full resolution, then the first stage's 2x2 max-pool (if it pools); where
    allowed, one op in training or eval that writes only the pooled map (``layers.fused.conv_norm_act_pool``)."""

    def __init__(self, in_chans: int, width: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_norm_act_pool(self.conv, self.bn, self.act, self.pool, x)


class SANStage(nn.Module):
    """conv1x1 transition -> ``depth`` blocks -> BN -> ReLU, then the next stage's 2x2 max-pool (if it pools).

    The paper starts each stage with its pooling; here the pooling ends the stage before, so that BN, ReLU and the
    pool run as one fused op (``torchsan.layers.fused.norm_act_pool``) that never writes the full-resolution BN and
    ReLU outputs. The stage's own output, before that pool, is what ``SAN.forward_intermediates`` returns.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        depth: int,
        sa_type: str,
        kernel_size: int,
        pool: bool = False,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.transition = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.blocks = nn.Sequential(*[
            SelfAttentionBlock(out_channels, sa_type, kernel_size=kernel_size, **block_kwargs)
            for _ in range(depth)
        ])
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2) if pool else nn.Identity()
        self.grad_checkpointing = False

    def forward_body(self, x: torch.Tensor) -> torch.Tensor:
        """Transition and blocks."""
        x = conv1x1(self.transition, x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_unpooled(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's output at its own resolution, before the next stage's pool."""
        return self.act(self.norm(self.forward_body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_act_pool(self.norm, self.act, self.pool, self.forward_body(x))


class SAN(nn.Module):
    """Self-attention network.

    Shapes: (N, in_chans, H, W) -> logits (N, num_classes); ``forward_features`` gives
    (N, widths[-1], H / stride, W / stride) with stride 32 (4 with ``small_input``).

    Args:
        layers: blocks per stage (SAN10: 2,1,2,4,1; SAN15: 3,2,3,5,2; SAN19: 3,3,4,6,3).
        sa_type: ``"pairwise"`` or ``"patchwise"``.
        kernels: footprint per stage.
        widths: channels per stage; ``stem_width`` is the stem's.
        small_input: pool only before stages 1 and 2, for 16-64 px inputs (see module doc).
        stage_pools: explicit 2x2 max-pool flag per stage (overrides ``small_input``).
        share_planes, rel_reduction, mid_reduction, dilation, pad_mode: block options.
        relation, mapping, position_encoding, transform: attention options, for the ablations
            (defaults: the authors' model; see :mod:`torchsan.layers`).
        memory_efficient: recompute the attention weights' intermediate activations in the backward
            pass (much less training memory, same function; see docs/performance.md).
        zero_init_last: start each block's last 1x1 conv at zero (the block is then the identity
            at init; not in the paper; it speeds up short runs).
        width: channel multiplier of ``widths`` and ``stem_width``; stage widths are rounded to a multiple
            of lcm(rel_reduction, mid_reduction * share_planes) (32 by default: what a block needs), the
            stem's to 8. The ResNets take the same option, so both families keep the paper's ratio.
    """

    def __init__(
        self,
        layers: Sequence[int] = SAN_LAYERS[10],
        sa_type: str = "pairwise",
        kernels: Sequence[int] = (3, 7, 7, 7, 7),
        widths: Sequence[int] = (64, 256, 512, 1024, 2048),
        stem_width: int = 64,
        num_classes: int = 1000,
        in_chans: int = 3,
        small_input: bool = False,
        stage_pools: Sequence[bool] | None = None,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        share_planes: int = 8,
        rel_reduction: int = 16,
        mid_reduction: int = 4,
        dilation: int = 1,
        pad_mode: str = "reflect",
        relation: str | None = None,
        mapping: str = "R-L-R-L",
        position_encoding: bool = True,
        transform: str = "separate",
        memory_efficient: bool = False,
        zero_init_last: bool = False,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if width != 1.0:
            step = math.lcm(rel_reduction, mid_reduction * share_planes)
            widths = [scale_channels(w, width, step) for w in widths]
            stem_width = scale_channels(stem_width, width, 8)
        if not (len(layers) == len(kernels) == len(widths)):
            raise ValueError(
                f"layers, kernels and widths need one entry per stage, got {len(layers)}, "
                f"{len(kernels)} and {len(widths)}"
            )
        if stage_pools is None:
            stage_pools = SMALL_INPUT_POOLS if small_input else IMAGENET_POOLS
        if len(stage_pools) != len(layers):
            raise ValueError(f"stage_pools needs {len(layers)} entries, got {len(stage_pools)}")
        attn_kwargs: dict[str, Any] = dict(mapping=mapping, transform=transform, memory_efficient=memory_efficient)
        if relation is not None:
            attn_kwargs["relation"] = relation
        if sa_type == "pairwise":
            attn_kwargs["position_encoding"] = position_encoding
        elif not position_encoding:
            raise ValueError("position_encoding applies to pairwise attention only")
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.sa_type, self.kernels, self.pad_mode = sa_type, tuple(kernels), pad_mode
        self.dilation, self.stage_pools = dilation, tuple(bool(p) for p in stage_pools)

        # Each 2x2 max-pool ends the module before the stage it downsamples for (see SANStage).
        self.stem = SANStem(in_chans, stem_width, pool=self.stage_pools[0])
        stages, self.feature_info = [], []
        channels, reduction = stem_width, 1
        next_pools = (*self.stage_pools[1:], False)
        for t, (depth, kernel, width, pool) in enumerate(zip(layers, kernels, widths, self.stage_pools)):
            stages.append(SANStage(
                channels, width, depth, sa_type, kernel, pool=next_pools[t], share_planes=share_planes,
                rel_reduction=rel_reduction, mid_reduction=mid_reduction, dilation=dilation,
                pad_mode=pad_mode, **attn_kwargs,
            ))
            channels, reduction = width, reduction * (2 if pool else 1)
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{t}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = channels

        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels * self.global_pool.feat_mult(), num_classes) if num_classes else nn.Identity()
        if zero_init_last:  # each residual branch starts at zero: faster early training (Goyal et al. 2017)
            for stage in self.stages:
                for block in stage.blocks:
                    nn.init.zeros_(block.proj.weight)
                    nn.init.zeros_(block.proj.bias)

    # --- timm model contract -------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.blocks\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        in_features = self.num_features * self.global_pool.feat_mult()
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ``ValueError`` if an (H, W) input is too small for some stage's pooling or footprint."""
        hint = "larger images" if self.stage_pools == SMALL_INPUT_POOLS else "small_input=True (16-64 px inputs)"
        for t, (kernel, pool) in enumerate(zip(self.kernels, self.stage_pools)):
            if pool:
                if min(height, width) < 2:
                    raise ValueError(f"input too small: stage {t} would max-pool a {height}x{width} px map; use {hint}")
                height, width = height // 2, width // 2
            pad = default_padding(kernel, self.dilation)
            if self.pad_mode == "reflect" and pad >= min(height, width):
                raise ValueError(
                    f"input too small: stage {t} runs at {height}x{width} px, but its {kernel}x{kernel} "
                    f"reflect-padded footprint needs at least {pad + 1} px; use {hint} or pad_mode='zeros'"
                )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (N, {self.in_chans}, H, W), got {tuple(x.shape)}")
        self.check_input_size(x.shape[2], x.shape[3])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, num_features, H', W')."""
        self._check_input(x)
        return self.stages(self.stem(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage outputs at their own resolutions (timm's feature API; ``features_only=True`` uses it).

        Args:
            x: (N, in_chans, H, W).
            indices: the stages to return (the last n if an int; all if None).
            norm: timm's argument; SAN has no final norm to apply.
            stop_early: run no stage after the last one asked for.
            output_fmt: only "NCHW".
            intermediates_only: return only the intermediates, not the final features too.
        Returns:
            The intermediates (N, widths[t], H_t, W_t), or (final features, intermediates).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.stages), indices)
        self._check_input(x)
        x, intermediates = self.stem(x), []
        stages = self.stages[:last + 1] if stop_early or intermediates_only else self.stages
        for t, stage in enumerate(stages):
            if t in take:
                y = stage.forward_unpooled(x)
                intermediates.append(y)
                x = stage.pool(y)
            else:
                x = stage(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head); returns the kept indices."""
        take, last = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:last + 1]
        self.stages[-1].pool = nn.Identity()  # it pooled for a stage that is gone
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, num_features, H', W') -> logits (N, num_classes), or pooled features."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- the authors' checkpoints ------------------------------------------------------------------
_AUTHOR_RENAMES = [
    (r"^conv_in\.", "stem.conv."),
    (r"^bn_in\.", "stem.bn."),
    (r"^conv(\d)\.", r"stages.\1.transition."),
    (r"^bn(\d)\.", r"stages.\1.norm."),
    (r"^layer(\d)\.(\d+)\.bn1\.", r"stages.\1.blocks.\2.norm1."),
    (r"^layer(\d)\.(\d+)\.bn2\.", r"stages.\1.blocks.\2.norm2."),
    (r"^layer(\d)\.(\d+)\.conv\.", r"stages.\1.blocks.\2.proj."),
    (r"^layer(\d)\.(\d+)\.sam\.conv1\.", r"stages.\1.blocks.\2.attn.phi."),
    (r"^layer(\d)\.(\d+)\.sam\.conv2\.", r"stages.\1.blocks.\2.attn.psi."),
    (r"^layer(\d)\.(\d+)\.sam\.conv3\.", r"stages.\1.blocks.\2.attn.beta."),
    (r"^layer(\d)\.(\d+)\.sam\.conv_w\.", r"stages.\1.blocks.\2.attn.gamma."),
    (r"^layer(\d)\.(\d+)\.sam\.conv_p\.", r"stages.\1.blocks.\2.attn.pos_proj."),
]


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
    """Convert the authors' SAN state dict (``model/san.py`` names) to this module's names.

    Accepts the whole ``model_best.pth`` dict (``state_dict`` is unwrapped) and keys with or
    without DDP's ``module.`` prefix. A state dict already in our naming passes through.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        for pattern, repl in _AUTHOR_RENAMES:
            key, hits = re.subn(pattern, repl, key)
            if hits:
                break
        out[key] = value
    return out


# --- registration ------------------------------------------------------------------------------
def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "stem.conv", "classifier": "fc",
        "paper_ids": "arXiv:2004.13621", "paper_name": "Exploring Self-attention for Image Recognition",
        "origin_url": "https://github.com/hszhao/SAN", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    f"san{depth}_{kind}": _cfg() for depth in SAN_LAYERS for kind in ("pairwise", "patchwise")
})


def _create_san(variant: str, pretrained: bool, **kwargs: Any) -> SAN:
    depth, sa_type = variant.removeprefix("san").split("_")
    kwargs.setdefault("layers", SAN_LAYERS[int(depth)])
    kwargs.setdefault("sa_type", sa_type)
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3, 4))
    return build_model_with_cfg(
        SAN, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


@register_model
def san10_pairwise(pretrained: bool = False, **kwargs: Any) -> SAN:
    """SAN10 with pairwise (subtraction) attention: 10.5M params, 2.2 GMACs at 224 px."""
    return _create_san("san10_pairwise", pretrained, **kwargs)


@register_model
def san10_patchwise(pretrained: bool = False, **kwargs: Any) -> SAN:
    """SAN10 with patchwise (concatenation) attention: 11.8M params, 1.9 GMACs at 224 px."""
    return _create_san("san10_patchwise", pretrained, **kwargs)


@register_model
def san15_pairwise(pretrained: bool = False, **kwargs: Any) -> SAN:
    """SAN15 pairwise: 14.1M params, 3.0 GMACs at 224 px."""
    return _create_san("san15_pairwise", pretrained, **kwargs)


@register_model
def san15_patchwise(pretrained: bool = False, **kwargs: Any) -> SAN:
    """SAN15 patchwise: 16.2M params, 2.6 GMACs at 224 px."""
    return _create_san("san15_patchwise", pretrained, **kwargs)


@register_model
def san19_pairwise(pretrained: bool = False, **kwargs: Any) -> SAN:
    """SAN19 pairwise: 17.6M params, 3.8 GMACs at 224 px."""
    return _create_san("san19_pairwise", pretrained, **kwargs)


@register_model
def san19_patchwise(pretrained: bool = False, **kwargs: Any) -> SAN:
    """SAN19 patchwise: 20.5M params, 3.3 GMACs at 224 px."""
    return _create_san("san19_patchwise", pretrained, **kwargs)
