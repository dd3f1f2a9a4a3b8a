"""The ``cpu`` backend: fused C++/OpenMP kernels (``torchsan/csrc/cpu/``), registered as torch custom ops.

One module per op family, mirroring the C++ sources:

| module | ops | C++ |
|---|---|---|
| ``softmax_aggregation`` | aggregation, softmax_aggregation, tap_softmax | ``softmax_aggregation.cpp`` |
| ``gathers`` | subtraction2 (with append), subtraction, unfold | ``gathers.cpp`` |
| ``clique`` | clique_products (the patchwise clique relation) | ``clique.cpp`` |
| ``conv1x1`` | affine_relu_conv1x1, batchnorm_relu_conv1x1 | ``conv1x1.cpp`` |
| ``pooling`` | affine_relu_maxpool2x2, batchnorm_relu_maxpool2x2; the stem: conv1x1_ + each | ``pooling.cpp`` |
| ``statistics`` | channel_var_mean; gradients through a training BN's statistics | ``statistics.cpp`` |
| ``subtraction2_conv1x1`` | subtraction2_batchnorm_relu_conv1x1; the inference mappings and attention ops | same |

``policy`` holds every rule of when a kernel runs: where a fused op beats its parts run one by one (:func:`fuses`)
and where an op hands a shape to the library instead (``CLIQUE_MAX_CHANNELS``).

The ops live in the ``torchsan`` namespace (``torch.ops.torchsan.aggregation`` ...), with fake implementations for
shape inference and ``torch.compile``, and autograd formulas whose backward passes are fused kernels too; under
``create_graph=True`` they differentiate the reference composition instead (``_register.differentiable_backward``),
so double backward works. ``_build`` compiles the extension on first use.
"""

from __future__ import annotations

import torch

from ._build import available, describe, extension, kernel_constants, requested_arch, unavailable_reason, vector_isa
from .clique import clique_products
from .conv1x1 import affine_relu_conv1x1, batchnorm_relu_conv1x1, conv1x1
from .gathers import centre, subtraction, subtraction2, unfold
from .policy import (
    CLIQUE_MAX_CHANNELS,
    CONV1X1_KERNEL_MAX_IN_CHANNELS,
    CONV1X1_KERNEL_MIN_POSITIONS,
    CONV1X1_MATMUL_MIN_POSITIONS,
    CONV1X1_MAX_IN_CHANNELS,
    CONV1X1_MAX_OUT_CHANNELS,
    CONV1X1_NARROW_INPUT,
    CONV1X1_NARROW_MIN_POSITIONS,
    CONV1X1_POOL_MAX_IN_CHANNELS,
    CONV1X1_POSITIONS_PER_OUTPUT,
    SUBTRACTION2_CONV1X1_MIN_POSITIONS,
    fuses,
)
from .pooling import (
    affine_relu_maxpool2x2,
    batchnorm_relu_maxpool2x2,
    conv1x1_affine_relu_maxpool2x2,
    conv1x1_batchnorm_relu_maxpool2x2,
)
from .softmax_aggregation import aggregation, softmax_aggregation, tap_softmax
from .statistics import channel_var_mean
from .subtraction2_conv1x1 import (
    pairwise_attention,
    pairwise_logits,
    patchwise_attention,
    patchwise_weights,
    subtraction2_batchnorm_relu_conv1x1,
)

__all__ = [
    "CLIQUE_MAX_CHANNELS", "CONV1X1_KERNEL_MAX_IN_CHANNELS", "CONV1X1_KERNEL_MIN_POSITIONS",
    "CONV1X1_MATMUL_MIN_POSITIONS", "CONV1X1_MAX_IN_CHANNELS", "CONV1X1_MAX_OUT_CHANNELS",
    "CONV1X1_NARROW_INPUT", "CONV1X1_NARROW_MIN_POSITIONS", "CONV1X1_POOL_MAX_IN_CHANNELS",
    "CONV1X1_POSITIONS_PER_OUTPUT", "DTYPES", "SUBTRACTION2_CONV1X1_MIN_POSITIONS", "affine_relu_conv1x1",
    "affine_relu_maxpool2x2", "aggregation", "available", "batchnorm_relu_conv1x1", "batchnorm_relu_maxpool2x2",
    "centre", "channel_var_mean", "clique_products", "conv1x1", "conv1x1_affine_relu_maxpool2x2",
    "conv1x1_batchnorm_relu_maxpool2x2", "describe", "extension",
    "fuses", "kernel_constants", "pairwise_attention", "pairwise_logits", "patchwise_attention", "patchwise_weights",
    "requested_arch",
    "softmax_aggregation",
    "subtraction", "subtraction2", "subtraction2_batchnorm_relu_conv1x1", "tap_softmax", "unavailable_reason",
    "unfold", "vector_isa",
]

DTYPES = (torch.float32, torch.float64)
