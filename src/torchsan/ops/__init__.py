"""Functional SAN operators (the authors' primitives), with backend dispatch.

Notation: x is (N, C, H, W); the footprint is the k x k window (K = k*k neighbours, indexed
k = kh * kernel_size + kw) around each output pixel, with dilation d and padding
``(d * (kernel_size - 1) + 1) // 2`` unless given; L = H_out * W_out. Padding is ``"reflect"``
(a single reflection, like ``nn.ReflectionPad2d``; needs padding < H and W) or ``"zeros"``.

All ops are differentiable. Validation happens here, before dispatch, so every backend rejects
bad input identically.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import _checks
from ._checks import PAD_MODES, Footprint, default_padding, resolve_footprint
from ._dispatch import available_backends, backend_for, get_backend, implementation, set_backend, use_backend
from ._fusion import FUSED_OPS, fusion, fusion_enabled, set_fusion, should_fuse

__all__ = [
    "FUSED_OPS",
    "PAD_MODES",
    "Footprint",
    "affine_relu_conv1x1",
    "affine_relu_maxpool2x2",
    "aggregation",
    "available_backends",
    "backend_for",
    "batchnorm_relu_conv1x1",
    "batchnorm_relu_maxpool2x2",
    "centre",
    "channel_var_mean",
    "clique_products",
    "conv1x1",
    "conv1x1_affine_relu_maxpool2x2",
    "conv1x1_batchnorm_relu_maxpool2x2",
    "default_padding",
    "fusion",
    "fusion_enabled",
    "get_backend",
    "output_size",
    "pairwise_attention",
    "pairwise_logits",
    "patchwise_attention",
    "patchwise_weights",
    "resolve_footprint",
    "set_backend",
    "set_fusion",
    "should_fuse",
    "softmax_aggregation",
    "subtraction",
    "subtraction2",
    "subtraction2_batchnorm_relu_conv1x1",
    "tap_softmax",
    "unfold",
    "use_backend",
]


def output_size(
    size: tuple[int, int],
    kernel_size: int,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
) -> tuple[int, int]:
    """(H_out, W_out) of any op here for an input of spatial ``size`` = (H, W)."""
    return resolve_footprint(kernel_size, stride, padding, dilation, "zeros").out_hw(*size)


def _autocast(*tensors: Any) -> tuple[Any, ...]:
    """Under ``torch.autocast``, bring the floating inputs of a multi-input op to the autocast dtype.

    Without this, autocast hands these ops a mix (bf16 activations from a convolution, fp32 weights
    from a softmax) that the dtype checks rightly refuse. Outside autocast: the inputs as they are.
    """
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return tensors  # (bad arguments are reported by the checks that follow)
    device = first.device.type
    # (cpu and cuda always have autocast; asking torch about others is not traceable by older torch.compile)
    available = device in ("cpu", "cuda") or torch.amp.is_autocast_available(device)
    if not available or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def aggregation(
    x: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """Weighted sum over the footprint, with weights shared across interleaved channels.

    ``y[n, c, o] = sum_k weight[n, c % Cw, k, o] * x[n, c, nbr_k(o)]``

    Args:
        x: (N, C, H, W) values (beta(x) in the paper).
        weight: (N, Cw, K, L) attention weights, C % Cw == 0, K = kernel_size**2.
    Returns:
        (N, C, H_out, W_out).
    """
    fp = resolve_footprint(kernel_size, stride, padding, dilation, pad_mode)
    x, weight = _autocast(x, weight)
    h_out, w_out = _checks.check_aggregation(x, weight, fp)
    return implementation(x).aggregation(x, weight, fp, h_out, w_out)


def softmax_aggregation(
    x: torch.Tensor,
    logits: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """``aggregation(x, softmax(logits, dim=2))``: the pairwise attention's normalisation and aggregation in one
    op. The ``cpu`` backend normalises each (K, L) plane of logits and aggregates with it while it is in cache
    (planes too large for the L2 cache get a separate softmax pass first), and fuses the softmax's backward into
    the aggregation's per plane.

    Args:
        x: (N, C, H, W) values; logits: (N, Cw, K, L), C % Cw == 0, K = kernel_size**2.
    Returns:
        (N, C, H_out, W_out).
    """
    fp = resolve_footprint(kernel_size, stride, padding, dilation, pad_mode)
    x, logits = _autocast(x, logits)
    h_out, w_out = _checks.check_aggregation(x, logits, fp)
    return implementation(x).softmax_aggregation(x, logits, fp, h_out, w_out)


def subtraction(
    x: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """Centre minus neighbour: ``out[n, c, k, o] = x[n, c, centre(o)] - x[n, c, nbr_k(o)]``.

    Used on the position-encoding grid (p_i - p_j). x: (N, C, H, W) -> (N, C, K, L).
    """
    fp = resolve_footprint(kernel_size, stride, padding, dilation, pad_mode)
    _checks.check_feature_map("x", x)
    h_out, w_out = _checks.check_fits(fp, x.shape[2], x.shape[3], x=x)
    return implementation(x).subtraction(x, fp, h_out, w_out)


def subtraction2(
    x1: torch.Tensor,
    x2: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    pad_mode: str = "reflect",
    *,
    append: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[n, c, k, o] = x1[n, c, centre(o)] - x2[n, c, nbr_k(o)]`` (phi(x_i) - psi(x_j)).

    x1, x2: (N, C, H, W) of the same shape -> (N, C, K, L).
    append: optional (1 or N, E, K, L), concatenated after the C difference channels -> (N, C + E, K, L), in the
    same pass (the pairwise position encoding p_i - p_j; a batch of 1 is broadcast over N). Same result as
    ``torch.cat([subtraction2(x1, x2), append.expand(N, -1, -1, -1)], 1)``.
    """
    fp = resolve_footprint(kernel_size, stride, padding, dilation, pad_mode)
    if append is None:
        x1, x2 = _autocast(x1, x2)
    else:
        x1, x2, append = _autocast(x1, x2, append)
    h_out, w_out = _checks.check_subtraction2(x1, x2, fp)
    if append is not None:
        _checks.check_append(append, x1, fp.area, h_out * w_out)
    return implementation(x1).subtraction2(x1, x2, fp, h_out, w_out, append=append)


def clique_products(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The patchwise clique relation's products of every pair of taps of each footprint:
    ``out[n, j, k, l] = sum_c q[n, c, j, l] * k[n, c, k, l]``.

    Args:
        q, k: (N, C, K, L), the unfolded phi(x) and psi(x) (:func:`unfold`).
    Returns:
        (N, K, K, L), contiguous (read as gamma's (N, K * K, 1, L) input without a copy).
    """
    q, k = _autocast(q, k)
    _checks.check_feature_map("q", q)
    _checks.check_feature_map("k", k)
    _checks.check_same_kind("q", q, "k", k)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (N, C, K, L), got {tuple(q.shape)} and {tuple(k.shape)}")
    return implementation(q).clique_products(q, k)


def unfold(
    x: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """The footprint's neighbours: ``out[n, c, k, o] = x[n, c, nbr_k(o)]``, (N, C, K, L).

    The patch gather of patchwise attention (psi(x_j) for all j in R(i)).
    """
    fp = resolve_footprint(kernel_size, stride, padding, dilation, pad_mode)
    _checks.check_feature_map("x", x)
    _checks.check_fits(fp, x.shape[2], x.shape[3], x=x)
    return implementation(x).unfold(x, fp)


def centre(
    x: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """The centre pixel of each output position's footprint: (N, C, H, W) -> (N, C, 1, L)."""
    fp = resolve_footprint(kernel_size, stride, padding, dilation, pad_mode)
    _checks.check_feature_map("x", x)
    h_out, w_out = _checks.check_fits(fp, x.shape[2], x.shape[3])
    return implementation(x).centre(x, fp, h_out, w_out)


def channel_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel biased variance and mean, as ``torch.var_mean(x, dim=[0, 2, ...], correction=0)``:
    the batch statistics of a training-mode BatchNorm (the mapping gamma's).

    The ``cpu`` backend computes them in one parallel pass of exact per-chunk two-pass statistics,
    merged in a fixed order (deterministic for any thread count, no E[x^2] - E[x]^2 cancellation);
    its backward is one pass too.

    Args:
        x: (N, C, *spatial) with at least one value per channel.
    Returns:
        (var, mean), each (C,).
    """
    _checks.check_tensor("x", x, min_dim=2)
    if x.numel() == 0:
        raise ValueError(f"channel_var_mean needs at least one value per channel, got shape {tuple(x.shape)}")
    return implementation(x).channel_var_mean(x)


def tap_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the K footprint taps: ``torch.softmax(x, dim=2)`` for x (N, C, K, L), the pairwise
    attention's normalisation of gamma's output. The ``cpu`` kernel makes one pass over x per block of
    positions; in float32 its exp is a polynomial (error bound in ``csrc/cpu``) and results below 1e-38 flush to 0.
    """
    _checks.check_feature_map("x", x)
    return implementation(x).tap_softmax(x)


def affine_relu_conv1x1(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``weight @ relu(scale * x + shift) + bias (+ residual)`` at every position: a BatchNorm given as its
    per-channel affine map (an eval-mode BN: scale = weight / sqrt(running_var + eps), shift = bias - running_mean *
    scale), ReLU and a 1x1 convolution in one op, and a residual block's shortcut added to its output. The ``cpu``
    kernel never writes the BN and ReLU outputs, and adds the residual as it stores the output where no gradient is
    wanted.

    Args:
        x: (N, Cin, *spatial); scale, shift: (Cin,); weight: (Cout, Cin); bias: (Cout,) or None;
        residual: (N, Cout, *spatial) or None.
    Returns:
        (N, Cout, *spatial).
    """
    _checks.check_tensor("x", x, min_dim=2)
    x, scale, shift, weight, bias, residual = _autocast(x, scale, shift, weight, bias, residual)
    _checks.check_channel_vectors(x, x.shape[1], scale=scale, shift=shift)
    _checks.check_conv1x1("x", x, x.shape[1], weight, bias, "weight", "bias")
    if residual is not None:
        _checks.check_residual(residual, x, (x.shape[0], weight.shape[0], *x.shape[2:]))
    return implementation(x).affine_relu_conv1x1(x, scale, shift, weight, bias, residual)


def batchnorm_relu_conv1x1(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training-mode BatchNorm (normalised with the batch's own statistics), ReLU and a 1x1 convolution in one op.

    ``y = conv_weight @ relu((x - mean) / sqrt(var + eps) * weight + bias) + conv_bias`` at every position, with
    mean and biased var over every dimension but 1. Gradients flow through the statistics, as in
    ``nn.BatchNorm2d`` in training mode; the running statistics are the caller's to update (from the returned mean
    and var).

    Args:
        x: (N, Cin, *spatial); weight, bias: (Cin,) or None; conv_weight: (Cout, Cin); conv_bias: (Cout,) or None.
    Returns:
        y (N, Cout, *spatial), mean (Cin,), var (Cin,) (biased).
    """
    _checks.check_tensor("x", x, min_dim=2)
    x, weight, bias, conv_weight, conv_bias = _autocast(x, weight, bias, conv_weight, conv_bias)
    _checks.check_batchnorm(x, weight, bias, eps)
    _checks.check_conv1x1("x", x, x.shape[1], conv_weight, conv_bias)
    return implementation(x).batchnorm_relu_conv1x1(x, weight, bias, float(eps), conv_weight, conv_bias)


def subtraction2_batchnorm_relu_conv1x1(
    x1: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None = None,
    kernel_size: int = 7,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    pad_mode: str = "reflect",
    *,
    append: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`batchnorm_relu_conv1x1` of ``z = subtraction2(x1, x2, ..., append=append)`` in one op.

    The pairwise mapping gamma's first BN-ReLU-conv1x1 on z = [phi(x_i) - psi(x_j), p_i - p_j]. The ``cpu`` backend
    never writes z (K times the size of x1): its statistics, the fused triple and their backward gather z's values
    from x1, x2 and append as they go, and z is not kept for backward.

    Args:
        x1, x2: (N, C, H, W); append: (1 or N, E, K, L) or None; weight, bias: (C + E,) or None (the BN's affine
            parameters); conv_weight: (Cout, C + E); conv_bias: (Cout,) or None; the footprint: as in
            :func:`subtraction2`.
    Returns:
        y (N, Cout, K, L), mean (C + E,), var (C + E,) (biased; the batch statistics of z).
    """
    fp = resolve_footprint(kernel_size, stride, padding, dilation, pad_mode)
    x1, x2, append, weight, bias, conv_weight, conv_bias = _autocast(x1, x2, append, weight, bias, conv_weight,
                                                                     conv_bias)
    h_out, w_out = _checks.check_subtraction2(x1, x2, fp)
    c = x1.shape[1]
    if append is not None:
        _checks.check_append(append, x1, fp.area, h_out * w_out)
        c += append.shape[1]
    # The checks of batchnorm_relu_conv1x1, on z's shape (without building z).
    _checks.check_batchnorm(x1, weight, bias, eps, shape=(x1.shape[0], c, fp.area, h_out * w_out))
    _checks.check_conv1x1("x1", x1, c, conv_weight, conv_bias)
    return implementation(x1).subtraction2_batchnorm_relu_conv1x1(x1, x2, append, weight, bias, float(eps),
                                                                  conv_weight, conv_bias, fp)


def _check_mapping(x1: torch.Tensor, x2: torch.Tensor, append: torch.Tensor | None, norm1: object,
                   conv1_weight: torch.Tensor, norm2: object, conv2_weight: torch.Tensor,
                   conv2_bias: torch.Tensor | None, fp: Footprint, patchwise: bool = False) -> tuple[tuple, tuple]:
    """Validate the operands of a whole mapping gamma on the pairwise z = [x1_i - x2_j, append] (N, C + E, K, L) or
    the patchwise z = [x1_i, x2_j for j in R(i)] (N, C (K + 1), 1, L); return the norms as tuples."""
    h_out, w_out = _checks.check_subtraction2(x1, x2, fp)
    c = x1.shape[1] * (fp.area + 1) if patchwise else x1.shape[1]
    if append is not None:
        _checks.check_append(append, x1, fp.area, h_out * w_out)
        c += append.shape[1]
    _checks.check_conv1x1("x1", x1, c, conv1_weight, None, "conv1_weight")
    _checks.check_conv1x1("x1", x1, conv1_weight.shape[0], conv2_weight, conv2_bias, "conv2_weight", "conv2_bias")
    shape = (x1.shape[0], c, 1 if patchwise else fp.area, h_out * w_out)
    norm1 = _checks.check_norm("norm1", x1, norm1, shape)
    norm2 = _checks.check_norm("norm2", x1, norm2, (shape[0], conv1_weight.shape[0], *shape[2:]))
    return norm1, norm2


def pairwise_logits(
    x1: torch.Tensor,
    x2: torch.Tensor,
    norm1: tuple[Any, ...],
    conv1_weight: torch.Tensor,
    norm2: tuple[Any, ...],
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor | None = None,
    kernel_size: int = 7,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    pad_mode: str = "reflect",
    *,
    append: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The pairwise attention's logits: the mapping gamma = BN-ReLU-conv1x1-BN-ReLU-conv1x1 (the authors'
    ``R-L-R-L``) of z = [x1_i - x2_j, append] = ``subtraction2(x1, x2, ..., append=append)``, as one op.

    The ``triton`` backend never writes z or gamma's activations, all (N, C', K, L): it recomputes them from x1, x2
    and append in each pass, forward and backward (two statistics passes, one that writes the logits; three in the
    backward). The other backends run the composition.

    Args:
        x1, x2: (N, C, H, W); append: (1 or N, E, K, L) or None.
        norm1, norm2: each BN as ``(weight, bias, eps, running_mean, running_var)``, weight and bias (Cin,) or None.
            running_mean None: batch statistics (training mode), returned; else the running ones are applied.
        conv1_weight: (Cm, C + E); conv2_weight: (Cw, Cm); conv2_bias: (Cw,) or None.
        kernel_size, stride, padding, dilation, pad_mode: the footprint, as in :func:`subtraction2`.
    Returns:
        logits (N, Cw, K, L), then BN1's and BN2's batch (mean, biased var), each None for a BN given running ones.
    """
    fp = resolve_footprint(kernel_size, stride, padding, dilation, pad_mode)
    x1, x2, append, conv1_weight, conv2_weight, conv2_bias = _autocast(x1, x2, append, conv1_weight, conv2_weight,
                                                                       conv2_bias)
    norm1, norm2 = _check_mapping(x1, x2, append, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp)
    return implementation(x1).pairwise_logits(x1, x2, append, norm1, conv1_weight, norm2, conv2_weight, conv2_bias,
                                              fp)


def _check_values(x1: torch.Tensor, values: torch.Tensor, weight_channels: int) -> None:
    """The attention ops' values: (N, Cv, H, W) like x1, Cv a multiple of the weight channels."""
    _checks.check_feature_map("values", values)
    _checks.check_same_kind("x1", x1, "values", values)
    if (values.shape[0] != x1.shape[0] or values.shape[2:] != x1.shape[2:] or weight_channels < 1
            or values.shape[1] % weight_channels):
        raise ValueError(f"values must be (N, Cv, H, W) with x1's N, H and W and Cv divisible by the "
                         f"{weight_channels} weight channels, got {tuple(values.shape)} for x1 {tuple(x1.shape)}")


def pairwise_attention(
    x1: torch.Tensor,
    x2: torch.Tensor,
    values: torch.Tensor,
    norm1: tuple[Any, ...],
    conv1_weight: torch.Tensor,
    norm2: tuple[Any, ...],
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor | None = None,
    kernel_size: int = 7,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    pad_mode: str = "reflect",
    *,
    append: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pairwise layer after its transforms, for inference: ``softmax_aggregation(values, logits)`` with the
    logits of :func:`pairwise_logits`, both BNs applying their running statistics.

    The ``cpu`` backend's inference kernel (no gradient, stride 1, output rows of at most 256 positions) computes
    the logits of a block of output rows tap by tap into a per-thread buffer, normalises them and aggregates with
    them there: neither z, gamma's hidden layer nor the (N, Cw, K, L) logits are written. Otherwise, and on the
    other backends, the composition.

    Args:
        x1, x2: (N, C, H, W) (phi(x), psi(x)); values: (N, Cv, H, W) (beta(x)), Cv % Cw == 0; append: (1 or N, E, K,
            L) or None.
        norm1, norm2: each BN as ``(weight, bias, eps, running_mean, running_var)``, the running statistics given.
        conv1_weight: (Cm, C + E); conv2_weight: (Cw, Cm); conv2_bias: (Cw,) or None.
        kernel_size, stride, padding, dilation, pad_mode: the footprint, as in :func:`subtraction2`.
    Returns:
        (N, Cv, H_out, W_out).
    """
    fp = resolve_footprint(kernel_size, stride, padding, dilation, pad_mode)
    x1, x2, values, append, conv1_weight, conv2_weight, conv2_bias = _autocast(
        x1, x2, values, append, conv1_weight, conv2_weight, conv2_bias)
    norm1, norm2 = _check_mapping(x1, x2, append, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp)
    if norm1[3] is None or norm2[3] is None:
        raise ValueError("pairwise_attention applies the BNs' running statistics (inference); with batch statistics "
                         "use pairwise_logits, then softmax_aggregation")
    _check_values(x1, values, conv2_weight.shape[0])
    return implementation(x1).pairwise_attention(x1, x2, values, append, norm1, conv1_weight, norm2, conv2_weight,
                                                 conv2_bias, fp)


def patchwise_weights(
    x1: torch.Tensor,
    x2: torch.Tensor,
    norm1: tuple[Any, ...],
    conv1_weight: torch.Tensor,
    norm2: tuple[Any, ...],
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor | None = None,
    kernel_size: int = 7,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    pad_mode: str = "reflect",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The patchwise attention's weights from its concatenation relation: the mapping gamma =
    BN-ReLU-conv1x1-BN-ReLU-conv1x1 (the authors' ``R-L-R-L``) of z = [x1_i, x2_j for j in R(i)], as one op.

    z is ``torch.cat([centre(x1), unfold(x2).reshape(N, C * K, 1, L)], 1)``, (N, C (K + 1), 1, L), channel
    C + c * K + k the k-th neighbour of channel c. The ``cpu`` backend's inference kernel (running statistics, no
    gradient) gathers z's rows where it needs them and writes neither z nor gamma's hidden layer; otherwise, and on
    the other backends, the composition.

    Args:
        x1, x2: (N, C, H, W).
        norm1, norm2: each BN as ``(weight, bias, eps, running_mean, running_var)``, as in :func:`pairwise_logits`.
        conv1_weight: (Cm, C (K + 1)); conv2_weight: (Cout, Cm); conv2_bias: (Cout,) or None.
        kernel_size, stride, padding, dilation, pad_mode: the footprint, as in :func:`unfold`.
    Returns:
        weights (N, Cout, 1, L), then BN1's and BN2's batch (mean, biased var), each None for a BN given running ones.
    """
    fp = resolve_footprint(kernel_size, stride, padding, dilation, pad_mode)
    x1, x2, conv1_weight, conv2_weight, conv2_bias = _autocast(x1, x2, conv1_weight, conv2_weight, conv2_bias)
    norm1, norm2 = _check_mapping(x1, x2, None, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp,
                                  patchwise=True)
    return implementation(x1).patchwise_weights(x1, x2, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp)


def patchwise_attention(
    x1: torch.Tensor,
    x2: torch.Tensor,
    values: torch.Tensor,
    norm1: tuple[Any, ...],
    conv1_weight: torch.Tensor,
    norm2: tuple[Any, ...],
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor | None = None,
    kernel_size: int = 7,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """The patchwise layer (concatenation relation) after its transforms, for inference: ``aggregation(values,
    weights)`` with the weights of :func:`patchwise_weights` read as (N, Cout / K, K, L), both BNs applying their
    running statistics.

    The ``cpu`` backend's inference kernel (no gradient, stride 1, output rows of at most 256 positions) computes
    the weights of a block of output rows into a per-thread buffer and aggregates with them there: neither z,
    gamma's hidden layer nor the weights are written. Otherwise, and on the other backends, the composition.

    Args:
        x1, x2: (N, C, H, W) (phi(x), psi(x)); values: (N, Cv, H, W) (beta(x)), Cv % (Cout / K) == 0.
        norm1, norm2: each BN as ``(weight, bias, eps, running_mean, running_var)``, the running statistics given.
        conv1_weight: (Cm, C (K + 1)); conv2_weight: (Cout, Cm), Cout % K == 0; conv2_bias: (Cout,) or None.
        kernel_size, stride, padding, dilation, pad_mode: the footprint, as in :func:`unfold`.
    Returns:
        (N, Cv, H_out, W_out).
    """
    fp = resolve_footprint(kernel_size, stride, padding, dilation, pad_mode)
    x1, x2, values, conv1_weight, conv2_weight, conv2_bias = _autocast(x1, x2, values, conv1_weight, conv2_weight,
                                                                       conv2_bias)
    norm1, norm2 = _check_mapping(x1, x2, None, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp,
                                  patchwise=True)
    if norm1[3] is None or norm2[3] is None:
        raise ValueError("patchwise_attention applies the BNs' running statistics (inference); with batch "
                         "statistics use patchwise_weights, then aggregation")
    if conv2_weight.shape[0] % fp.area:
        raise ValueError(f"conv2_weight's {conv2_weight.shape[0]} outputs must be a multiple of K = {fp.area}")
    _check_values(x1, values, conv2_weight.shape[0] // fp.area)
    return implementation(x1).patchwise_attention(x1, x2, values, norm1, conv1_weight, norm2, conv2_weight,
                                                  conv2_bias, fp)


def affine_relu_maxpool2x2(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(relu(scale * x + shift), 2, 2)``: a BatchNorm given as its per-channel affine map (eval mode),
    ReLU and a 2x2 stride-2 max-pool (floor mode) in one op, as at every SAN stage boundary. The ``cpu`` kernel
    writes only the pooled output; ties and NaN follow ``torch.nn.functional.max_pool2d``.

    Args:
        x: (N, C, H, W), H, W >= 2; scale, shift: (C,).
    Returns:
        (N, C, H // 2, W // 2).
    """
    _checks.check_feature_map("x", x)
    x, scale, shift = _autocast(x, scale, shift)
    _checks.check_channel_vectors(x, x.shape[1], scale=scale, shift=shift)
    _checks.check_pool2x2(x)
    return implementation(x).affine_relu_maxpool2x2(x, scale, shift)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight @ x + bias`` at every position: a plain 1x1 convolution. The ``cpu`` backend runs it with the
    register-blocked product of :func:`affine_relu_conv1x1` where no gradient is wanted (the layers call it for
    inference on narrow inputs over large maps, where that beats the BLAS), else as the reference does.

    Args:
        x: (N, Cin, *spatial); weight: (Cout, Cin); bias: (Cout,) or None.
    Returns:
        (N, Cout, *spatial).
    """
    _checks.check_tensor("x", x, min_dim=2)
    x, weight, bias = _autocast(x, weight, bias)
    _checks.check_conv1x1("x", x, x.shape[1], weight, bias, "weight", "bias")
    return implementation(x).conv1x1(x, weight, bias)


def conv1x1_affine_relu_maxpool2x2(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                   shift: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(relu(scale * conv1x1(x, weight) + shift), 2, 2)``: a 1x1 convolution without bias, an eval-mode
    BatchNorm as its affine map, ReLU and a 2x2 stride-2 max-pool (floor mode): SAN's stem, for inference (in
    training, :func:`conv1x1_batchnorm_relu_maxpool2x2`). The ``cpu`` kernels write only the pooled output, and the
    backward only the gradients, never the full-resolution convolution.

    Args:
        x: (N, Cin, H, W), H, W >= 2; weight: (C, Cin); scale, shift: (C,).
    Returns:
        (N, C, H // 2, W // 2).
    """
    _checks.check_feature_map("x", x)
    x, weight, scale, shift = _autocast(x, weight, scale, shift)
    _checks.check_conv1x1("x", x, x.shape[1], weight, None, "weight")
    _check_per_output_channel(x, weight, scale=scale, shift=shift)
    _checks.check_pool2x2(x)
    return implementation(x).conv1x1_affine_relu_maxpool2x2(x, weight, scale, shift)


def batchnorm_relu_maxpool2x2(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training-mode BatchNorm (batch statistics), ReLU and 2x2 stride-2 max-pool in one op.

    :func:`affine_relu_maxpool2x2` with the BN's scale and shift computed from the batch statistics of x, and
    gradients through them. Returns y (N, C, H // 2, W // 2), mean (C,), var (C,) (biased).
    """
    _checks.check_feature_map("x", x)
    x, weight, bias = _autocast(x, weight, bias)
    _checks.check_batchnorm(x, weight, bias, eps)
    _checks.check_pool2x2(x)
    return implementation(x).batchnorm_relu_maxpool2x2(x, weight, bias, float(eps))


def _check_per_output_channel(x: torch.Tensor, conv_weight: torch.Tensor, **vectors: torch.Tensor | None) -> None:
    """A BN after a 1x1 convolution: its vectors (C,), one value per output channel of conv_weight (C, Cin)."""
    for name, t in vectors.items():
        if t is None:
            continue
        _checks.check_same_kind("x", x, name, t)
        if tuple(t.shape) != (conv_weight.shape[0],):
            raise ValueError(f"{name} must have shape ({conv_weight.shape[0]},), one value per output channel of the "
                             f"convolution, got {tuple(t.shape)}")


def conv1x1_batchnorm_relu_maxpool2x2(
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAN's stem in training: a 1x1 convolution without bias, a training-mode BatchNorm (the batch statistics of
    the convolution's output), ReLU and a 2x2 stride-2 max-pool (floor mode) in one op, gradients through the
    statistics. The ``cpu`` backend takes the statistics from x's mean and covariance (Cin values and Cin x Cin,
    an image's 3 and 3 x 3) and writes the full-resolution convolution neither forward nor backward.

    Args:
        x: (N, Cin, H, W), H, W >= 2; conv_weight: (C, Cin); weight, bias: the BN's (C,) or None; eps > 0.
    Returns:
        y (N, C, H // 2, W // 2), mean (C,), var (C,) (biased) of the convolution's output.
    """
    _checks.check_feature_map("x", x)
    x, conv_weight, weight, bias = _autocast(x, conv_weight, weight, bias)
    _checks.check_conv1x1("x", x, x.shape[1], conv_weight, None, "conv_weight")
    _check_per_output_channel(x, conv_weight, weight=weight, bias=bias)
    _checks.check_batchnorm(x, weight, bias, eps, (x.shape[0], conv_weight.shape[0], *x.shape[2:]))
    _checks.check_pool2x2(x)
    return implementation(x).conv1x1_batchnorm_relu_maxpool2x2(x, conv_weight, weight, bias, float(eps))


# --- deprecated names (one release) -----------------------------------------------------------------------------------
def _deprecated(old: str, new: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(new)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(f"torchsan.ops.{old} is deprecated; use torchsan.ops.{new.__name__}", DeprecationWarning,
                      stacklevel=2)
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    return alias


bn_relu_conv = _deprecated("bn_relu_conv", affine_relu_conv1x1)
batchnorm_relu_conv = _deprecated("batchnorm_relu_conv", batchnorm_relu_conv1x1)
bn_relu_maxpool = _deprecated("bn_relu_maxpool", affine_relu_maxpool2x2)
batchnorm_relu_maxpool = _deprecated("batchnorm_relu_maxpool", batchnorm_relu_maxpool2x2)
subtraction2_batchnorm_relu_conv = _deprecated("subtraction2_batchnorm_relu_conv",
                                               subtraction2_batchnorm_relu_conv1x1)
