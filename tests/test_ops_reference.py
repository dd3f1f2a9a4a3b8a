"""The reference ops against the per-pixel loop oracle, gradchecks, and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

import oracle
from torchsan import ops
from torchsan.ops import _cpu

# (kernel_size, stride, dilation, padding, H, W): odd sizes, stride and dilation, explicit padding.
CASES = [
    (3, 1, 1, None, 5, 7),
    (3, 2, 1, None, 7, 6),
    (3, 1, 2, None, 6, 9),
    (5, 1, 1, None, 7, 5),
    (7, 1, 1, None, 9, 8),
    (5, 2, 2, None, 9, 11),
    (3, 1, 1, 0, 6, 7),  # no padding: output shrinks
    (3, 2, 1, 2, 5, 7),  # padding beyond the centring amount
]
MODES = ["reflect", "zeros"]


@pytest.fixture(autouse=True)
def _reference_backend():
    """This file tests the reference backend against the oracle; test_ops_cpu_*.py test the fused one against it."""
    with ops.use_backend("reference"):
        yield


def _ids(case):
    k, s, d, p, h, w = case
    return f"k{k}s{s}d{d}p{p}_{h}x{w}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_aggregation_matches_loop(case, mode):
    k, s, d, p, h, w = case
    x = torch.randn(2, 6, h, w, dtype=torch.float64)
    ho, wo = ops.output_size((h, w), k, s, p, d)
    for cw in (1, 2, 3, 6):
        weight = torch.randn(2, cw, k * k, ho * wo, dtype=torch.float64)
        got = ops.aggregation(x, weight, k, s, p, d, mode)
        want = oracle.aggregation(x, weight, k, s, p, d, mode)
        assert got.shape == (2, 6, ho, wo)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_subtraction_ops_match_loop(case, mode):
    k, s, d, p, h, w = case
    x1 = torch.randn(2, 3, h, w, dtype=torch.float64)
    x2 = torch.randn(2, 3, h, w, dtype=torch.float64)
    args = (k, s, p, d, mode)
    torch.testing.assert_close(ops.subtraction2(x1, x2, *args), oracle.subtraction2(x1, x2, *args))
    torch.testing.assert_close(ops.subtraction(x1, k, s, p, d, mode), oracle.subtraction(x1, k, s, p, d, mode))
    torch.testing.assert_close(ops.unfold(x1, k, s, p, d, mode), oracle.unfold(x1, k, s, p, d, mode))
    centre = ops.centre(x1, k, s, p, d, mode)
    torch.testing.assert_close(centre, oracle.unfold(x1, k, s, p, d, mode)[:, :, k * k // 2 : k * k // 2 + 1])


def test_float32_batch1_and_noncontiguous():
    x = torch.randn(1, 8, 11, 9).transpose(2, 3)  # non-contiguous (1, 8, 9, 11)
    assert not x.is_contiguous()
    weight = torch.randn(1, 4, 9, 99).transpose(0, 0)
    got = ops.aggregation(x, weight, 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, oracle.aggregation(x, weight, 3), rtol=1e-5, atol=1e-5)
    x2 = torch.randn(1, 8, 11, 9).transpose(2, 3)
    torch.testing.assert_close(ops.subtraction2(x, x2, 3), oracle.subtraction2(x, x2, 3))


def test_zero_padding_reads_zero_and_reflection_mirrors():
    """Edge semantics spelled out on a 1-channel ramp, independent of the oracle."""
    x = torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3)
    zeros = ops.unfold(x, 3, pad_mode="zeros")[0, 0, :, 0]  # window of the top-left pixel
    refl = ops.unfold(x, 3, pad_mode="reflect")[0, 0, :, 0]
    assert zeros.tolist() == [0, 0, 0, 0, 1, 2, 0, 4, 5]
    assert refl.tolist() == [5, 4, 5, 2, 1, 2, 5, 4, 5]


@pytest.mark.parametrize("backend", [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not _cpu.available(), reason="CPU kernels unavailable")),
])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k,s,d", [(3, 1, 1), (3, 2, 1), (3, 1, 2)])
def test_gradcheck(mode, k, s, d, backend):
    """Every backend's gradients, in float64 (the fused ones also in test_ops_cpu_*.py, full Jacobian)."""
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    ho, wo = ops.output_size((5, 4), k, s, None, d)
    weight = torch.randn(2, 2, k * k, ho * wo, dtype=torch.float64, requires_grad=True)
    args = (k, s, None, d, mode)
    # fast_mode checks random projections of the Jacobian: same power to catch a wrong
    # backward, without one backward per output element.
    check = dict(fast_mode=True)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: ops.aggregation(a, b, *args), (x, weight), **check)
        assert torch.autograd.gradcheck(lambda a, b: ops.subtraction2(a, b, *args), (x, x2), **check)
        assert torch.autograd.gradcheck(lambda a: ops.subtraction(a, *args), (x,), **check)
        assert torch.autograd.gradcheck(lambda a: ops.unfold(a, *args), (x,), **check)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_full_jacobian(mode):
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 1, 9, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.aggregation(a, b, 3, pad_mode=mode), (x, weight))
    assert torch.autograd.gradcheck(lambda a, b: ops.subtraction2(a, b, 3, pad_mode=mode), (x, x2))


def test_gradgradcheck_aggregation():
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 1, 9, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: ops.aggregation(a, b, 3), (x, weight))


def test_output_size_and_default_padding():
    assert ops.default_padding(7, 1) == 3
    assert ops.default_padding(3, 2) == 2
    assert ops.output_size((56, 56), 7) == (56, 56)
    assert ops.output_size((7, 6), 3, stride=2) == (4, 3)
    assert ops.output_size((6, 7), 3, padding=0) == (4, 5)


def test_backend_selection():
    assert "reference" in ops.available_backends()
    assert ops.get_backend() == "reference"  # set by this file's fixture
    with ops.use_backend("auto"):
        assert ops.get_backend() == "auto"
        x = torch.randn(1, 2, 5, 5)
        assert ops.unfold(x, 3).shape == (1, 2, 9, 25)
    assert ops.get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        ops.set_backend("fast-and-wrong")


# --- bad input --------------------------------------------------------------------------------
def _agg_inputs(**over):
    x = over.pop("x", torch.randn(2, 8, 6, 6))
    weight = over.pop("weight", torch.randn(2, 4, 9, 36))
    return x, weight, over


BAD_AGGREGATION = [
    ("x 3-D", dict(x=torch.randn(8, 6, 6)), ValueError, "x must be 4-D"),
    ("weight 3-D", dict(weight=torch.randn(4, 9, 36)), ValueError, "weight must be 4-D"),
    ("C not divisible", dict(weight=torch.randn(2, 3, 9, 36)), ValueError, "divisible by weight channels"),
    ("L mismatch", dict(weight=torch.randn(2, 4, 9, 35)), ValueError, "weight dim 3 must be H_out"),
    ("L mismatch stride", dict(weight=torch.randn(2, 4, 9, 36), stride=2), ValueError, "weight dim 3"),
    ("K mismatch", dict(weight=torch.randn(2, 4, 25, 36)), ValueError, "kernel_size\\*\\*2"),
    ("batch mismatch", dict(weight=torch.randn(1, 4, 9, 36)), ValueError, "batch size"),
    ("dtype mismatch", dict(weight=torch.randn(2, 4, 9, 36, dtype=torch.float64)), TypeError, "dtype"),
    ("int dtype", dict(x=torch.ones(2, 8, 6, 6, dtype=torch.int64)), TypeError, "floating-point"),
    ("device mismatch", dict(weight=torch.randn(2, 4, 9, 36, device="meta")), ValueError, "is on meta"),
    ("not a tensor", dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("reflect too big", dict(x=torch.randn(2, 8, 3, 6), weight=torch.randn(2, 4, 49, 18), kernel_size=7),
     ValueError, "reflect padding 3 .* smaller than"),
    ("even kernel", dict(kernel_size=4), ValueError, "kernel_size must be odd"),
    ("float kernel", dict(kernel_size=3.0), TypeError, "kernel_size must be an int"),
    ("zero stride", dict(stride=0), ValueError, "stride must be >= 1"),
    ("negative padding", dict(padding=-1), ValueError, "padding must be >= 0"),
    ("bad pad_mode", dict(pad_mode="circular"), ValueError, "pad_mode must be one of"),
]


@pytest.mark.parametrize("name,over,exc,match", BAD_AGGREGATION, ids=[b[0] for b in BAD_AGGREGATION])
def test_aggregation_rejects(name, over, exc, match):
    x, weight, kw = _agg_inputs(**dict(over))
    kw.setdefault("kernel_size", 3)
    with pytest.raises(exc, match=match):
        ops.aggregation(x, weight, **kw)


def test_footprint_that_does_not_fit_zeros_mode():
    with pytest.raises(ValueError, match="does not fit"):
        ops.unfold(torch.randn(1, 1, 2, 2), 7, padding=0, pad_mode="zeros")
    # zero padding has no size limit as long as the window fits the padded map
    assert ops.unfold(torch.randn(1, 1, 2, 2), 7, pad_mode="zeros").shape == (1, 1, 49, 4)


@pytest.mark.parametrize("fn", ["subtraction", "unfold", "centre"])
def test_single_input_ops_reject(fn):
    op = getattr(ops, fn)
    with pytest.raises(ValueError, match="4-D"):
        op(torch.randn(3, 5, 5), 3)
    with pytest.raises(TypeError, match="floating-point"):
        op(torch.ones(1, 3, 5, 5, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="reflect padding"):
        op(torch.randn(1, 3, 1, 5), 3)


def test_subtraction2_rejects():
    a = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match="same shape"):
        ops.subtraction2(a, torch.randn(1, 4, 5, 5), 3)
    with pytest.raises(TypeError, match="dtype"):
        ops.subtraction2(a, a.double(), 3)
    with pytest.raises(ValueError, match="is on meta"):
        ops.subtraction2(a, torch.randn(1, 3, 5, 5, device="meta"), 3)
    with pytest.raises(ValueError, match="x2 must be 4-D"):
        ops.subtraction2(a, a[0], 3)


def test_subtraction2_append_is_the_concatenation():
    """append: the per-pixel oracle's difference, then the appended channels (broadcast from a batch of 1)."""
    x1, x2 = torch.randn(2, 3, 7, 6, dtype=torch.float64), torch.randn(2, 3, 7, 6, dtype=torch.float64)
    for batch in (1, 2):
        extra = torch.randn(batch, 2, 9, 12, dtype=torch.float64)
        with ops.use_backend("reference"):
            out = ops.subtraction2(x1, x2, 3, stride=2, pad_mode="zeros", append=extra)
        assert out.shape == (2, 5, 9, 12)
        torch.testing.assert_close(out[:, :3], oracle.subtraction2(x1, x2, 3, 2, mode="zeros"))
        torch.testing.assert_close(out[:, 3:], extra.expand(2, -1, -1, -1))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_subtraction2_rejects_a_bad_append(backend):
    a = torch.randn(2, 3, 5, 5)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"append must be \(1 or 2, E, 9, 25\)"):
            ops.subtraction2(a, a, 3, append=torch.randn(2, 2, 9, 24))
        with pytest.raises(ValueError, match="append must be"):
            ops.subtraction2(a, a, 3, append=torch.randn(3, 2, 9, 25))
        with pytest.raises(TypeError, match="append dtype"):
            ops.subtraction2(a, a, 3, append=torch.randn(1, 2, 9, 25, dtype=torch.float64))
        with pytest.raises(ValueError, match="append must be 4-D"):
            ops.subtraction2(a, a, 3, append=torch.randn(2, 9, 25))


def test_all_combinations_of_small_footprints_run():
    """Every (k, s, d, mode) on a map just big enough: shapes agree with output_size."""
    for k, s, d, mode in itertools.product((1, 3, 5), (1, 2, 3), (1, 2), MODES):
        pad = ops.default_padding(k, d)
        h = w = max(pad + 1, 3)
        x = torch.randn(1, 2, h, w)
        ho, wo = ops.output_size((h, w), k, s, None, d)
        assert ops.unfold(x, k, s, None, d, mode).shape == (1, 2, k * k, ho * wo)


def test_tap_softmax_is_the_softmax_over_the_taps():
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64) * 5
    expected = torch.empty_like(x)
    for n, c, pos in itertools.product(range(2), range(3), range(7)):  # per column, in the textbook form
        col = x[n, c, :, pos]
        e = torch.exp(col - col.max())
        expected[n, c, :, pos] = e / e.sum()
    for backend in ("reference", "auto"):
        with ops.use_backend(backend):
            torch.testing.assert_close(ops.tap_softmax(x), expected)
    with pytest.raises(ValueError, match="4-D"):
        ops.tap_softmax(torch.randn(2, 9, 7))


def test_softmax_aggregation_is_aggregation_of_the_softmax():
    x = torch.randn(2, 6, 7, 6, dtype=torch.float64)
    logits = 4 * torch.randn(2, 3, 9, 42, dtype=torch.float64)
    w = torch.exp(logits) / torch.exp(logits).sum(2, keepdim=True)  # textbook softmax over the taps
    expected = oracle.aggregation(x, w, 3, mode="zeros")
    for backend in ("reference", "auto"):
        with ops.use_backend(backend):
            torch.testing.assert_close(ops.softmax_aggregation(x, logits, 3, pad_mode="zeros"), expected)
    with pytest.raises(ValueError, match="divisible"):
        ops.softmax_aggregation(torch.randn(2, 8, 6, 6), torch.randn(2, 3, 9, 36), 3)


def test_public_ops_serve_meta_tensors():
    """The reference backend serves any device: on meta tensors every public op infers its output's shape."""
    meta = dict(device="meta")
    x, weight = torch.empty(2, 8, 9, 7, **meta), torch.empty(2, 4, 9, 63, **meta)
    s, c = torch.empty(8, **meta), torch.empty(3, 8, **meta)
    append = torch.empty(1, 2, 9, 63, **meta)
    shapes = {
        "unfold": (ops.unfold(x, 3), (2, 8, 9, 63)),
        "tap_softmax": (ops.tap_softmax(weight), (2, 4, 9, 63)),
        "aggregation": (ops.aggregation(x, weight, 3), (2, 8, 9, 7)),
        "softmax_aggregation": (ops.softmax_aggregation(x, weight, 3), (2, 8, 9, 7)),
        "subtraction2": (ops.subtraction2(x, x, 3, append=append), (2, 10, 9, 63)),
        "affine_relu_conv1x1": (ops.affine_relu_conv1x1(x, s, s, c), (2, 3, 9, 7)),
        "affine_relu_maxpool2x2": (ops.affine_relu_maxpool2x2(x, s, s), (2, 8, 4, 3)),
        "batchnorm_relu_maxpool2x2": (ops.batchnorm_relu_maxpool2x2(x, s, s, 1e-5)[0], (2, 8, 4, 3)),
    }
    for name, (out, shape) in shapes.items():
        assert out.device.type == "meta" and out.shape == shape, name
