"""Runs of modules as one fused op: where ``torchsan.ops.should_fuse`` allows it, else module by module.

Each function here takes the modules a layer holds and its input, and returns what running the modules one by one
returns: the same outputs, gradients and BatchNorm running statistics (up to float rounding). Which route runs is
decided by ``torchsan.ops.should_fuse`` alone (the switch ``torchsan.ops.fusion``, the modules' hooks and the
backend's kernels); this module only checks that the modules are the plain ones a fused op stands for.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .. import ops
from ..ops._fusion import has_hooks
from ..ops.reference import batchnorm_scale_shift

__all__ = [
    "batchnorm_affine",
    "conv1x1",
    "fuses_norm_act_conv1x1",
    "is_conv1x1",
    "norm_act_conv",
    "norm_act_conv1x1",
    "norm_act_pool",
    "patchwise_concat_mapping",
    "softmax_aggregation",
    "subtraction2_attention",
    "fuses_subtraction2_attention",
    "patchwise_concat_attention",
    "fuses_patchwise_concat_attention",
    "subtraction2_mapping",
    "run_mapping",
    "update_running_stats",
]


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


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


def _batchnorm_then(
    bn: nn.BatchNorm2d,
    x: torch.Tensor,
    with_batch_stats: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    with_affine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``bn`` and the op after it as one fused op, running statistics updated as ``nn.BatchNorm2d`` does:
    ``with_batch_stats(x, weight, bias, eps)`` with batch statistics, else ``with_affine(x, scale, shift)``."""
    if _uses_batch_stats(bn):
        y, mean, var = with_batch_stats(x, bn.weight, bn.bias, bn.eps)
        update_running_stats(bn, mean, var, x.numel() // x.shape[1])
        return y
    return with_affine(x, *batchnorm_affine(bn))


def _is_bn_relu(bn: nn.Module, act: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d and type(act) is nn.ReLU


def is_conv1x1(conv: nn.Module) -> bool:
    """A plain 1x1 ``nn.Conv2d`` (stride 1, no padding, one group): a matrix product per position."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.groups == 1 and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1))


def _is_maxpool2x2(pool: nn.Module) -> bool:
    def both(value: int | tuple[int, int], n: int) -> bool:
        return value in (n, (n, n))

    return (type(pool) is nn.MaxPool2d and both(pool.kernel_size, 2) and both(pool.stride, 2)
            and both(pool.padding, 0) and both(pool.dilation, 1) and not pool.ceil_mode and not pool.return_indices)


def fuses_norm_act_conv1x1(bn: nn.Module, act: nn.Module, x: torch.Tensor, out_channels: int,
                           *convs: nn.Module) -> bool:
    """Whether a 1x1 convolution to ``out_channels`` of ``act(bn(x))``, x (N, Cin, H, W), runs as one fused op
    (:func:`norm_act_conv1x1`). ``convs``: the modules the convolution stands for, whose hooks must see them run."""
    if not (_is_bn_relu(bn, act) and x.dim() == 4):
        return False
    op = "batchnorm_relu_conv1x1" if _uses_batch_stats(bn) else "affine_relu_conv1x1"
    return ops.should_fuse(op, x, bn, act, *convs, out_channels=out_channels)


def norm_act_conv1x1(bn: nn.BatchNorm2d, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """The 1x1 convolution ``weight`` (Cout, Cin[, 1, 1]), ``bias`` of ``relu(bn(x))`` as one fused op."""
    w = weight.flatten(1)
    return _batchnorm_then(bn, x, lambda t, *norm: ops.batchnorm_relu_conv1x1(t, *norm, w, bias),
                           lambda t, scale, shift: ops.affine_relu_conv1x1(t, scale, shift, w, bias))


def conv1x1(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a plain 1x1 ``conv`` (x (N, Cin, H, W)): as the backend's own op (``ops.conv1x1``) or one
    matrix product per image where the backend says that beats its convolution (inference: narrow inputs on large
    maps; large maps or a single image), else the module."""
    if not (is_conv1x1(conv) and x.dim() == 4):
        return conv(x)
    channels = dict(in_channels=conv.in_channels, out_channels=conv.out_channels)
    if ops.should_fuse("conv1x1", x, conv, **channels):
        return ops.conv1x1(x, conv.weight.flatten(1), conv.bias)
    if ops.should_fuse("conv1x1_matmul", x, conv, **channels):
        return conv1x1_matmul(x, conv.weight, conv.bias)
    return conv(x)


def conv1x1_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 1x1 convolution ``weight`` (Cout, Cin[, 1, 1]), ``bias`` (Cout,) of x (N, Cin, H, W) as one matrix product
    per image on x's (N, Cin, H * W) view: (N, Cout, H, W)."""
    n, _, h, w = x.shape
    per_image = weight.flatten(1).expand(n, -1, -1)
    if bias is None:
        y = torch.bmm(per_image, x.flatten(2))
    else:
        y = torch.baddbmm(bias[None, :, None], per_image, x.flatten(2))
    return y.view(n, weight.shape[0], h, w)


def norm_act_conv(bn: nn.Module, act: nn.Module, conv: nn.Module, x: torch.Tensor,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(act(bn(x)))`` (``+ residual``, a tensor of the output's shape): BN, ReLU and a 1x1 conv as one op where
    allowed, and with an eval-mode BN that op adds the residual too; else the modules, the conv by :func:`conv1x1`."""
    if is_conv1x1(conv) and fuses_norm_act_conv1x1(bn, act, x, conv.out_channels, conv):
        if residual is not None and not _uses_batch_stats(bn):
            scale, shift = batchnorm_affine(bn)
            return ops.affine_relu_conv1x1(x, scale, shift, conv.weight.flatten(1), conv.bias, residual=residual)
        y, owned = norm_act_conv1x1(bn, x, conv.weight, conv.bias), True
    else:
        # a plain Conv2d without hooks returns a new tensor that nothing else has seen
        y, owned = conv1x1(conv, act(bn(x))), is_conv1x1(conv) and not has_hooks(conv)
    if residual is None:
        return y
    if owned and not torch.is_grad_enabled() and y.shape == residual.shape and y.dtype == residual.dtype:
        return y.add_(residual)  # without autograd, into y rather than into a third map
    return y + residual


def norm_act_pool(bn: nn.Module, act: nn.Module, pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``pool(act(bn(x)))``: BN, ReLU and a 2x2 max-pool as one op where allowed, which never writes the
    full-resolution BN and ReLU outputs."""
    if _is_bn_relu(bn, act) and _is_maxpool2x2(pool) and x.dim() == 4 and min(x.shape[2:]) >= 2:
        op = "batchnorm_relu_maxpool2x2" if _uses_batch_stats(bn) else "affine_relu_maxpool2x2"
        if ops.should_fuse(op, x, bn, act, pool):
            return _batchnorm_then(bn, x, ops.batchnorm_relu_maxpool2x2, ops.affine_relu_maxpool2x2)
    return pool(act(bn(x)))


def conv_norm_act_pool(conv: nn.Module, bn: nn.Module, act: nn.Module, pool: nn.Module,
                       x: torch.Tensor) -> torch.Tensor:
    """``pool(act(bn(conv(x))))``, SAN's stem: one op that writes only the pooled map where allowed, with the BN's
    batch statistics (training, a conv without bias) or its running ones; else the conv, then BN, ReLU and the
    pool (:func:`norm_act_pool`)."""
    if (is_conv1x1(conv) and _is_bn_relu(bn, act) and _is_maxpool2x2(pool) and x.dim() == 4
            and min(x.shape[2:]) >= 2):
        if not _uses_batch_stats(bn):
            if ops.should_fuse("conv1x1_affine_relu_maxpool2x2", x, conv, bn, act, pool, in_channels=conv.in_channels):
                scale, shift = batchnorm_affine(bn)
                if conv.bias is not None:
                    shift = shift + scale * conv.bias
                return ops.conv1x1_affine_relu_maxpool2x2(x, conv.weight.flatten(1), scale, shift)
        elif conv.bias is None and ops.should_fuse("conv1x1_batchnorm_relu_maxpool2x2", x, conv, bn, act, pool,
                                                   in_channels=conv.in_channels):
            y, mean, var = ops.conv1x1_batchnorm_relu_maxpool2x2(x, conv.weight.flatten(1), bn.weight, bn.bias, bn.eps)
            update_running_stats(bn, mean, var, x.shape[0] * x.shape[2] * x.shape[3])
            return y
    return norm_act_pool(bn, act, pool, conv(x))


def run_mapping(gamma: nn.Sequential, z: torch.Tensor) -> torch.Tensor:
    """``gamma(z)`` for a mapping built by :func:`torchsan.layers.build_mapping`, z (N, C, K, L), with each
    BN-ReLU-conv1x1 triple as one op where allowed."""
    i = 0
    while i < len(gamma):
        if i + 2 < len(gamma) and isinstance(gamma[i], nn.BatchNorm2d):
            z = norm_act_conv(gamma[i], gamma[i + 1], gamma[i + 2], z)
            i += 3
        else:
            z = gamma[i](z)
            i += 1
    return z


def _norm_args(bn: nn.BatchNorm2d) -> tuple:
    """A BN as ``ops.pairwise_logits`` takes it: (weight, bias, eps, running_mean, running_var), the running
    statistics None where it normalises with the batch's."""
    running = (None, None) if _uses_batch_stats(bn) else (bn.running_mean, bn.running_var)
    return bn.weight, bn.bias, bn.eps, *running


def _is_pairwise_gamma(gamma: nn.Sequential) -> bool:
    """gamma is BN-ReLU-conv1x1-BN-ReLU-conv1x1, the first conv without bias (the authors' ``R-L-R-L``)."""
    return (len(gamma) == 6 and _is_bn_relu(gamma[0], gamma[1]) and _is_bn_relu(gamma[3], gamma[4])
            and is_conv1x1(gamma[2]) and gamma[2].bias is None and is_conv1x1(gamma[5]))


def subtraction2_mapping(subtraction2: nn.Module, gamma: nn.Sequential, q: torch.Tensor, k: torch.Tensor,
                         p: torch.Tensor | None) -> torch.Tensor:
    """``gamma(z)`` with z = [q_i - k_j, p_i - p_j] (N, C + 2, K, L): the pairwise subtraction relation, its position
    encoding p (1, 2, K, L) appended (or None). Where allowed, the whole of gamma runs as one op that writes only
    its output (``pairwise_logits``); else z is gathered straight into gamma's first training-mode BN-ReLU-conv1x1
    and never written; else written in one pass; else subtraction2, then torch.cat."""
    if _is_pairwise_gamma(gamma) and ops.should_fuse(
            "pairwise_logits", q, subtraction2, *gamma,
            batch_statistics=_uses_batch_stats(gamma[0]) or _uses_batch_stats(gamma[3])):
        bn1, _, conv1, bn2, _, conv2 = gamma
        logits, mean1, var1, mean2, var2 = ops.pairwise_logits(
            q, k, _norm_args(bn1), conv1.weight.flatten(1), _norm_args(bn2), conv2.weight.flatten(1), conv2.bias,
            *subtraction2.args, append=p)
        count = logits.shape[0] * logits.shape[2] * logits.shape[3]
        for bn, mean, var in ((bn1, mean1, var1), (bn2, mean2, var2)):
            if mean is not None:
                update_running_stats(bn, mean, var, count)
        return logits
    bn, act, conv = (list(gamma[:3]) + [None] * 3)[:3]
    if (conv is not None and _is_bn_relu(bn, act) and is_conv1x1(conv) and _uses_batch_stats(bn)
            and ops.should_fuse("subtraction2_batchnorm_relu_conv1x1", q, subtraction2, bn, act, conv,
                                positions=math.prod(subtraction2.footprint.out_hw(q.shape[2], q.shape[3])),
                                in_channels=conv.in_channels, out_channels=conv.out_channels)):
        y, mean, var = ops.subtraction2_batchnorm_relu_conv1x1(q, k, bn.weight, bn.bias, bn.eps, conv.weight.flatten(1),
                                                               conv.bias, *subtraction2.args, append=p)
        update_running_stats(bn, mean, var, y.shape[0] * y.shape[2] * y.shape[3])
        return run_mapping(gamma[3:], y)
    if p is None:
        z = subtraction2(q, k)
    elif ops.should_fuse("subtraction2_append", q, subtraction2):
        z = subtraction2(q, k, append=p)
    else:
        z = torch.cat([subtraction2(q, k), p.expand(q.shape[0], -1, -1, -1)], dim=1)
    return run_mapping(gamma, z)


def _fuses_attention(op: str, relation: nn.Module, gamma: nn.Sequential, aggregation: nn.Module, q: torch.Tensor,
                     *modules: nn.Module) -> bool:
    """Whether a layer after its transforms runs as the one op ``op``: gamma BN-ReLU-conv1x1-BN-ReLU-conv1x1 with
    its BNs in eval mode, the relation's footprint the aggregation's, and the backend's rule for the shape."""
    if not (_is_pairwise_gamma(gamma) and relation.args == aggregation.args and q.dim() == 4):
        return False
    if _uses_batch_stats(gamma[0]) or _uses_batch_stats(gamma[3]):
        return False
    h_out, w_out = relation.footprint.out_hw(q.shape[2], q.shape[3])
    return ops.should_fuse(op, q, relation, *gamma, aggregation, *modules, batch_statistics=False,
                           stride=relation.footprint.stride, out_height=h_out, out_width=w_out)


def fuses_subtraction2_attention(subtraction2: nn.Module, gamma: nn.Sequential, softmax: nn.Module,
                                 aggregation: nn.Module, q: torch.Tensor) -> bool:
    """Whether the pairwise subtraction layer after its transforms, ``aggregation(v, softmax(gamma(z)))`` with z as in
    :func:`subtraction2_mapping`, runs as one op (:func:`subtraction2_attention`)."""
    return (type(softmax) is nn.Softmax and softmax.dim == 2
            and _fuses_attention("pairwise_attention", subtraction2, gamma, aggregation, q, softmax))


def subtraction2_attention(subtraction2: nn.Module, gamma: nn.Sequential, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """``aggregation(v, softmax(gamma(z)))`` as one op (``ops.pairwise_attention``), where
    :func:`fuses_subtraction2_attention` allows it: q, k (N, C, H, W), v (N, Cv, H, W), p (1, 2, K, L) or None."""
    bn1, _, conv1, bn2, _, conv2 = gamma
    return ops.pairwise_attention(q, k, v, _norm_args(bn1), conv1.weight.flatten(1), _norm_args(bn2),
                                  conv2.weight.flatten(1), conv2.bias, *subtraction2.args, append=p)


def fuses_patchwise_concat_attention(centre: nn.Module, unfold: nn.Module, gamma: nn.Sequential,
                                     aggregation: nn.Module, q: torch.Tensor) -> bool:
    """Whether the patchwise concatenation layer after its transforms, ``aggregation(v, gamma(z))`` with z as in
    :func:`patchwise_concat_mapping`, runs as one op (:func:`patchwise_concat_attention`)."""
    return centre.args == unfold.args and _fuses_attention("patchwise_attention", unfold, gamma, aggregation, q, centre)


def patchwise_concat_attention(unfold: nn.Module, gamma: nn.Sequential, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor) -> torch.Tensor:
    """``aggregation(v, gamma(z))`` as one op (``ops.patchwise_attention``), where
    :func:`fuses_patchwise_concat_attention` allows it: q, k (N, C, H, W), v (N, Cv, H, W)."""
    bn1, _, conv1, bn2, _, conv2 = gamma
    return ops.patchwise_attention(q, k, v, _norm_args(bn1), conv1.weight.flatten(1), _norm_args(bn2),
                                   conv2.weight.flatten(1), conv2.bias, *unfold.args)


def patchwise_concat_mapping(centre: nn.Module, unfold: nn.Module, gamma: nn.Sequential, q: torch.Tensor,
                             k: torch.Tensor) -> torch.Tensor:
    """``gamma(z)`` with z = [centre(q), unfold(k)] (N, C (K + 1), 1, L), the patchwise concatenation relation (k's
    neighbours channel-major, c * K + k). Where allowed the whole of gamma runs as one op that gathers z's rows where
    it needs them and writes only its output (``patchwise_weights``); else z is written and gamma runs module by
    module."""
    if _is_pairwise_gamma(gamma) and ops.should_fuse(
            "patchwise_weights", q, centre, unfold, *gamma,
            batch_statistics=_uses_batch_stats(gamma[0]) or _uses_batch_stats(gamma[3])):
        bn1, _, conv1, bn2, _, conv2 = gamma
        w, mean1, var1, mean2, var2 = ops.patchwise_weights(
            q, k, _norm_args(bn1), conv1.weight.flatten(1), _norm_args(bn2), conv2.weight.flatten(1), conv2.bias,
            *unfold.args)
        count = w.shape[0] * w.shape[3]
        for bn, mean, var in ((bn1, mean1, var1), (bn2, mean2, var2)):
            if mean is not None:
                update_running_stats(bn, mean, var, count)
        return w
    n, c = q.shape[:2]
    kj = unfold(k)  # (N, C, K, L); every size spelled out: with N = 0 a -1 is ambiguous
    return run_mapping(gamma, torch.cat([centre(q), kj.reshape(n, c * kj.shape[2], 1, kj.shape[3])], dim=1))


def softmax_aggregation(softmax: nn.Module, aggregation: nn.Module, v: torch.Tensor,
                        logits: torch.Tensor) -> torch.Tensor:
    """``aggregation(v, softmax(logits))``, the softmax over the footprint's K taps (dim 2): one op where allowed."""
    if type(softmax) is nn.Softmax and softmax.dim == 2:
        if ops.should_fuse("softmax_aggregation", v, softmax, aggregation):
            return ops.softmax_aggregation(v, logits, *aggregation.args)
        if ops.should_fuse("tap_softmax", logits, softmax):
            return aggregation(v, ops.tap_softmax(logits))
    return aggregation(v, softmax(logits))
