"""Functional SAN operators (the authors' primitives), with backend dispatch.

Notation: x is (N, C, H, W); the footprint is the k x k window (K = k*k neighbours, indexed
k = kh * kernel_size + kw) around each output pixel, with dilation d and padding
``(d * (kernel_size - 1) + 1) // 2`` unless given; L = H_out * W_out. Padding is ``"reflect"``
(a single reflection, like ``nn.ReflectionPad2d``; needs padding < H and W) or ``"zeros"``.

All ops are differentiable. Validation happens here, before dispatch, so every backend rejects
bad input identically.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import _checks
from ._checks import PAD_MODES, Footprint, default_padding, resolve_footprint
from ._dispatch import available_backends, backend_for, get_backend, implementation, set_backend, use_backend

__all__ = [
    "PAD_MODES",
    "Footprint",
    "aggregation",
    "available_backends",
    "batchnorm_relu_conv",
    "batchnorm_relu_maxpool",
    "backend_for",
    "bn_relu_conv",
    "bn_relu_maxpool",
    "centre",
    "channel_var_mean",
    "default_padding",
    "get_backend",
    "output_size",
    "resolve_footprint",
    "set_backend",
    "softmax_aggregation",
    "subtraction",
    "subtraction2",
    "subtraction2_batchnorm_relu_conv",
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
    fp = resolve_footprint(kernel_size, stride, padding, dilation, "zeros")
    return fp.out_size(size[0]), fp.out_size(size[1])


def _autocast(*tensors: Any) -> tuple[Any, ...]:
    """Under ``torch.autocast``, bring the floating inputs of a multi-input op to the autocast dtype.

    Without this, autocast hands these ops a mix (bf16 activations from a convolution, fp32 weights
    from a softmax) that the dtype checks rightly refuse. Outside autocast: the inputs as they are.
    """
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors  # (bad arguments are reported by the checks that follow)
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
    (planes over 256 KB, which do not fit, get a separate softmax pass first), and fuses the softmax's backward
    into the aggregation's per plane.

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
    h_out, w_out = _checks.check_fits(fp, x.shape[2], x.shape[3])
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
        _checks.check_append(append, x1, fp.kernel_size**2, h_out * w_out)
    return implementation(x1).subtraction2(x1, x2, fp, h_out, w_out, append=append)


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
    _checks.check_fits(fp, x.shape[2], x.shape[3])
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


def bn_relu_conv(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``weight @ relu(scale * x + shift) + bias`` at every position: BN (as its per-channel affine map),
    ReLU and a 1x1 convolution in one op, the building block of the mapping gamma.

    Args:
        x: (N, Cin, *spatial); scale, shift: (Cin,); weight: (Cout, Cin); bias: (Cout,) or None.
    Returns:
        (N, Cout, *spatial).
    """
    _checks.check_tensor("x", x, min_dim=2)
    x, scale, shift, weight, bias = _autocast(x, scale, shift, weight, bias)
    c_in = x.shape[1]
    for name, t, shape in (("scale", scale, (c_in,)), ("shift", shift, (c_in,)),
                           ("weight", weight, (weight.shape[0] if weight.dim() == 2 else -1, c_in))):
        _checks.check_same_kind("x", x, name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x with {c_in} channels, got {tuple(t.shape)}")
    if bias is not None:
        _checks.check_same_kind("x", x, "bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return implementation(x).bn_relu_conv(x, scale, shift, weight, bias)


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
    positions (float32 exp by polynomial, relative error about 3e-7; results below 1e-38 flush to 0).
    """
    _checks.check_feature_map("x", x)
    return implementation(x).tap_softmax(x)


def bn_relu_maxpool(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(relu(scale * x + shift), 2, 2)``: BN (as its per-channel affine map), ReLU and a 2x2
    stride-2 max-pool (floor mode) in one op, as at every SAN stage boundary. The fused ``cpu`` kernel
    writes only the pooled output; ties and NaN follow ``torch.nn.functional.max_pool2d``.

    Args:
        x: (N, C, H, W), H, W >= 2; scale, shift: (C,).
    Returns:
        (N, C, H // 2, W // 2).
    """
    _checks.check_feature_map("x", x)
    x, scale, shift = _autocast(x, scale, shift)
    c = x.shape[1]
    for name, t in (("scale", scale), ("shift", shift)):
        _checks.check_same_kind("x", x, name, t)
        if tuple(t.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},) for x with {c} channels, got {tuple(t.shape)}")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"a 2x2 max-pool needs at least 2x2 pixels, got x of shape {tuple(x.shape)}")
    return implementation(x).bn_relu_maxpool(x, scale, shift)


def _check_batchnorm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                     shape: tuple[int, ...] | None = None) -> None:
    """A training BN's parameters for input x (or, with ``shape``, an input of that shape and x's kind)."""
    shape = tuple(x.shape) if shape is None else shape
    c = shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _checks.check_same_kind("x", x, name, t)
            if tuple(t.shape) != (c,):
                raise ValueError(f"{name} must have shape ({c},) for x with {c} channels, got {tuple(t.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    if math.prod(shape) // max(1, c) < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")


def _check_conv1x1(name: str, x: torch.Tensor, c_in: int, conv_weight: torch.Tensor,
                   conv_bias: torch.Tensor | None) -> None:
    """A 1x1 convolution's (Cout, c_in) weight and (Cout,) bias, of x's dtype and device."""
    _checks.check_same_kind(name, x, "conv_weight", conv_weight)
    if conv_weight.dim() != 2 or conv_weight.shape[1] != c_in:
        raise ValueError(f"conv_weight must have shape (Cout, {c_in}), got {tuple(conv_weight.shape)}")
    if conv_bias is not None:
        _checks.check_same_kind(name, x, "conv_bias", conv_bias)
        if tuple(conv_bias.shape) != (conv_weight.shape[0],):
            raise ValueError(f"conv_bias must have shape ({conv_weight.shape[0]},), got {tuple(conv_bias.shape)}")


def batchnorm_relu_conv(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training-mode BatchNorm (batch statistics), ReLU and 1x1 convolution in one op.

    ``y = conv_weight @ relu((x - mean) / sqrt(var + eps) * weight + bias) + conv_bias`` at every position,
    with mean and biased var over every dimension but 1. Gradients flow through the statistics, as in
    ``nn.BatchNorm2d`` in training mode; the running statistics are the caller's to update (from the
    returned mean and var). On the ``cpu`` backend the backward is one fused pass plus one pass that adds the
    statistics' share of grad x.

    Args:
        x: (N, Cin, *spatial); weight, bias: (Cin,) or None; conv_weight: (Cout, Cin); conv_bias: (Cout,) or None.
    Returns:
        y (N, Cout, *spatial), mean (Cin,), var (Cin,) (biased).
    """
    _checks.check_tensor("x", x, min_dim=2)
    x, weight, bias, conv_weight, conv_bias = _autocast(x, weight, bias, conv_weight, conv_bias)
    _check_batchnorm(x, weight, bias, eps)
    c_in = x.shape[1]
    _check_conv1x1("x", x, c_in, conv_weight, conv_bias)
    return implementation(x).batchnorm_relu_conv(x, weight, bias, float(eps), conv_weight, conv_bias)


def subtraction2_batchnorm_relu_conv(
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
    """:func:`batchnorm_relu_conv` of ``z = subtraction2(x1, x2, ..., append=append)`` in one op.

    The first BN-ReLU-conv1x1 of the pairwise mapping gamma, with z = [phi(x_i) - psi(x_j), p_i - p_j]. The ``cpu``
    backend never writes z (K times the size of x1): its statistics, the fused triple and their backward gather z's
    values from x1, x2 and append as they go, and z is not kept for backward. Same function and gradients as the two
    ops one after the other (which is what the reference backend runs).

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
        _checks.check_append(append, x1, fp.kernel_size**2, h_out * w_out)
        c += append.shape[1]
    # The checks of batchnorm_relu_conv, on z's shape (without building z).
    _check_batchnorm(x1, weight, bias, eps, shape=(x1.shape[0], c, fp.kernel_size**2, h_out * w_out))
    _check_conv1x1("x1", x1, c, conv_weight, conv_bias)
    return implementation(x1).subtraction2_batchnorm_relu_conv(x1, x2, append, weight, bias, float(eps), conv_weight,
                                                               conv_bias, fp)


def batchnorm_relu_maxpool(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training-mode BatchNorm (batch statistics), ReLU and 2x2 stride-2 max-pool in one op.

    The same as :func:`bn_relu_maxpool` with the BN's scale and shift computed from the batch statistics of x,
    and gradients through them. Returns y (N, C, H // 2, W // 2), mean (C,), var (C,) (biased).
    """
    _checks.check_feature_map("x", x)
    x, weight, bias = _autocast(x, weight, bias)
    _check_batchnorm(x, weight, bias, eps)
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"a 2x2 max-pool needs at least 2x2 pixels, got x of shape {tuple(x.shape)}")
    return implementation(x).batchnorm_relu_maxpool(x, weight, bias, float(eps))
