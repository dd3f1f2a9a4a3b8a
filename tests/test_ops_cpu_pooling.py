"""The cpu backend's BatchNorm-ReLU-2x2 max-pool ops (``ops/_cpu/pooling.py``) against the reference backend:
``affine_relu_maxpool2x2`` (an eval-mode BN as scale and shift) and ``batchnorm_relu_maxpool2x2`` (a training-mode
BN, gradients through the batch statistics)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _helpers import DTYPES, assert_matches_reference, needs_cpu_kernels
from torchsan import ops

pytestmark = needs_cpu_kernels
F64 = dict(dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 5, 7, 9), (3, 2, 2, 3), (2, 4, 33, 17)])
def test_affine_relu_maxpool2x2_matches_reference(dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    x[0, 0, :2, :2] = 0.5  # a tie inside one window: the first wins, as in max_pool2d
    scale = torch.randn(shape[1], dtype=dtype).abs() + 0.1
    scale[::2] *= -1  # some negative: the pool sees the flipped order
    shift = torch.randn(shape[1], dtype=dtype)
    assert_matches_reference(lambda *t: ops.affine_relu_maxpool2x2(*t), x, scale, shift)


def test_affine_relu_maxpool2x2_gradcheck_and_gradgradcheck():
    args = [torch.randn(2, 3, 5, 6, **F64, requires_grad=True), torch.randn(3, **F64, requires_grad=True),
            torch.randn(3, **F64, requires_grad=True)]
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.affine_relu_maxpool2x2, args)
        assert torch.autograd.gradgradcheck(ops.affine_relu_maxpool2x2, args)


def test_affine_relu_maxpool2x2_propagates_nan_like_max_pool2d():
    x = torch.randn(2, 3, 4, 4, **F64)
    x[1, 2, 1, 0] = float("nan")
    with ops.use_backend("cpu"):
        fused = ops.affine_relu_maxpool2x2(x, torch.ones(3, **F64), torch.zeros(3, **F64))
    assert torch.equal(fused.isnan(), F.max_pool2d(torch.relu(x), 2, 2).isnan())
    assert fused.isnan().sum() == 1


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 9, 10), (1, 4, 16, 15)])
def test_batchnorm_relu_maxpool2x2_matches_reference(shape, affine):
    # Gradients through the batch statistics, with a mean large against the spread (see the conv1x1 tests).
    c = shape[1]
    x = torch.randn(shape, **F64) * 0.5 + 20.0
    bn = [torch.rand(c, **F64) + 0.5, torch.randn(c, **F64)] if affine else []

    def call(x, *bn):
        y, mean, var = ops.batchnorm_relu_maxpool2x2(x, *(bn or (None, None)), 1e-5)
        return y + 0.1 * (mean.sum() + var.sum())  # gradients through the returned statistics too

    assert_matches_reference(call, x, *bn, rtol=1e-9, atol=1e-9, grad_tol=dict(rtol=1e-8, atol=1e-9))


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_relu_maxpool2x2_gradcheck_and_gradgradcheck(affine):
    x = torch.randn(2, 3, 4, 6, **F64, requires_grad=True)
    w, b = (torch.rand(3, **F64) + 0.5).requires_grad_(), torch.randn(3, **F64, requires_grad=True)
    if affine:
        fn, inputs = (lambda x, w, b: ops.batchnorm_relu_maxpool2x2(x, w, b, 1e-5)), (x, w, b)
    else:
        fn, inputs = (lambda x: ops.batchnorm_relu_maxpool2x2(x, None, None, 1e-5)), (x,)
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_pooling_ops_reject_bad_input(backend):
    x = torch.randn(2, 3, 4, 4)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="scale must have shape"):
            ops.affine_relu_maxpool2x2(x, torch.ones(4), torch.zeros(3))
        with pytest.raises(ValueError, match="at least 2x2"):
            ops.affine_relu_maxpool2x2(torch.randn(2, 3, 1, 4), torch.ones(3), torch.zeros(3))
        with pytest.raises(TypeError, match="dtype"):
            ops.affine_relu_maxpool2x2(x, torch.ones(3, **F64), torch.zeros(3))
        with pytest.raises(ValueError, match="at least 2x2"):
            ops.batchnorm_relu_maxpool2x2(torch.randn(2, 3, 4, 1), None, None, 1e-5)
        with pytest.raises(ValueError, match="eps must be positive"):
            ops.batchnorm_relu_maxpool2x2(x, None, None, -1.0)
