"""The paper's convolutional baselines ResNet26/38/50 (Table 1), torchvision style.

Bottleneck ResNets (stride on the 3x3 conv, as torchvision's v1.5) with (1, 2, 4, 1),
(2, 3, 5, 2) and (3, 4, 6, 3) blocks: 13.70M, 19.63M and 25.56M parameters. Registered as
``san_resnet26/38/50`` so that timm's own ``resnet26`` (a different, (2, 2, 2, 2) network)
stays available. Parameter names follow torchvision, which is also the authors' naming, so their
ResNet checkpoints load directly (``module.`` prefixes are stripped).

``small_input=True`` swaps the 7x7/2 stem and its max-pool for a 3x3/1 conv (the usual CIFAR
stem), for 16-64 px images: output stride 8 instead of 32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq
from torch import nn

from ._width import scale_channels

__all__ = ["Bottleneck", "ResNet", "checkpoint_filter_fn"]

RESNET_LAYERS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1(x4)-BN, + shortcut, ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet. Shapes: (N, in_chans, H, W) -> (N, num_classes).

    Args:
        layers: blocks per stage.
        small_input: 3x3 stride-1 stem without max-pool, for 16-64 px inputs.
        width: channel multiplier (stem and every stage; 64 * width rounded to a multiple of 8). The SAN
            models take the same option, so reduced-width ResNets and SANs keep the paper's parameter ratio.
        zero_init_last: start each block's last BN at zero (the block is then the identity at
            init; not in the paper; it speeds up short runs).
    """

    def __init__(
        self,
        layers: Sequence[int] = RESNET_LAYERS[26],
        num_classes: int = 1000,
        in_chans: int = 3,
        small_input: bool = False,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        zero_init_last: bool = False,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers needs 4 entries, got {tuple(layers)}")
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        base = scale_channels(64, width, 8)
        self.inplanes = base
        if small_input:
            self.conv1 = nn.Conv2d(in_chans, base, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(base, layers[0])
        self.layer2 = self._make_layer(base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(base * 8, layers[3], stride=2)
        r = 1 if small_input else 2
        self.feature_info = [dict(num_chs=base, reduction=r, module="relu")] + [
            dict(num_chs=base * 2**i * 4, reduction=r * 2 * 2**i if not small_input else 2**i,
                 module=f"layer{i + 1}") for i in range(4)
        ]
        self.num_features = self.head_hidden_size = base * 8 * Bottleneck.expansion
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.grad_checkpointing = False
        if zero_init_last:  # each residual branch starts at zero: faster early training (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    # --- timm model contract -------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        in_features = self.num_features * self.global_pool.feat_mult()
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, 2048, H', W')."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (N, {self.in_chans}, H, W), got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stages, x, flatten=True)
        for stage in stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
    """Unwrap ``state_dict`` and strip DDP's ``module.`` prefix; names are already torchvision's."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "conv1", "classifier": "fc",
        "paper_ids": "arXiv:2004.13621", **kwargs,
    }


default_cfgs = generate_default_cfgs({f"san_resnet{d}": _cfg() for d in RESNET_LAYERS})


def _create_resnet(variant: str, pretrained: bool, **kwargs: Any) -> ResNet:
    kwargs.setdefault("layers", RESNET_LAYERS[int(variant.removeprefix("san_resnet"))])
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3, 4))
    return build_model_with_cfg(
        ResNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices),
        **kwargs,
    )


@register_model
def san_resnet26(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """The paper's ResNet26, (1, 2, 4, 1) bottlenecks: 13.7M params, 2.4 GMACs at 224 px."""
    return _create_resnet("san_resnet26", pretrained, **kwargs)


@register_model
def san_resnet38(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """The paper's ResNet38, (2, 3, 5, 2) bottlenecks: 19.6M params, 3.2 GMACs at 224 px."""
    return _create_resnet("san_resnet38", pretrained, **kwargs)


@register_model
def san_resnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """The paper's ResNet50, (3, 4, 6, 3) bottlenecks: 25.6M params, 4.1 GMACs at 224 px."""
    return _create_resnet("san_resnet50", pretrained, **kwargs)
