"""The mapping gamma of the paper (eq. 2 and 4), built from a short spec string.

A spec is a '-'-separated sequence of ``R`` (BatchNorm + ReLU) and ``L`` (a linear map, i.e. a
1x1 convolution over the (K, L) grid). The authors' model uses ``"R-L-R-L"``:
BN-ReLU-conv(in -> hidden, no bias)-BN-ReLU-conv(hidden -> out, bias). The paper's mapping
ablation (Table 4) compares ``"L"``, ``"R-L"``, ``"L-R-L"`` and ``"R-L-R-L"``-style stacks.
A linear map directly followed by ``R`` has no bias (the BN absorbs it), as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import ops
from ..ops.reference import batchnorm_scale_shift


def parse_mapping(spec: str) -> list[str]:
    """Split and validate a mapping spec; returns its tokens."""
    tokens = [t.strip().upper() for t in spec.split("-")] if isinstance(spec, str) else []
    if not tokens or any(t not in ("R", "L") for t in tokens) or tokens[-1] != "L":
        raise ValueError(
            f"mapping must be a '-'-separated sequence of 'R' and 'L' ending in 'L' "
            f"(e.g. 'R-L-R-L'), got {spec!r}"
        )
    return tokens


def build_mapping(spec: str, in_channels: int, hidden_channels: int, out_channels: int) -> nn.Sequential:
    """gamma as an ``nn.Sequential`` of BN/ReLU/1x1-conv, applied to a (N, in, K, L) grid.

    Every linear map but the last outputs ``hidden_channels``; the last outputs ``out_channels``.
    """
    tokens = parse_mapping(spec)
    n_linear = tokens.count("L")
    modules: list[nn.Module] = []
    channels, seen_linear = in_channels, 0
    for i, token in enumerate(tokens):
        if token == "R":
            modules += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        else:
            seen_linear += 1
            out = out_channels if seen_linear == n_linear else hidden_channels
            bias = not (i + 1 < len(tokens) and tokens[i + 1] == "R")
            modules.append(nn.Conv2d(channels, out, kernel_size=1, bias=bias))
            channels = out
    return nn.Sequential(*modules)


def update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """What ``nn.BatchNorm2d.forward`` does to the running statistics in training mode (var: biased)."""
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(var.detach() * (count / (count - 1)), alpha=momentum)


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BN (running statistics) as the per-channel affine map it applies: (scale, shift)."""
    return batchnorm_scale_shift(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)


def batchnorm_then(
    bn: nn.BatchNorm2d,
    x: torch.Tensor,
    with_batch_stats: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    with_affine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``bn`` and the op after it, as one fused op; running statistics updated as ``nn.BatchNorm2d`` does.

    With batch statistics (training, or no running statistics) ``with_batch_stats(x, weight, bias, eps)``
    runs, e.g. :func:`torchsan.ops.batchnorm_relu_conv` (gradients through the statistics in the same
    autograd node); otherwise BN is the affine map of its running statistics, ``with_affine(x, scale, shift)``.
    """
    if bn.training or bn.running_mean is None:
        y, mean, var = with_batch_stats(x, bn.weight, bn.bias, bn.eps)
        update_running_stats(bn, mean, var, x.numel() // x.shape[1])
        return y
    scale, shift = batchnorm_affine(bn)
    return with_affine(x, scale, shift)


# Where the fused op pays off. Its kernel stages relu(BN(x)) for 256 positions at a time (Cin rows) and runs a
# register-blocked product over Cin; past a few thousand input channels the staged rows leave L2, and with a very
# wide output the unfused modules' GEMM-backed convolution wins. benchmarks/mapping_triples.py (batch 8, 2 cores):
# fused/unfused 0.41 (18->16 over (49, 3136)) ... 1.0 (130->128, 3200->32), 1.24 for 32->1568 (patchwise stage 3).
MAX_FUSED_IN_CHANNELS = 4096
MAX_FUSED_OUT_CHANNELS = 1024


def has_hooks(*modules: nn.Module) -> bool:
    from torch.nn.modules import module as module_impl

    if module_impl._global_forward_hooks or module_impl._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in modules)


def fusable_triple(bn: nn.Module, act: nn.Module, conv: nn.Module) -> bool:
    """bn, act, conv are BatchNorm2d, ReLU, a plain 1x1 Conv2d, without hooks, of a size where fusing pays off."""
    if has_hooks(bn, act, conv):
        return False  # hooks (pruning, quantisation, inspection) must see the modules run one by one
    return (type(bn) is nn.BatchNorm2d and type(act) is nn.ReLU and type(conv) is nn.Conv2d
            and conv.kernel_size == (1, 1) and conv.groups == 1 and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1)
            and conv.in_channels <= MAX_FUSED_IN_CHANNELS and conv.out_channels <= MAX_FUSED_OUT_CHANNELS)


def bn_relu_conv1x1(bn: nn.BatchNorm2d, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """conv1x1(relu(bn(x))) with weight (Cout, Cin[, 1, 1]) as one fused op, BN in training or eval mode
    (:func:`batchnorm_then`). x: (N, Cin, ...) -> (N, Cout, ...)."""
    w = weight.flatten(1)
    return batchnorm_then(bn, x, lambda t, *n: ops.batchnorm_relu_conv(t, *n, w, bias),
                          lambda t, scale, shift: ops.bn_relu_conv(t, scale, shift, w, bias))


def _fusable(seq: nn.Sequential, i: int) -> bool:
    """seq[i:i+3] is a fusable BN-ReLU-conv1x1 triple."""
    return i + 2 < len(seq) and fusable_triple(seq[i], seq[i + 1], seq[i + 2])


def run_mapping(seq: nn.Sequential, z: torch.Tensor) -> torch.Tensor:
    """Apply a mapping built by :func:`build_mapping` to z (N, C, K, L) (or any (N, C, ...) grid).

    On the fused ``cpu`` backend each BN-ReLU-conv1x1 triple runs as one op
    (:func:`torchsan.ops.bn_relu_conv`), without writing the BN and ReLU outputs; the result, the
    gradients and the BN running statistics are those of running the modules one by one, which is
    what every other backend does (and what hooks, e.g. the MAC counter, see).
    """
    if ops.backend_for(z) != "cpu" or z.dim() != 4:
        return seq(z)
    i = 0
    while i < len(seq):
        if _fusable(seq, i):
            z = bn_relu_conv1x1(seq[i], z, seq[i + 2].weight, seq[i + 2].bias)
            i += 3
        else:
            z = seq[i](z)
            i += 1
    return z
