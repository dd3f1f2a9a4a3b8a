"""The ``cpu`` backend: fused C++/OpenMP kernels (``torchsan/csrc/cpu/``), registered as torch custom ops.

One module per op family, mirroring the C++ sources:

| module | ops | C++ |
|---|---|---|
| ``softmax_aggregation`` | aggregation, softmax_aggregation, tap_softmax | ``softmax_aggregation.cpp`` |
| ``gathers`` | subtraction2 (with append), subtraction, unfold | ``gathers.cpp`` |
| ``clique`` | clique_products (the patchwise clique relation) | ``clique.cpp`` |
| ``conv1x1`` | affine_relu_conv1x1, batchnorm_relu_conv1x1 | ``conv1x1.cpp`` |
| ``pooling`` | affine_relu_maxpool2x2, batchnorm_relu_maxpool2x2, conv1x1_affine_relu_maxpool2x2 | ``pooling.cpp`` |
| ``statistics`` | channel_var_mean; gradients through a training BN's statistics | ``statistics.cpp`` |
| ``subtraction2_conv1x1`` | subtraction2_batchnorm_relu_conv1x1, pairwise_logits, patchwise_weights | (same) |

The ops live in the ``torchsan`` namespace (``torch.ops.torchsan.aggregation`` ...), with fake implementations for
shape inference and ``torch.compile``, and autograd formulas whose backward passes are fused kernels too; under
``create_graph=True`` they differentiate the reference composition instead (``_register.differentiable_backward``),
so double backward works. ``_build`` compiles the extension on first use; :func:`fuses` says where a fused op
beats running its parts one by one.
"""

from __future__ import annotations

import math

import torch

from ._build import available, describe, extension, kernel_constants, requested_arch, unavailable_reason, vector_isa
from .clique import clique_products
from .conv1x1 import affine_relu_conv1x1, batchnorm_relu_conv1x1
from .gathers import centre, subtraction, subtraction2, unfold
from .pooling import affine_relu_maxpool2x2, batchnorm_relu_maxpool2x2, conv1x1_affine_relu_maxpool2x2
from .softmax_aggregation import aggregation, softmax_aggregation, tap_softmax
from .statistics import channel_var_mean
from .subtraction2_conv1x1 import pairwise_logits, patchwise_weights, subtraction2_batchnorm_relu_conv1x1

__all__ = [
    "DTYPES", "affine_relu_conv1x1", "affine_relu_maxpool2x2", "aggregation", "available", "batchnorm_relu_conv1x1",
    "batchnorm_relu_maxpool2x2", "centre", "channel_var_mean", "clique_products", "conv1x1_affine_relu_maxpool2x2",
    "describe",
    "extension", "fuses", "kernel_constants", "pairwise_logits", "patchwise_weights", "requested_arch",
    "softmax_aggregation",
    "subtraction", "subtraction2", "subtraction2_batchnorm_relu_conv1x1", "tap_softmax", "unavailable_reason",
    "unfold", "vector_isa",
]

DTYPES = (torch.float32, torch.float64)

# --- where the fused ops beat their parts run one by one (benchmarks/fusion.py measures every rule) -----------------
# BN-ReLU-conv1x1: the kernel stages relu(BN(x)) for a block of positions and multiplies it by the (Cout, Cin)
# weight with a register-blocked product. It saves the BN and ReLU passes over the input, but its product is slower
# than oneDNN's convolution, so it pays while each image has at least CONV1X1_POSITIONS_PER_OUTPUT positions per
# output channel; with at most CONV1X1_NARROW_INPUT input channels the product is bound by writing the output either
# way, and any map of CONV1X1_NARROW_MIN_POSITIONS positions pays.
CONV1X1_MAX_IN_CHANNELS = 4096  # up to patchwise stage 3's 3200; its stage 4 (6400) runs the modules
CONV1X1_MAX_OUT_CHANNELS = 1024
CONV1X1_POSITIONS_PER_OUTPUT = 3
CONV1X1_NARROW_INPUT = 32
CONV1X1_NARROW_MIN_POSITIONS = 64
# subtraction2 + BN-ReLU-conv1x1 without writing z: gathering z's rows beats writing z from this many output
# positions per image (SAN's smallest map at 224 px is 7 x 7).
SUBTRACTION2_CONV1X1_MIN_POSITIONS = 49
# The stem's conv1x1 + BN + ReLU + max-pool (inference): its product is not register-blocked, so only for inputs
# as narrow as an image's channels.
CONV1X1_POOL_MAX_IN_CHANNELS = 8
# A plain 1x1 convolution for inference: on large NCHW maps oneDNN's convolution is slower than a batched matrix
# product on the map as it is (at::bmm), from this many positions per image (benchmarks/conv1x1_route.py).
CONV1X1_MATMUL_MIN_POSITIONS = 784
_ALWAYS = frozenset({"affine_relu_maxpool2x2", "batchnorm_relu_maxpool2x2", "subtraction2_append",
                     "softmax_aggregation", "tap_softmax", "stacked_conv1x1"})


def _conv1x1_pays(c_in: int, c_out: int, positions: int) -> bool:
    if c_in > CONV1X1_MAX_IN_CHANNELS or c_out > CONV1X1_MAX_OUT_CHANNELS:
        return False
    if c_in <= CONV1X1_NARROW_INPUT and positions >= CONV1X1_NARROW_MIN_POSITIONS:
        return True
    return positions >= CONV1X1_POSITIONS_PER_OUTPUT * c_out


def fuses(op: str, x: torch.Tensor, *, in_channels: int = 0, out_channels: int = 0, positions: int = 0,
          batch_statistics: bool = True) -> bool:
    """Whether this backend's fused ``op`` beats running its parts one by one for input ``x`` (see
    ``torchsan.ops._fusion.should_fuse``). ``out_channels``: the conv1x1's output width; for
    ``subtraction2_batchnorm_relu_conv1x1`` also ``in_channels`` (z's channels, the conv's input) and ``positions``
    (output pixels per image); for ``pairwise_logits``, ``batch_statistics``: whether a BN of gamma normalises with
    the batch's statistics (training mode)."""
    if op in _ALWAYS:
        return True
    if op in ("pairwise_logits", "patchwise_weights"):  # inference kernels: running statistics, no gradient
        return not batch_statistics and not (torch.is_grad_enabled() and x.requires_grad)
    if op == "conv1x1_affine_relu_maxpool2x2":  # an inference kernel for narrow inputs (an image: the stem)
        return not torch.is_grad_enabled() and in_channels <= CONV1X1_POOL_MAX_IN_CHANNELS
    if op == "conv1x1_matmul":
        return not torch.is_grad_enabled() and math.prod(x.shape[2:]) >= CONV1X1_MATMUL_MIN_POSITIONS
    if op in ("affine_relu_conv1x1", "batchnorm_relu_conv1x1"):
        return _conv1x1_pays(x.shape[1], out_channels, math.prod(x.shape[2:]))
    if op == "subtraction2_batchnorm_relu_conv1x1":
        return (positions >= SUBTRACTION2_CONV1X1_MIN_POSITIONS and in_channels <= CONV1X1_MAX_IN_CHANNELS
                and out_channels <= CONV1X1_MAX_OUT_CHANNELS)
    return False
