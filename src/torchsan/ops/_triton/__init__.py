"""The ``triton`` backend: Triton kernels for NVIDIA GPUs, registered as the CUDA kernels of the torch custom ops.

One module per op family, mirroring the ``cpu`` backend:

| module | ops |
|---|---|
| ``softmax_aggregation_kernels`` | aggregation, softmax_aggregation (forward, backward; softmax's backward: torch) |
| ``gather_kernels`` | subtraction2 (with append), subtraction, unfold (forward and backward) |
| ``pairwise_kernels`` | pairwise_logits: subtraction2 and the mapping gamma, not writing their (N, C', K, L) tensors |

The ops are the ``cpu`` backend's ``torch.ops.torchsan.*`` custom ops, with the same autograd formulas and fake
implementations: this backend registers its launchers as their CUDA kernels, so models and ``torch.compile`` use
them unchanged (``pairwise_logits`` is an autograd Function of its own; ``torch.compile`` runs the modules instead).
Every backward is gather-style (a program owns the pixels it writes): no float atomics, so results
are deterministic. float32, bfloat16 and float16 accumulate in float32, float64 in float64. The fused BN-ReLU-conv1x1
and pooling ops are not written for the GPU: the layers run cuDNN's convolutions and torch's BatchNorm there
(``fuses`` says no). Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, through Triton's
interpreter, while ``use_backend("triton")`` selects this backend: that is how CI tests them.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .. import reference
from .._checks import Footprint
from ..reference import (  # not written for the GPU: torch's own kernels (cuDNN, BatchNorm) serve these
    affine_relu_conv1x1,
    affine_relu_maxpool2x2,
    batchnorm_relu_conv1x1,
    batchnorm_relu_maxpool2x2,
    centre,
    channel_var_mean,
    clique_products,
    conv1x1,
    conv1x1_affine_relu_maxpool2x2,
    conv1x1_batchnorm_relu_maxpool2x2,
    patchwise_weights,
    subtraction2_batchnorm_relu_conv1x1,
    tap_softmax,
    tap_softmax_backward,
)

__all__ = [
    "DTYPES", "affine_relu_conv1x1", "affine_relu_maxpool2x2", "aggregation", "available", "batchnorm_relu_conv1x1",
    "batchnorm_relu_maxpool2x2", "centre", "channel_var_mean", "clique_products", "conv1x1",
    "conv1x1_affine_relu_maxpool2x2", "conv1x1_batchnorm_relu_maxpool2x2", "fuses",
    "interpreting", "pairwise_attention", "pairwise_logits", "patchwise_attention", "patchwise_weights",
    "softmax_aggregation", "subtraction", "subtraction2",
    "subtraction2_batchnorm_relu_conv1x1", "tap_softmax", "tap_softmax_backward", "unavailable_reason", "unfold",
]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTERPRETER_MIN_VERSION = (3, 8)  # the interpreter runs on CPU tensors from this release on (3.1's does not)
# The fused ops this backend runs in place of modules: its own softmax + aggregation, gather with append and pairwise
# logits, and the reference's stacked phi/psi/beta convolution (one cuDNN call instead of three).
_FUSES = frozenset({"softmax_aggregation", "subtraction2_append", "stacked_conv1x1", "pairwise_logits"})


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``): on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why this backend cannot run here (None if it can)."""
    try:
        import triton
    except ImportError as err:
        return f"triton is not installed ({err})"
    if torch.cuda.is_available():
        return None
    if not interpreting():
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if version < INTERPRETER_MIN_VERSION:  # older interpreters lose the stores of kernels on CPU tensors
        return (f"triton {triton.__version__}'s interpreter is not supported (the kernels are tested with "
                f"{'.'.join(map(str, INTERPRETER_MIN_VERSION))} and later)")
    return None


def available() -> bool:
    """Whether triton imports and there is a GPU (or the interpreter) to run its kernels."""
    return unavailable_reason() is None


def serves(x: Tensor) -> bool:
    """Whether this backend runs on tensor ``x``: CUDA tensors, or CPU tensors under the interpreter."""
    return x.dtype in DTYPES and (x.device.type == "cuda" or (x.device.type == "cpu" and interpreting()))


def fuses(op: str, x: Tensor, **shape: int) -> bool:
    """Whether this backend runs the fused ``op`` (see ``torchsan.ops._fusion.should_fuse``)."""
    if op == "pairwise_logits" and torch.compiler.is_compiling():
        return False  # an autograd Function launching kernels itself: compiled graphs run the modules
    return op in _FUSES


# --- the kernels behind the custom ops --------------------------------------------------------------------------------
def _footprint(kernel_size: int, stride: int, padding: int, dilation: int, reflect: bool) -> Footprint:
    return Footprint.from_kernel_args(kernel_size, stride, padding, dilation, reflect)


def _aggregation(x: Tensor, weight: Tensor, *args) -> Tensor:
    from .softmax_aggregation_kernels import aggregation_forward

    return aggregation_forward(x, weight, _footprint(*args))[0]


def _softmax_aggregation(x: Tensor, logits: Tensor, *args) -> tuple[Tensor, Tensor]:
    from .softmax_aggregation_kernels import aggregation_forward

    return aggregation_forward(x, logits, _footprint(*args), softmax=True)


def _aggregation_backward(grad: Tensor, x: Tensor, weight: Tensor, *args) -> tuple[Tensor, Tensor]:
    from .softmax_aggregation_kernels import aggregation_backward

    *fp_args, softmax = args
    gx, gw = aggregation_backward(grad, x, weight, _footprint(*fp_args))
    if softmax:  # weight is the softmax of the logits: their gradient
        gw = reference.tap_softmax_backward(gw, weight)
    return gx, gw


def _subtraction2(x1: Tensor, x2: Tensor, append: Tensor | None, *args) -> Tensor:
    from .gather_kernels import gather_forward

    return gather_forward(x1, x2, _footprint(*args), append)


def _unfold(x: Tensor, *args) -> Tensor:
    from .gather_kernels import gather_forward

    return gather_forward(None, x, _footprint(*args))


def _subtraction2_backward(grad: Tensor, channels: int, height: int, width: int, *args) -> tuple[Tensor, Tensor]:
    from .gather_kernels import gather_backward

    return gather_backward(grad, channels, height, width, _footprint(*args), unfold=False)


def _unfold_backward(grad: Tensor, height: int, width: int, *args) -> Tensor:
    from .gather_kernels import gather_backward

    return gather_backward(grad, grad.shape[1], height, width, _footprint(*args), unfold=True, need1=False)[1]


KERNELS = {
    "aggregation": _aggregation,
    "softmax_aggregation": _softmax_aggregation,
    "aggregation_backward": _aggregation_backward,
    "subtraction2": _subtraction2,
    "subtraction2_backward": _subtraction2_backward,
    "unfold": _unfold,
    "unfold_backward": _unfold_backward,
    "tap_softmax": reference.tap_softmax,
    "tap_softmax_backward": reference.tap_softmax_backward,
}


@functools.lru_cache(maxsize=1)
def _register() -> None:
    """Register the kernels as the CUDA kernels of the custom ops (and for CPU tensors under the interpreter)."""
    from .._cpu import _register as cpu_register
    from .._cpu import gathers, softmax_aggregation  # noqa: F401  (define the ops)

    for name, kernel in KERNELS.items():
        torch.library.register_kernel(f"torchsan::{name}", "cuda", kernel)
        cpu_register.register_interpreted(name, kernel)


@functools.lru_cache(maxsize=1)
def _ops() -> dict:
    """The custom ops (the cpu backend defines them), with this backend's kernels registered."""
    _register()
    from .._cpu.gathers import subtraction2_op, unfold_op
    from .._cpu.softmax_aggregation import aggregation_op, softmax_aggregation_op

    return dict(aggregation=aggregation_op, softmax_aggregation=softmax_aggregation_op, subtraction2=subtraction2_op,
                unfold=unfold_op)


# --- backend interface ------------------------------------------------------------------------------------------------
def aggregation(x: Tensor, weight: Tensor, fp: Footprint, h_out: int, w_out: int) -> Tensor:
    return _ops()["aggregation"](x, weight, *fp.kernel_args())


def softmax_aggregation(x: Tensor, logits: Tensor, fp: Footprint, h_out: int, w_out: int) -> Tensor:
    return _ops()["softmax_aggregation"](x, logits, *fp.kernel_args())[0]


def subtraction2(x1: Tensor, x2: Tensor, fp: Footprint, h_out: int, w_out: int, append: Tensor | None = None) -> Tensor:
    return _ops()["subtraction2"](x1, x2, append, *fp.kernel_args())


def subtraction(x: Tensor, fp: Footprint, h_out: int, w_out: int) -> Tensor:
    return _ops()["subtraction2"](x, x, None, *fp.kernel_args())


def unfold(x: Tensor, fp: Footprint) -> Tensor:
    return _ops()["unfold"](x, *fp.kernel_args())


def pairwise_logits(x1: Tensor, x2: Tensor, append: Tensor | None, norm1: tuple, w1: Tensor, norm2: tuple, w2: Tensor,
                    b2: Tensor | None, fp: Footprint) -> tuple[Tensor, ...]:
    from .pairwise_kernels import pairwise_logits as fused

    return fused(x1, x2, append, norm1, w1, norm2, w2, b2, fp)


def pairwise_attention(x1: Tensor, x2: Tensor, values: Tensor, append: Tensor | None, norm1: tuple, w1: Tensor,
                       norm2: tuple, w2: Tensor, b2: Tensor | None, fp: Footprint) -> Tensor:
    logits = pairwise_logits(x1, x2, append, norm1, w1, norm2, w2, b2, fp)[0]
    return softmax_aggregation(values, logits, fp, *fp.out_hw(x1.shape[2], x1.shape[3]))


def patchwise_attention(x1: Tensor, x2: Tensor, values: Tensor, norm1: tuple, w1: Tensor, norm2: tuple, w2: Tensor,
                        b2: Tensor | None, fp: Footprint) -> Tensor:
    w = patchwise_weights(x1, x2, norm1, w1, norm2, w2, b2, fp)[0]
    h_out, w_out = fp.out_hw(x1.shape[2], x1.shape[3])
    return aggregation(values, w.view(w.shape[0], w.shape[1] // fp.area, fp.area, w.shape[3]), fp, h_out, w_out)
