"""When the ``cpu`` backend runs its kernels: every threshold in one place (``benchmarks/`` measures each rule).

:func:`fuses` answers ``torchsan.ops.should_fuse`` for this backend: where a fused op beats running its parts one
by one. The other rules say where an op hands a shape to the library (BLAS through torch) instead of its kernel.
"""

from __future__ import annotations

import math

import torch

# --- where the fused ops beat their parts run one by one (benchmarks/fusion.py) ---------------------------------------
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
# The stem's conv1x1 + BN + ReLU + max-pool: its product is not register-blocked, so only for inputs as narrow as
# an image's channels.
CONV1X1_POOL_MAX_IN_CHANNELS = 8
# A plain 1x1 convolution for inference: oneDNN's convolution is slower than a batched matrix product on the NCHW map
# as it is (at::bmm) from this many positions per image, and for a single image at any size (no batch to spread its
# layout conversions over); benchmarks/conv1x1_route.py.
CONV1X1_MATMUL_MIN_POSITIONS = 784
# ... and on an input this narrow, over maps this large, the plain ``conv1x1`` op (the BN-ReLU-conv1x1 kernels'
# register-blocked product, its output in the kernels' memory pool) beats that matrix product, whose multi-MB output
# glibc's default malloc faults in page by page; benchmarks/conv1x1_route.py.
CONV1X1_KERNEL_MAX_IN_CHANNELS = 64
CONV1X1_KERNEL_MIN_POSITIONS = 3136
# The longest output row the attention kernels take: a block of whole rows is one of its sub-blocks
# (kernel_constants()["sub_block"]).
ATTENTION_MAX_ROW = 256
# A pairwise or patchwise layer after its transforms as one inference kernel (its weights per block of whole output
# rows, never written): it pays where a block holds at least this many positions (half a sub-block: short rows waste the
# products' vector columns) and the batch's blocks give every thread one.
ATTENTION_MIN_BLOCK_POSITIONS = 128
# The clique relation's products (benchmarks/ops.py): the kernel's sums are bound by loads; with more channels than
# this the batched matrix product behind torch.einsum (K x C by C x K per position) is faster, its copy included.
CLIQUE_MAX_CHANNELS = 32
_ALWAYS = frozenset({"affine_relu_maxpool2x2", "batchnorm_relu_maxpool2x2", "subtraction2_append",
                     "softmax_aggregation", "tap_softmax", "stacked_conv1x1"})


def _conv1x1_pays(c_in: int, c_out: int, positions: int) -> bool:
    if c_in > CONV1X1_MAX_IN_CHANNELS or c_out > CONV1X1_MAX_OUT_CHANNELS:
        return False
    if c_in <= CONV1X1_NARROW_INPUT and positions >= CONV1X1_NARROW_MIN_POSITIONS:
        return True
    return positions >= CONV1X1_POSITIONS_PER_OUTPUT * c_out


def fuses(op: str, x: torch.Tensor, *, in_channels: int = 0, out_channels: int = 0, positions: int = 0,
          batch_statistics: bool = True, stride: int = 1, out_height: int = 0, out_width: int = 0) -> bool:
    """Whether this backend's fused ``op`` beats running its parts one by one for input ``x`` (see
    ``torchsan.ops._fusion.should_fuse``). ``out_channels``: the conv1x1's output width; for
    ``subtraction2_batchnorm_relu_conv1x1`` also ``in_channels`` (z's channels, the conv's input) and ``positions``
    (output pixels per image); for ``pairwise_logits``, ``batch_statistics``: whether a BN of gamma normalises with
    the batch's statistics (training mode); for ``pairwise_attention`` and ``patchwise_attention`` also the
    footprint's ``stride`` and the
    output's ``out_height`` and ``out_width``."""
    if op in _ALWAYS:
        return True
    if op in ("pairwise_logits", "patchwise_weights"):  # inference kernels: running statistics, no gradient
        return not batch_statistics and not (torch.is_grad_enabled() and x.requires_grad)
    if op in ("conv1x1_affine_relu_maxpool2x2", "conv1x1_batchnorm_relu_maxpool2x2"):  # narrow inputs: the stem
        return in_channels <= CONV1X1_POOL_MAX_IN_CHANNELS
    if op in ("pairwise_attention", "patchwise_attention"):  # inference kernels: running statistics, no gradient
        if batch_statistics or (torch.is_grad_enabled() and x.requires_grad) or stride != 1:
            return False
        if not 0 < out_width <= ATTENTION_MAX_ROW or out_height < 1:
            return False
        rows = min(out_height, ATTENTION_MAX_ROW // out_width)
        blocks = x.shape[0] * math.ceil(out_height / rows)
        # (a traced graph cannot depend on the thread count: two threads there)
        threads = 2 if torch.compiler.is_compiling() else torch.get_num_threads()
        return rows * out_width >= ATTENTION_MIN_BLOCK_POSITIONS and blocks >= threads
    if op == "conv1x1":
        return (not torch.is_grad_enabled() and x.shape[1] <= CONV1X1_KERNEL_MAX_IN_CHANNELS
                and out_channels <= CONV1X1_MAX_OUT_CHANNELS
                and math.prod(x.shape[2:]) >= CONV1X1_KERNEL_MIN_POSITIONS)
    if op == "conv1x1_matmul":
        wide = math.prod(x.shape[2:]) >= CONV1X1_MATMUL_MIN_POSITIONS
        return not torch.is_grad_enabled() and (x.shape[0] == 1 or wide)
    if op in ("affine_relu_conv1x1", "batchnorm_relu_conv1x1"):
        return _conv1x1_pays(x.shape[1], out_channels, math.prod(x.shape[2:]))
    if op == "subtraction2_batchnorm_relu_conv1x1":
        return (positions >= SUBTRACTION2_CONV1X1_MIN_POSITIONS and in_channels <= CONV1X1_MAX_IN_CHANNELS
                and out_channels <= CONV1X1_MAX_OUT_CHANNELS)
    return False
