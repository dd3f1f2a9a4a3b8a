"""The reference ops against the per-pixel loop oracle, gradchecks, and bad input."""

from __future__ import annotations

import contextlib
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


def test_clique_products_match_loop():
    q, k = torch.randn(2, 3, 9, 11, dtype=torch.float64), torch.randn(2, 3, 9, 11, dtype=torch.float64)
    out = ops.clique_products(q, k)
    assert out.is_contiguous()
    torch.testing.assert_close(out, oracle.clique_products(q, k))
    assert torch.autograd.gradcheck(ops.clique_products, (q.requires_grad_(), k.requires_grad_()))


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


def _footprint_ops(x: torch.Tensor, k: int, d: int) -> dict:
    """Every public op that takes a footprint, on x (N, C, H, W), as calls of no argument. The attention weights are
    (N, 1, K, L) and the BN's (C,): the footprint is checked before they are (nothing K-sized is built here)."""
    n, c, h, w = x.shape
    fp = dict(kernel_size=k, dilation=d, pad_mode="zeros")
    weight, vec, conv = torch.randn(n, 1, 9, h * w), torch.randn(c), torch.randn(3, c)
    return {
        "aggregation": lambda: ops.aggregation(x, weight, **fp),
        "softmax_aggregation": lambda: ops.softmax_aggregation(x, weight, **fp),
        "subtraction": lambda: ops.subtraction(x, **fp),
        "subtraction2": lambda: ops.subtraction2(x, x, **fp),
        "subtraction2 append": lambda: ops.subtraction2(x, x, **fp, append=weight),
        "unfold": lambda: ops.unfold(x, **fp),
        "centre": lambda: ops.centre(x, **fp),
        "subtraction2_batchnorm_relu_conv1x1": lambda: ops.subtraction2_batchnorm_relu_conv1x1(
            x, x, vec, vec, 1e-5, conv, **fp),
    }


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_footprint_whose_gathered_tensor_exceeds_memory_is_refused(backend):
    """Zero padding admits any kernel_size. One whose (N, C, K, L) tensor would exceed the device's memory (4001 on
    this map: K = 16 million taps per pixel, about 1.2 TiB) is refused by every footprint op with one line naming the
    footprint, the shape and the size, before anything K-sized is built."""
    x = torch.randn(2, 4, 40, 60)
    with ops.use_backend(backend):
        for name, call in _footprint_ops(x, 4001, 1).items():
            if name == "centre":  # gathers one tap: no K-sized tensor
                assert call().shape == (2, 4, 1, 2400)
                continue
            with pytest.raises(ValueError) as info:
                call()
            message = str(info.value)
            assert "\n" not in message, name
            for part in ("kernel_size=4001", "(2, 4, 40, 60)", "K = 16008001", "TiB, more than the", "cpu memory"):
                assert part in message, (name, part, message)


@pytest.mark.parametrize("k,d", [(7, 1), (3, 3)])
def test_zero_padded_footprint_of_extent_twice_the_map_runs(k, d):
    """A window of extent 2 * size - 1 (7 on a 4 px side) reaches the far corner: the ops agree with the per-pixel
    oracle on every backend; the outer taps of the corner pixels read zeros."""
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    x2 = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    weight = torch.randn(2, 3, k * k, 24, dtype=torch.float64)
    args = (k, 1, None, d, "zeros")
    for backend in ("reference", "auto"):
        with ops.use_backend(backend):
            torch.testing.assert_close(ops.unfold(x, *args), oracle.unfold(x, *args))
            torch.testing.assert_close(ops.subtraction2(x, x2, *args), oracle.subtraction2(x, x2, *args))
            torch.testing.assert_close(ops.aggregation(x, weight, *args), oracle.aggregation(x, weight, *args))
    taps = ops.unfold(x, *args)
    assert taps[:, :, 0, 0].abs().sum() == 0  # the top-left pixel's top-left tap: padding
    assert taps[:, :, 0, -1].abs().sum() > 0  # the same tap at the bottom-right pixel: the map's top-left pixel


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
        "affine_relu_conv1x1 residual": (ops.affine_relu_conv1x1(x, s, s, c, residual=torch.empty(2, 3, 9, 7, **meta)),
                                         (2, 3, 9, 7)),
        "affine_relu_maxpool2x2": (ops.affine_relu_maxpool2x2(x, s, s), (2, 8, 4, 3)),
        "conv1x1_affine_relu_maxpool2x2": (ops.conv1x1_affine_relu_maxpool2x2(x, c, s[:3], s[:3]), (2, 3, 4, 3)),
        "batchnorm_relu_maxpool2x2": (ops.batchnorm_relu_maxpool2x2(x, s, s, 1e-5)[0], (2, 8, 4, 3)),
    }
    for name, (out, shape) in shapes.items():
        assert out.device.type == "meta" and out.shape == shape, name


# Public names that are not ops on tensors (the rest of ops.__all__ must be in _meta_calls).
NOT_OPS = {"FUSED_OPS", "PAD_MODES", "Footprint", "available_backends", "default_padding", "fusion", "fusion_enabled",
           "get_backend", "output_size", "resolve_footprint", "set_backend", "set_fusion", "use_backend"}


def _meta_calls(device: str, requires_grad: bool) -> dict:
    """Every public op of torchsan.ops on random (or, on meta, unallocated) inputs of ``device``, as calls."""
    def t(*size):
        return torch.randn(*size, device=device).requires_grad_(requires_grad)

    def running(size):  # a BN's running mean and variance
        return torch.randn(size, device=device), torch.rand(size, device=device) + 0.5

    x, x2, logits, append = t(2, 8, 9, 7), t(2, 8, 9, 7), t(2, 4, 9, 63), t(1, 2, 9, 63)
    v, v2, conv, conv2 = t(8), t(10), t(3, 8), t(3, 10)
    return {
        "aggregation": lambda: ops.aggregation(x, logits, 3),
        "softmax_aggregation": lambda: ops.softmax_aggregation(x, logits, 3, pad_mode="zeros"),
        "subtraction": lambda: ops.subtraction(x, 3, stride=2),
        "subtraction2": lambda: ops.subtraction2(x, x2, 3, append=append),
        "unfold": lambda: ops.unfold(x, 3),
        "centre": lambda: ops.centre(x, 3),
        "clique_products": lambda: ops.clique_products(logits, t(2, 4, 9, 63)),
        "channel_var_mean": lambda: ops.channel_var_mean(x),
        "tap_softmax": lambda: ops.tap_softmax(logits),
        "affine_relu_conv1x1": lambda: ops.affine_relu_conv1x1(x, v, v, conv),
        "conv1x1": lambda: ops.conv1x1(x, conv, t(3)),
        "batchnorm_relu_conv1x1": lambda: ops.batchnorm_relu_conv1x1(x, v, v, 1e-5, conv, t(3)),
        "subtraction2_batchnorm_relu_conv1x1": lambda: ops.subtraction2_batchnorm_relu_conv1x1(
            x, x2, v2, v2, 1e-5, conv2, kernel_size=3, append=append),
        "affine_relu_maxpool2x2": lambda: ops.affine_relu_maxpool2x2(x, v, v),
        "conv1x1_affine_relu_maxpool2x2": lambda: ops.conv1x1_affine_relu_maxpool2x2(x, conv, t(3), t(3)),
        "conv1x1_batchnorm_relu_maxpool2x2": lambda: ops.conv1x1_batchnorm_relu_maxpool2x2(x, conv, t(3), t(3), 1e-5),
        "batchnorm_relu_maxpool2x2": lambda: ops.batchnorm_relu_maxpool2x2(x, v, v, 1e-5),
        "pairwise_logits": lambda: ops.pairwise_logits(  # (its batch statistics are not differentiable)
            x, x2, (v2, v2, 1e-5, None, None), conv2, (t(3), t(3), 1e-5, None, None), t(4, 3), t(4), kernel_size=3,
            append=append)[0],
        "pairwise_attention": lambda: ops.pairwise_attention(  # running statistics; values x, 4 weight channels
            x, x2, x, (v2, v2, 1e-5, *running(10)), conv2, (t(3), t(3), 1e-5, *running(3)), t(4, 3), t(4),
            kernel_size=3, append=append),
        "patchwise_attention": lambda: ops.patchwise_attention(  # 18 = 2 weight channels x 9 taps; values x
            x, x2, x, (v2.repeat(8), t(80), 1e-5, *running(80)), t(3, 80), (t(3), t(3), 1e-5, *running(3)), t(18, 3),
            t(18), kernel_size=3),
        "patchwise_weights": lambda: ops.patchwise_weights(  # running statistics: leaves without gradients
            x, x2, (v2.repeat(8), t(80), 1e-5, *running(80)), t(3, 80), (t(3), t(3), 1e-5, *running(3)), t(12, 3),
            t(12), kernel_size=3)[0],
        "backend_for": lambda: ops.backend_for(x),
        "should_fuse": lambda: ops.should_fuse("softmax_aggregation", x),
    }


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_every_public_op_serves_meta_tensors(requires_grad, autocast):
    """Shape checking without allocating: every public op on meta tensors gives the shapes of its CPU run, with and
    without gradients, and inside a CPU autocast region (which asks for an autocast state the meta device does not
    have: torch.is_autocast_enabled("meta") raises). Autocast casts CPU tensors only, as for torch's own ops, so on
    meta the dtype stays float32; outside autocast it is the CPU run's."""
    meta, cpu = _meta_calls("meta", requires_grad), _meta_calls("cpu", requires_grad)
    assert meta.keys() == set(ops.__all__) - NOT_OPS  # a new op gets a case here
    region = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ops.use_backend("auto"), region:
        for name, call in meta.items():
            got, want = call(), cpu[name]()
            if not isinstance(want, (torch.Tensor, tuple)):  # the reference backend serves meta, and fuses nothing
                assert got == {"backend_for": "reference", "should_fuse": False}[name], name
                continue
            got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
            for g, w in zip(got, want, strict=True):
                assert g.device.type == "meta" and g.shape == w.shape, name
                assert g.dtype == (torch.float32 if autocast else w.dtype), name
                assert g.requires_grad == requires_grad, name
            if requires_grad:  # the backward passes run on meta too
                torch.autograd.backward(got, [torch.ones_like(g) for g in got])


# --- empty batches and channels ---------------------------------------------------------------------------------------
# (N, C, H, W), kernel_size, stride, dilation, pad_mode: a batch of 0 (as a data loader's last, filtered batch can be),
# 0 channels, both, on maps as small as the footprint allows.
EMPTY_CASES = [
    ((0, 4, 5, 6), 3, 1, 1, "reflect"),
    ((0, 4, 5, 6), 5, 2, 1, "zeros"),
    ((0, 4, 2, 3), 3, 1, 1, "zeros"),
    ((0, 4, 1, 7), 1, 1, 1, "reflect"),
    ((2, 0, 5, 6), 3, 1, 1, "reflect"),
    ((2, 0, 4, 4), 3, 2, 2, "zeros"),
    ((0, 0, 5, 6), 3, 1, 1, "reflect"),
]


def _empty_case_ops(shape: tuple[int, ...], k: int, s: int, d: int, mode: str) -> dict:
    """name -> (inputs (random, requiring grad), op on them, its output shapes)."""
    n, c, h, w = shape
    ho, wo = ops.output_size((h, w), k, s, None, d)
    kk, length = k * k, ho * wo
    fp = (k, s, None, d, mode)

    def t(*size):
        return torch.randn(*size, dtype=torch.float64, requires_grad=True)

    cases = {
        "aggregation": ((t(*shape), t(n, 1, kk, length)), lambda x, w: ops.aggregation(x, w, *fp), [(n, c, ho, wo)]),
        "softmax_aggregation": ((t(*shape), t(n, 1, kk, length)), lambda x, w: ops.softmax_aggregation(x, w, *fp),
                                [(n, c, ho, wo)]),
        "subtraction": ((t(*shape),), lambda x: ops.subtraction(x, *fp), [(n, c, kk, length)]),
        "subtraction2": ((t(*shape), t(*shape)), lambda a, b: ops.subtraction2(a, b, *fp), [(n, c, kk, length)]),
        "subtraction2 append": ((t(*shape), t(*shape), t(1, 2, kk, length)),
                                lambda a, b, e: ops.subtraction2(a, b, *fp, append=e), [(n, c + 2, kk, length)]),
        "unfold": ((t(*shape),), lambda x: ops.unfold(x, *fp), [(n, c, kk, length)]),
        "centre": ((t(*shape),), lambda x: ops.centre(x, *fp), [(n, c, 1, length)]),
        "clique_products": ((t(n, c, kk, length), t(n, c, kk, length)), ops.clique_products, [(n, kk, kk, length)]),
        "tap_softmax": ((t(n, c, kk, length),), ops.tap_softmax, [(n, c, kk, length)]),
        "affine_relu_conv1x1": ((t(*shape), t(c), t(c), t(3, c), t(3)), ops.affine_relu_conv1x1, [(n, 3, h, w)]),
        "conv1x1": ((t(*shape), t(3, c), t(3)), ops.conv1x1, [(n, 3, h, w)]),
        "affine_relu_conv1x1 residual": ((t(*shape), t(c), t(c), t(3, c), t(3), t(n, 3, h, w)),
                                         lambda *a: ops.affine_relu_conv1x1(*a[:-1], residual=a[-1]), [(n, 3, h, w)]),
    }
    if n > 0:  # a training BN needs values: with C = 0 the appended channels still have them
        cases["subtraction2_batchnorm_relu_conv1x1 append"] = (
            (t(*shape), t(*shape), t(1, 2, kk, length), t(c + 2), t(c + 2), t(3, c + 2), t(3)),
            lambda a, b, e, *bn_conv: ops.subtraction2_batchnorm_relu_conv1x1(a, b, *bn_conv[:2], 1e-5, *bn_conv[2:],
                                                                              *fp, append=e),
            [(n, 3, kk, length), (c + 2,), (c + 2,)])
        cases["pairwise_logits append"] = (
            (t(*shape), t(*shape), t(1, 2, kk, length), t(c + 2), t(c + 2), t(3, c + 2), t(3), t(3), t(2, 3), t(2)),
            lambda a, b, e, w1, b1, c1, w2, b2, c2, bias: ops.pairwise_logits(
                a, b, (w1, b1, 1e-5, None, None), c1, (w2, b2, 1e-5, None, None), c2, bias, *fp, append=e)[0],
            [(n, 2, kk, length)])
    cz = c * (kk + 1)  # patchwise: eval-mode BNs (running statistics), which take empty inputs
    cases["patchwise_weights"] = (
        (t(*shape), t(*shape), t(cz), t(cz), t(3, cz), t(3), t(3), t(2, 3), t(2)),
        lambda a, b, w1, b1, c1, w2, b2, c2, bias: ops.patchwise_weights(
            a, b, (w1, b1, 1e-5, torch.zeros(cz, dtype=a.dtype), torch.ones(cz, dtype=a.dtype)), c1,
            (w2, b2, 1e-5, torch.zeros(3, dtype=a.dtype), torch.ones(3, dtype=a.dtype)), c2, bias, *fp)[0],
        [(n, 2, 1, length)])
    if min(h, w) >= 2:
        cases["affine_relu_maxpool2x2"] = ((t(*shape), t(c), t(c)), ops.affine_relu_maxpool2x2,
                                           [(n, c, h // 2, w // 2)])
        cases["conv1x1_affine_relu_maxpool2x2"] = ((t(*shape), t(3, c), t(3), t(3)), ops.conv1x1_affine_relu_maxpool2x2,
                                                   [(n, 3, h // 2, w // 2)])
        if n > 0:  # a training BN needs values: with Cin = 0 the convolution's are zeros
            cases["conv1x1_batchnorm_relu_maxpool2x2"] = (
                (t(*shape), t(3, c), t(3), t(3)), lambda *a: ops.conv1x1_batchnorm_relu_maxpool2x2(*a, 1e-5),
                [(n, 3, h // 2, w // 2), (3,), (3,)])
    return cases


@pytest.mark.parametrize("case", EMPTY_CASES, ids=lambda c: f"{c[0]}-k{c[1]}s{c[2]}d{c[3]}-{c[4]}")
def test_empty_batches_and_channels(case):
    """Every op takes N = 0 and C = 0 on every backend, forward and backward: outputs of the right (empty) shape, and
    gradients of the inputs' shapes, the same on every backend (zero where the output is empty)."""
    results = {}
    for backend in ("reference", "cpu") if _cpu.available() else ("reference",):
        torch.manual_seed(0)
        for name, (inputs, op, shapes) in _empty_case_ops(*case).items():
            with ops.use_backend(backend):
                out = op(*inputs)
                outs = out if isinstance(out, tuple) else (out,)
                assert [tuple(o.shape) for o in outs] == shapes, (backend, name)
                # (torch.randn, not randn_like: that follows the output's strides, which differ between backends)
                torch.autograd.backward(outs, [torch.randn(o.shape, dtype=o.dtype) for o in outs])
            grads = [t.grad for t in inputs]
            assert [g.shape for g in grads] == [t.shape for t in inputs], (backend, name)
            if all(o.numel() == 0 for o in outs):
                assert all(not g.any() for g in grads), (backend, name)
            results.setdefault(name, []).append((outs, grads))
    for name, ((out_a, grad_a), *others) in results.items():
        for out_b, grad_b in others:
            torch.testing.assert_close(out_b, out_a, msg=name)
            torch.testing.assert_close(grad_b, grad_a, msg=name)

