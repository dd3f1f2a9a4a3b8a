"""When the layers run a fused op instead of their modules one by one: the one place that decides.

A layer asks :func:`should_fuse` before it replaces a run of modules (say BN, ReLU and a 1x1 conv) by one fused op
(:func:`torchsan.ops.batchnorm_relu_conv1x1`). The answer is yes when

* fusion is switched on (the default; :func:`fusion` switches it off for a block of code, ``TORCHSAN_FUSION=0``
  for every thread),
* none of the modules has hooks: pruning, quantisation or a MAC counter must see each module run,
* the input is not empty (a batch of 0 takes the modules' route, which torch defines for it), and
* the backend that serves the input fuses that op at that shape. The thresholds are facts about a backend's
  kernels, so each backend states them in its ``fuses(op, x, **shape)``.

Both routes compute the same function: the same outputs, gradients and BatchNorm running statistics (up to
float rounding; the tests check this in float64).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch
from torch import nn

from ._dispatch import implementation

# The ops a layer may run in place of its modules (``should_fuse``'s first argument), and what each replaces.
FUSED_OPS = {
    "affine_relu_conv1x1": "an eval-mode BatchNorm2d, ReLU and a 1x1 Conv2d",
    "batchnorm_relu_conv1x1": "a training-mode BatchNorm2d, ReLU and a 1x1 Conv2d",
    "affine_relu_maxpool2x2": "an eval-mode BatchNorm2d, ReLU and a 2x2 MaxPool2d",
    "batchnorm_relu_maxpool2x2": "a training-mode BatchNorm2d, ReLU and a 2x2 MaxPool2d",
    "conv1x1_affine_relu_maxpool2x2": "a 1x1 Conv2d, an eval-mode BatchNorm2d, ReLU and a 2x2 MaxPool2d",
    "conv1x1_batchnorm_relu_maxpool2x2": "a 1x1 Conv2d without bias, a training-mode BatchNorm2d, ReLU and a 2x2 "
                                         "MaxPool2d",
    "subtraction2_batchnorm_relu_conv1x1": "subtraction2 and gamma's first training-mode BN-ReLU-conv1x1",
    "pairwise_logits": "subtraction2 and the whole mapping gamma (BN-ReLU-conv1x1-BN-ReLU-conv1x1)",
    "patchwise_weights": "the patchwise concatenation relation and the whole mapping gamma",
    "subtraction2_append": "subtraction2 followed by torch.cat of the position encoding",
    "softmax_aggregation": "the softmax over the footprint and the aggregation",
    "pairwise_attention": "subtraction2, the whole mapping gamma, the softmax over the footprint and the aggregation "
                          "(inference)",
    "patchwise_attention": "the patchwise concatenation relation, the whole mapping gamma and the aggregation "
                           "(inference)",
    "tap_softmax": "nn.Softmax(dim=2) over the footprint taps",
    "stacked_conv1x1": "phi, psi and beta as three 1x1 convolutions (one convolution with stacked weights)",
    "conv1x1": "a 1x1 Conv2d, no gradient (the backend's own product instead of the convolution)",
    "conv1x1_matmul": "a 1x1 Conv2d, no gradient (one matrix product per image instead of the convolution)",
}

_state = threading.local()
_DEFAULT = os.environ.get("TORCHSAN_FUSION", "1")
if _DEFAULT not in ("0", "1"):
    raise ValueError(f"TORCHSAN_FUSION={_DEFAULT!r} must be 0 or 1")


def fusion_enabled() -> bool:
    """Whether the layers may run fused ops on this thread (True unless switched off)."""
    return getattr(_state, "enabled", _DEFAULT == "1")


def set_fusion(enabled: bool) -> None:
    """Switch the layers' fused ops on or off for this thread."""
    _state.enabled = bool(enabled)


@contextlib.contextmanager
def fusion(enabled: bool = True) -> Iterator[None]:
    """``with torchsan.ops.fusion(False): ...`` runs every layer module by module (same function, no fused ops).

    The primitive ops (``aggregation``, ``subtraction2``, ...) still run on the selected backend; to run those as
    plain PyTorch too, add ``torchsan.ops.use_backend("reference")``.
    """
    previous = fusion_enabled()
    set_fusion(enabled)
    try:
        yield
    finally:
        _state.enabled = previous


def has_hooks(*modules: nn.Module, backward: bool = True) -> bool:
    """Whether any of ``modules`` (or every module, through global hooks) has forward hooks, or backward hooks too
    when ``backward``."""
    from torch.nn.modules import module as module_impl

    if module_impl._global_forward_hooks or module_impl._global_forward_pre_hooks:
        return True
    if backward and (module_impl._global_backward_hooks or module_impl._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or (backward and (m._backward_hooks or m._backward_pre_hooks))
               for m in modules)


def should_fuse(op: str, x: torch.Tensor, *modules: nn.Module, **shape: int) -> bool:
    """Whether to run fused ``op`` on input ``x`` instead of ``modules`` one by one (see the module docstring).

    ``shape`` gives what ``x`` does not: ``out_channels`` for the conv1x1 ops (``conv1x1`` included); ``in_channels``
    (z's) and ``positions`` (output pixels per image) too for ``subtraction2_batchnorm_relu_conv1x1``;
    ``in_channels`` and ``out_channels`` for ``conv1x1_matmul``; ``batch_statistics`` (whether a BN normalises with the
    batch's statistics) for ``pairwise_logits`` and ``patchwise_weights``, and with ``stride``, ``out_height`` and
    ``out_width`` (the footprint's and the output's) for ``pairwise_attention`` and ``patchwise_attention``;
    ``in_channels`` (the conv's) for ``conv1x1_affine_relu_maxpool2x2`` and ``conv1x1_batchnorm_relu_maxpool2x2``.
    """
    if op not in FUSED_OPS:
        raise ValueError(f"unknown fused op {op!r}; one of {tuple(FUSED_OPS)}")
    if not fusion_enabled() or has_hooks(*modules) or x.numel() == 0:
        return False
    return implementation(x).fuses(op, x, **shape)
