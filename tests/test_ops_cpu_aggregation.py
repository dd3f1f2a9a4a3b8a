"""The cpu backend's aggregation, softmax_aggregation and tap_softmax (``ops/_cpu/softmax_aggregation.py``) against
the reference backend. Their opchecks, thread-count checks and meta shapes: test_ops_cpu_backend.py."""

from __future__ import annotations

import pytest
import torch

from _helpers import CASES, DTYPES, MODES, assert_close, assert_matches_reference, case_id, needs_cpu_kernels
from torchsan import ops
from torchsan.ops import _cpu

pytestmark = needs_cpu_kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_aggregation_and_softmax_aggregation_match_reference(case, mode, dtype):
    k, s, d, p, h, w = case
    args = (k, s, p, d, mode)
    ho, wo = ops.output_size((h, w), k, s, p, d)
    x = torch.randn(2, 12, h, w, dtype=dtype)
    for cw in (1, 3, 12):  # weight channels shared by 12, 4 and 1 value channels
        weight = torch.randn(2, cw, k * k, ho * wo, dtype=dtype)
        for fn in (ops.aggregation, ops.softmax_aggregation):  # (softmax_aggregation: weight as logits)
            assert_matches_reference(lambda a, b, fn=fn: fn(a, b, *args), x, 3 * weight)


def test_noncontiguous_channels_last_and_batch1():
    x = torch.randn(1, 16, 12, 10).to(memory_format=torch.channels_last)
    xt = torch.randn(1, 16, 10, 12).transpose(2, 3)  # (1, 16, 12, 10), non-contiguous
    weight = torch.randn(1, 49, 4, 120).transpose(1, 2)  # (1, 4, 49, 120), non-contiguous
    assert not weight.is_contiguous() and not xt.is_contiguous() and not x.is_contiguous()
    for inp in (x, xt):
        assert_matches_reference(lambda a, b: ops.aggregation(a, b, 7), inp, weight)
        assert_matches_reference(lambda a, b: ops.softmax_aggregation(a, b, 7, pad_mode="zeros"), inp, weight)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_and_gradgradcheck(mode):
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 1, 9, 20, dtype=torch.float64, requires_grad=True)
    strided = weight[..., :6].detach().clone().requires_grad_(True)  # stride 2, dilation 2: 3 x 2 outputs
    agg = lambda a, b: ops.aggregation(a, b, 3, pad_mode=mode)  # noqa: E731
    sagg = lambda a, b: ops.softmax_aggregation(a, b, 3, pad_mode=mode)  # noqa: E731
    sagg2 = lambda a, b: ops.softmax_aggregation(a, b, 3, stride=2, dilation=2, pad_mode=mode)  # noqa: E731
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(agg, (x, weight))
        assert torch.autograd.gradgradcheck(agg, (x, weight))
        assert torch.autograd.gradcheck(sagg, (x, weight))
        assert torch.autograd.gradgradcheck(sagg, (x, weight))
        assert torch.autograd.gradcheck(sagg2, (x, strided))
        assert torch.autograd.gradgradcheck(sagg2, (x, strided))


def test_softmax_aggregation_op_gradients_through_both_outputs():
    # The custom op returns the softmax too: its gradient (alone, or added to the aggregation's) reaches the logits.
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(1, 1, 9, 20, dtype=torch.float64, requires_grad=True)
    op = lambda a, b: torch.ops.torchsan.softmax_aggregation(a, b, 3, 1, 1, 1, True)  # noqa: E731
    assert torch.autograd.gradcheck(op, (x, logits))
    assert torch.autograd.gradgradcheck(op, (x, logits))
    y, w = op(x, logits)
    torch.testing.assert_close(w, torch.softmax(logits, 2))
    (g_softmax_only,) = torch.autograd.grad(w.square().sum(), logits)
    torch.testing.assert_close(g_softmax_only, torch.autograd.grad(torch.softmax(logits, 2).square().sum(), logits)[0])


@pytest.mark.parametrize("side", ["per_task", "separate_pass"])
def test_softmax_aggregation_on_both_sides_of_the_plane_threshold(side):
    """A (K, L) plane of logits up to ``softmax_plane_bytes`` is normalised in the task that aggregates with it (while
    in cache); a larger one (SAN stage 1: 49 x 3136 floats) in a separate pass first. Same function either way."""
    limit, k, width, size = _cpu.kernel_constants()["softmax_plane_bytes"], 7, 40, 8
    height = limit // (k * k * width * size) + (side == "separate_pass")
    plane = k * k * height * width * size
    assert (plane <= limit) == (side == "per_task")
    x = torch.randn(2, 4, height, width, dtype=torch.float64)
    logits = 3 * torch.randn(2, 2, k * k, height * width, dtype=torch.float64)
    assert_matches_reference(lambda a, b: ops.softmax_aggregation(a, b, k), x, logits)


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_softmax_aggregation_without_gradient_matches_reference(case, mode, dtype, no_grad):
    """Where no gradient is wanted the softmax stays in a per-thread plane (``softmax_aggregation_inference``); the
    aggregation is the reference's all the same."""
    k, s, d, p, h, w = case
    ho, wo = ops.output_size((h, w), k, s, p, d)
    x = torch.randn(2, 24, h, w, dtype=dtype)
    for cw in (1, 3, 12, 24):  # 24 and 8 channels per weight: the softmax folded into the aggregation; 2, 1: not
        logits = 3 * torch.randn(2, cw, k * k, ho * wo, dtype=dtype)
        with ops.use_backend("reference"):
            expected = ops.softmax_aggregation(x, logits, k, s, p, d, mode)
        with no_grad(), ops.use_backend("cpu"):
            got = ops.softmax_aggregation(x, logits, k, s, p, d, mode)
        assert_close(got, expected, dtype)


def test_softmax_aggregation_without_gradient_large_plane_and_batch1():
    """A plane larger than the per-task threshold of the training path (SAN stage 1: 49 x 3136 floats), one image,
    non-contiguous logits, and the op straight from torch.ops: the same function as the reference."""
    x = torch.randn(1, 16, 56, 56)
    logits = (3 * torch.randn(1, 49, 2, 56 * 56)).transpose(1, 2)
    assert 49 * 56 * 56 * 4 > _cpu.kernel_constants()["softmax_plane_bytes"] and not logits.is_contiguous()
    with ops.use_backend("reference"):
        expected = ops.softmax_aggregation(x, logits, 7)
    with torch.inference_mode(), ops.use_backend("cpu"):
        got = ops.softmax_aggregation(x, logits, 7)
    assert_close(got, expected, torch.float32)
    direct = torch.ops.torchsan.softmax_aggregation_inference(x, logits, 7, 1, 3, 1, True)
    assert_close(direct, expected, torch.float32)


# (k, dilation, padding, H, W): stride-1 maps of a few hundred positions, around the weight gradient's block size
BLOCK_CASES = [
    (5, 1, None, 17, 19),  # blocks of 14 rows (266 positions), the last of 3
    (7, 2, None, 23, 21),
    (5, 1, 3, 9, 300),  # rows longer than a block: one row per block
    (7, 1, None, 15, 17),  # 255 positions: below the block size
    (3, 1, None, 20, 20),  # 9 taps: below the taps' threshold
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: f"k{c[0]}d{c[1]}p{c[2]}_{c[3]}x{c[4]}")
def test_weight_gradient_blocks_match_reference(case, mode, dtype):
    """With x and the weights both requiring grad at stride 1, the backward computes the weight gradient of a block
    of output rows in a buffer and writes each tap's run once (from ``aggregation_grad_block_min_taps`` taps, where a
    block of whole rows reaches ``aggregation_grad_block_positions``); otherwise straight into the plane."""
    k, d, p, h, w = case
    constants = _cpu.kernel_constants()
    ho, wo = ops.output_size((h, w), k, 1, p, d)
    rows = min(ho, -(-constants["aggregation_grad_block_positions"] // wo))
    blocked = k * k >= constants["aggregation_grad_block_min_taps"] and rows * wo >= constants[
        "aggregation_grad_block_positions"]
    assert blocked == (case in BLOCK_CASES[:3])
    x = torch.randn(2, 12, h, w, dtype=dtype)
    # float32: a reflected border value's gradient sums up to 4 K terms of either sign, in another order than torch's
    grad_tol = dict(rtol=1e-5, atol=5e-5) if dtype == torch.float32 else None
    for cw in (1, 3, 12):  # 12, 4 and 1 value channels per weight channel
        weight = 3 * torch.randn(2, cw, k * k, ho * wo, dtype=dtype)
        for fn in (ops.aggregation, ops.softmax_aggregation):
            assert_matches_reference(lambda a, b, fn=fn: fn(a, b, k, 1, p, d, mode), x, weight, grad_tol=grad_tol)


def test_weight_gradient_blocks_gradcheck():
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64, requires_grad=True)  # 256 positions: one block
    logits = torch.randn(1, 1, 25, 256, dtype=torch.float64, requires_grad=True)
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b: ops.softmax_aggregation(a, b, 5), (x, logits))


def test_weight_gradient_without_value_channels_is_zero():
    w = torch.randn(2, 3, 9, 20)
    junk = w.clone()  # freed memory holding values, which an uninitialised gradient would show
    del junk
    empty = torch.empty(2, 0, 4, 5)
    gx, gw = _cpu._build.kernels().aggregation_backward(empty, empty, w, 3, 1, 1, 1, True, True, True, False)
    assert gx.shape == empty.shape and gw.shape == w.shape and not gw.any()


# --- tap_softmax -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 49, 37), (1, 2, 9, 5), (3, 1, 1, 70), (2, 4, 49, 196)])
def test_tap_softmax_matches_reference(dtype, shape):
    x = torch.randn(shape, dtype=dtype) * 8  # spreads of +-30: large exponents, some tiny probabilities
    # float32 without fused multiply-adds (a baseline build) rounds the 49-tap sums apart from torch's by a few ulp
    atol = 1e-7 if _cpu.kernel_constants()["fused_multiply_add"] else 5e-7
    tol = dict(rtol=1e-5, atol=atol) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    assert_matches_reference(ops.tap_softmax, x, **tol)


def test_tap_softmax_edges_like_torch_softmax():
    # +-inf, NaN and huge values behave like torch.softmax (a NaN or all -inf column gives NaN)
    x = torch.randn(1, 2, 5, 11)
    x[0, 0, :, 0] = float("-inf")
    x[0, 0, 2, 1] = float("nan")
    x[0, 0, 1, 2] = float("inf")
    x[0, 1, :, 3] = torch.tensor([1e30, -1e30, 0.0, 88.0, -88.0])
    x[0, 1, 0, 4] = -200.0
    with ops.use_backend("cpu"):
        y = ops.tap_softmax(x)
    expected = torch.softmax(x, 2)
    assert expected[0, 0, :, :3].isnan().all() and not expected[0, 1].isnan().any()  # the cases are what they say
    torch.testing.assert_close(y, expected, equal_nan=True)


def test_tap_softmax_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 3, 4, 9, dtype=torch.float64, requires_grad=True)
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.tap_softmax, (x,))
        assert torch.autograd.gradgradcheck(ops.tap_softmax, (x,))


def test_tap_softmax_backward_op_is_the_softmax_gradient():
    x = torch.randn(2, 3, 9, 13, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 9, 13, dtype=torch.float64)
    out = torch.softmax(x, 2)
    (expected,) = torch.autograd.grad(out, x, grad)
    assert_close(torch.ops.torchsan.tap_softmax_backward(grad, out.detach()), expected)
