"""The cpu backend's per-channel batch statistics (``ops/_cpu/statistics.py``): ``channel_var_mean`` against
``torch.var_mean`` (the oracle), its gradcheck, and the backward kernels that the training-mode BatchNorm ops share,
including the one that adds into a caller's buffer in place (checked for writes outside that buffer)."""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_close, needs_cpu_kernels
from torchsan import ops

pytestmark = needs_cpu_kernels
F64 = dict(dtype=torch.float64)


def _dims(x):
    return [0, *range(2, x.dim())]


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 4099), (1, 2, 9000), (5, 1, 1, 1), (2, 3)])
def test_channel_var_mean_matches_torch(shape):
    # Values and gradients equal torch.var_mean's, across chunk boundaries (4,096 values) and with a mean far larger
    # than the spread.
    x = (torch.randn(shape, **F64) * 2 + 3).requires_grad_()
    ref_var, ref_mean = torch.var_mean(x, dim=_dims(x), correction=0)
    gv, gm = torch.randn(shape[1], **F64), torch.randn(shape[1], **F64)
    ref = torch.autograd.grad((ref_var * gv).sum() + (ref_mean * gm).sum(), x)[0]
    with ops.use_backend("cpu"):
        var, mean = ops.channel_var_mean(x)
        ours = torch.autograd.grad((var * gv).sum() + (mean * gm).sum(), x)[0]
        only_var = torch.autograd.grad(ops.channel_var_mean(x)[0].sum(), x)[0]  # the other output unused
        only_mean = torch.autograd.grad(ops.channel_var_mean(x)[1].sum(), x)[0]
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ref_var_only = torch.autograd.grad(torch.var_mean(x, dim=_dims(x), correction=0)[0].sum(), x)[0]
    ref_mean_only = torch.autograd.grad(torch.var_mean(x, dim=_dims(x), correction=0)[1].sum(), x)[0]
    torch.testing.assert_close(only_var, ref_var_only)
    torch.testing.assert_close(only_mean, ref_mean_only)
    # float32 with |mean| / std = 1e4: E[x^2] - E[x]^2 would lose every digit; the chunked two-pass keeps them.
    big = torch.randn(shape, **F64) * 0.1 + 1000.0
    with ops.use_backend("cpu"):
        var32, mean32 = ops.channel_var_mean(big.float())
    ref_var64, ref_mean64 = torch.var_mean(big, dim=_dims(big), correction=0)
    torch.testing.assert_close(var32.double(), ref_var64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mean32.double(), ref_mean64, rtol=1e-6, atol=1e-6)


def test_channel_var_mean_noncontiguous_matches_torch():
    x = torch.randn(3, 5, 6, 7, **F64).transpose(1, 3)  # (3, 7, 6, 5), channels strided
    var, mean = ops.channel_var_mean(x)
    ref_var, ref_mean = torch.var_mean(x, dim=_dims(x), correction=0)
    torch.testing.assert_close(var, ref_var)
    torch.testing.assert_close(mean, ref_mean)


def test_channel_var_mean_gradcheck_and_gradgradcheck():
    small = torch.randn(2, 3, 2, 3, **F64, requires_grad=True)
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.channel_var_mean, (small,))
        assert torch.autograd.gradgradcheck(ops.channel_var_mean, (small,))


def test_channel_var_mean_rejects_bad_input():
    for backend in ("cpu", "reference"):
        with ops.use_backend(backend):
            with pytest.raises(ValueError, match="at least one value per channel"):
                ops.channel_var_mean(torch.randn(0, 3, 4))
            with pytest.raises(ValueError, match="at least 2 dimensions"):
                ops.channel_var_mean(torch.randn(5))


def _stats_backward_inputs(shape):
    x = torch.randn(shape, **F64) * 2 + 1
    mean = x.mean(_dims(x))
    return x, mean, torch.randn(shape[1], **F64), torch.randn(shape[1], **F64)


def _expected_stats_backward(x, grad_var, grad_mean):
    """The gradient of sum(grad_var * var + grad_mean * mean) w.r.t. x, from torch's own var_mean."""
    leaf = x.clone().requires_grad_(True)
    var, mean = torch.var_mean(leaf, dim=_dims(leaf), correction=0)
    return torch.autograd.grad((var * grad_var).sum() + (mean * grad_mean).sum(), leaf)[0]


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (3, 2, 4100)])
def test_channel_var_mean_backward_ops(shape):
    x, mean, grad_var, grad_mean = _stats_backward_inputs(shape)
    expected = _expected_stats_backward(x, grad_var, grad_mean)
    assert_close(torch.ops.torchsan.channel_var_mean_backward(x, mean, grad_var, grad_mean), expected)
    # add_channel_var_mean_backward adds the same into a buffer of the caller's, in place: here a view of the middle
    # of one allocation, whose ends must stay as they are (a write past the buffer would land there).
    numel = x.numel()
    storage = torch.randn(numel + 2 * 64, **F64)
    before = storage.clone()
    base = storage[64:64 + numel].view(shape)
    assert base.is_contiguous() and base.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
    expected_sum = base + expected
    torch.ops.torchsan.add_channel_var_mean_backward(x, mean, grad_var, grad_mean, base)
    assert_close(base, expected_sum)
    assert torch.equal(storage[:64], before[:64]) and torch.equal(storage[64 + numel:], before[64 + numel:])
