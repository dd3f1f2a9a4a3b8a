"""The cpu backend's BatchNorm-ReLU-conv1x1 ops against the reference backend: ``affine_relu_conv1x1`` (an eval-mode
BN as scale and shift), ``batchnorm_relu_conv1x1`` (a training-mode BN, gradients through the batch statistics)
(``ops/_cpu/conv1x1.py``), and ``subtraction2_batchnorm_relu_conv1x1``, which gathers z = subtraction2(x1, x2) with
its append into the fused triple without writing z (``ops/_cpu/subtraction2_conv1x1.py``)."""

from __future__ import annotations

import pytest
import torch

from _helpers import DTYPES, MODES, assert_matches_reference, case_id, needs_cpu_kernels
from torchsan import ops
from torchsan.ops import _cpu

pytestmark = needs_cpu_kernels
F64 = dict(dtype=torch.float64)


# --- conv1x1 (plain, inference) --------------------------------------------------------------------------------------
CONV1X1_CASES = [(2, 5, 7, (9, 11), True), (1, 64, 64, (112, 112), False), (3, 3, 13, (4, 5), True),
                 (1, 16, 9, (3, 3), False), (2, 8, 6, (17,), True), (1, 1, 1, (1, 1), True),
                 (2, 40, 33, (4099,), False), (1, 64, 256, (56, 56), False), (3, 6, 5, (), True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,cin,cout,spatial,bias", CONV1X1_CASES, ids=str)
def test_conv1x1_matches_reference_and_the_reference_matches_conv2d(dtype, n, cin, cout, spatial, bias):
    gen = torch.Generator().manual_seed(cin * 31 + cout)
    x = torch.randn(n, cin, *spatial, dtype=dtype, generator=gen)
    w = torch.randn(cout, cin, dtype=dtype, generator=gen)
    b = torch.randn(cout, dtype=dtype, generator=gen) if bias else None
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        with ops.use_backend("cpu"):
            fused = ops.conv1x1(x, w, b)
        with ops.use_backend("reference"):
            expected = ops.conv1x1(x, w, b)
        planes = x.reshape(n, cin, -1, 1)  # the oracle: torch's own convolution, on any number of spatial dims
        oracle = torch.nn.functional.conv2d(planes, w[:, :, None, None], b).reshape(n, cout, *spatial)
    torch.testing.assert_close(fused, expected, **tol)
    torch.testing.assert_close(expected, oracle, **tol)


@pytest.mark.parametrize("shape", [(0, 5, 4, 4), (2, 0, 4, 4), (2, 5, 0, 3)], ids=str)
def test_conv1x1_takes_empty_inputs_without_a_gradient(shape):
    x, w, b = torch.randn(*shape), torch.randn(7, shape[1]), torch.randn(7)
    with torch.no_grad(), ops.use_backend("cpu"):
        y = ops.conv1x1(x, w, b)
    assert y.shape == (shape[0], 7, *shape[2:])
    torch.testing.assert_close(y, b.view(1, 7, 1, 1).expand_as(y) if shape[1] == 0 else torch.zeros_like(y))


@pytest.mark.parametrize("layout", ["sliced", "channels_last", "transposed"])
def test_conv1x1_takes_any_strides(layout):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 20, 9, 13, generator=gen)
    x = {"sliced": base[:, 3:15], "channels_last": base.contiguous(memory_format=torch.channels_last),
         "transposed": base.transpose(2, 3)}[layout]
    w, b = torch.randn(11, x.shape[1], generator=gen), torch.randn(11, generator=gen)
    with torch.no_grad(), ops.use_backend("cpu"):
        y = ops.conv1x1(x, w, b)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w[:, :, None, None], b), rtol=1e-5, atol=1e-5)


def test_conv1x1_with_a_gradient_runs_the_reference():
    x, w, b = (torch.randn(*s, **F64, requires_grad=True) for s in ((2, 5, 6, 7), (4, 5), (4,)))
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.conv1x1, (x, w, b))
        assert torch.autograd.gradcheck(lambda t: ops.conv1x1(t, w.detach()), (x,))


@pytest.mark.parametrize("spatial", [(14, 14), (300,), (56, 56)])
def test_conv1x1_same_bits_with_1_and_3_threads(spatial):
    from _helpers import per_thread_count

    gen = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(1, 24, *spatial, generator=gen), torch.randn(40, 24, generator=gen), torch.randn(40)
    with torch.no_grad(), ops.use_backend("cpu"):
        outs = per_thread_count(lambda: ops.conv1x1(x, w, b), counts=(1, 3))
    assert torch.equal(outs[0], outs[1])


def test_the_rule_for_a_plain_conv1x1_kernel():
    cin, positions = _cpu.CONV1X1_KERNEL_MAX_IN_CHANNELS, _cpu.CONV1X1_KERNEL_MIN_POSITIONS
    cout = _cpu.CONV1X1_MAX_OUT_CHANNELS
    with torch.no_grad():
        assert _cpu.fuses("conv1x1", torch.empty(1, cin, positions), out_channels=cout)
        assert _cpu.fuses("conv1x1", torch.empty(3, 1, positions + 1), out_channels=1)
        assert not _cpu.fuses("conv1x1", torch.empty(1, cin + 1, positions), out_channels=cout)
        assert not _cpu.fuses("conv1x1", torch.empty(1, cin, positions), out_channels=cout + 1)
        assert not _cpu.fuses("conv1x1", torch.empty(1, cin, positions - 1), out_channels=cout)
    assert not _cpu.fuses("conv1x1", torch.empty(1, cin, positions), out_channels=cout)  # autograd on


def test_a_san_with_a_narrow_stage_0_runs_it_and_matches_its_modules(monkeypatch):
    import timm

    from torchsan.layers import fused

    torch.manual_seed(7)
    model = timm.create_model("san10_pairwise", small_input=True, num_classes=10, widths=(16, 32, 32, 64, 64),
                              stem_width=16, layers=(1, 1, 1, 1, 1), share_planes=4).eval()
    for m in model.modules():  # BNs that do something, so that a wrong route shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64)  # small_input: stage 0 runs at 64 x 64 (4096 positions), 16 -> 16 channels
    calls = []
    kernel = ops.conv1x1
    monkeypatch.setattr(fused.ops, "conv1x1", lambda *a: calls.append(a[0].shape) or kernel(*a))
    with torch.no_grad(), ops.use_backend("cpu"):
        y = model(x)
        assert calls == [(2, 16, 64, 64)]
        with ops.fusion(False):
            expected = model(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_a_narrow_1x1_convolution_on_a_large_map_runs_the_kernel_for_inference_only(monkeypatch):
    from torchsan.layers import fused

    conv = torch.nn.Conv2d(64, 64, 1, bias=False)
    x = torch.randn(1, 64, 56, 56)
    calls = []
    kernel = ops.conv1x1
    monkeypatch.setattr(fused.ops, "conv1x1", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad(), ops.use_backend("cpu"):
        y = fused.conv1x1(conv, x)
        sliced = torch.randn(1, 128, 56, 56)[:, :64]
        torch.testing.assert_close(fused.conv1x1(conv, sliced), conv(sliced), rtol=1e-4, atol=1e-4)
        assert len(calls) == 2
        assert fused.conv1x1(torch.nn.Conv2d(96, 64, 1), torch.randn(1, 96, 56, 56)).shape == (1, 64, 56, 56)
        assert len(calls) == 2  # wider inputs: the BLAS's matrix product
        torch.testing.assert_close(y, conv(x), rtol=1e-4, atol=1e-4)
    seen = []
    with torch.no_grad(), ops.use_backend("cpu"):
        handle = conv.register_forward_hook(lambda *a: seen.append(1))  # a hook must see the module run
        fused.conv1x1(conv, x)
        handle.remove()
    assert seen == [1]
    with ops.use_backend("cpu"):
        fused.conv1x1(conv, x.requires_grad_())  # with a gradient: the module
    assert len(calls) == 2


# --- affine_relu_conv1x1 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,cin,cout,spatial,bias", [(2, 18, 16, (9, 23), False), (3, 16, 8, (49, 97), True),
                                                     (1, 5, 3, (1, 7), True), (2, 40, 3, (1, 4099), True),
                                                     (2, 7, 13, (3, 300), True), (1, 1, 1, (1, 1), False),
                                                     (2, 130, 9, (17, 17), True), (2, 6, 5, (4099,), True)])
def test_affine_relu_conv1x1_matches_reference(dtype, n, cin, cout, spatial, bias):
    x = torch.randn(n, cin, *spatial, dtype=dtype)
    params = [torch.randn(cin, dtype=dtype), torch.randn(cin, dtype=dtype), torch.randn(cout, cin, dtype=dtype)]
    if bias:
        params.append(torch.randn(cout, dtype=dtype))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    assert_matches_reference(lambda *t: ops.affine_relu_conv1x1(*t), x, *params, **tol)


@pytest.mark.parametrize("bias", [True, False])
def test_affine_relu_conv1x1_gradcheck_and_gradgradcheck(bias):
    args = [torch.randn(2, 3, 4, 5, **F64), torch.randn(3, **F64), torch.randn(3, **F64), torch.randn(2, 3, **F64)]
    if bias:
        args.append(torch.randn(2, **F64))
    args = [t.requires_grad_(True) for t in args]
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.affine_relu_conv1x1, args)
        assert torch.autograd.gradgradcheck(ops.affine_relu_conv1x1, args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,cin,cout,spatial,bias", [(2, 18, 16, (9, 23), False), (3, 16, 13, (49, 97), True),
                                                     (1, 5, 3, (1, 7), True), (2, 7, 6, (3, 300), True),
                                                     (2, 6, 5, (4099,), False), (0, 4, 3, (5, 6), True),
                                                     (2, 0, 3, (5, 6), True)])
def test_affine_relu_conv1x1_adds_a_residual_in_its_epilogue(dtype, n, cin, cout, spatial, bias):
    """Without gradients: the inference kernel, the residual added as the output is stored (odd widths: the partial
    vectors at each sub-block's end); with gradients: the op's output plus the residual, gradients for all."""
    gen = torch.Generator().manual_seed(n * cin + cout)
    x, residual = torch.randn(n, cin, *spatial, dtype=dtype, generator=gen), torch.randn(
        n, cout, *spatial, dtype=dtype, generator=gen)
    params = [torch.randn(cin, dtype=dtype, generator=gen), torch.randn(cin, dtype=dtype, generator=gen),
              torch.randn(cout, cin, dtype=dtype, generator=gen), torch.randn(cout, dtype=dtype, generator=gen)
              if bias else None]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        with ops.use_backend("reference"):
            expected = ops.affine_relu_conv1x1(x, *params) + residual
        with ops.use_backend("cpu"):
            fused = ops.affine_relu_conv1x1(x, *params, residual=residual)
            # the kernel's epilogue adds the residual to the same sum the op without it stores: the same bits
            assert torch.equal(fused, ops.affine_relu_conv1x1(x, *params) + residual)
    torch.testing.assert_close(fused, expected, **tol)

    def with_gradients(x, scale, shift, weight, *rest):  # rest: (bias,) residual
        return ops.affine_relu_conv1x1(x, scale, shift, weight, rest[0] if bias else None, residual=rest[-1])

    assert_matches_reference(with_gradients, x, *(p for p in params if p is not None), residual, **tol)


@pytest.mark.parametrize("spatial,residual", [((14, 14), True), ((7, 9), False), ((300,), True)])
def test_affine_relu_conv1x1_one_small_image_same_bits_with_1_and_3_threads(spatial, residual):
    # one image of fewer sub-blocks than threads (300 positions: two, the second partial): with 3 threads they share
    # its staged rows and its product's row blocks
    from _helpers import per_thread_count

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 70, *spatial, generator=gen)
    params = [torch.rand(70, generator=gen) + 0.5, torch.randn(70, generator=gen),
              torch.randn(45, 70, generator=gen) / 8, torch.randn(45, generator=gen)]
    r = torch.randn(1, 45, *spatial, generator=gen) if residual else None
    with torch.no_grad():
        with ops.use_backend("cpu"):
            outs = per_thread_count(lambda: ops.affine_relu_conv1x1(x, *params, residual=r), counts=(1, 3))
        with ops.use_backend("reference"):
            expected = ops.affine_relu_conv1x1(x, *params) + (0 if r is None else r)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1], expected, rtol=1e-4, atol=1e-4)


def test_affine_relu_conv1x1_residual_gradcheck_and_rejects_a_bad_residual():
    args = [torch.randn(2, 3, 4, 5, **F64), torch.randn(3, **F64), torch.randn(3, **F64), torch.randn(2, 3, **F64),
            torch.randn(2, **F64), torch.randn(2, 2, 4, 5, **F64)]
    args = [t.requires_grad_(True) for t in args]
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *t: ops.affine_relu_conv1x1(*t[:-1], residual=t[-1]), args)
        x, scale, shift, w, b, _ = (t.detach() for t in args)
        for bad, match in [(torch.randn(2, 3, 4, 5, **F64), "residual must have the output's shape"),
                           (torch.randn(2, 2, 4, 5), "residual dtype"), ([0.0], "residual must be a torch.Tensor")]:
            with pytest.raises((ValueError, TypeError), match=match):
                ops.affine_relu_conv1x1(x, scale, shift, w, b, residual=bad)


def test_affine_relu_conv1x1_propagates_nan_like_relu():
    x = torch.randn(2, 3, 4, 5, **F64)
    x[0, 0, 0, 0] = float("nan")
    args = (x, torch.ones(3, **F64), torch.zeros(3, **F64), torch.randn(2, 3, **F64))
    with ops.use_backend("cpu"):
        fused = ops.affine_relu_conv1x1(*args)
    with ops.use_backend("reference"):
        ref = ops.affine_relu_conv1x1(*args)
    assert torch.equal(fused.isnan(), ref.isnan()) and fused.isnan().any()


# --- batchnorm_relu_conv1x1 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,c_out", [((2, 5, 9, 31), 3), ((3, 4, 4100), 6), ((2, 40, 7, 5), 33)], ids=str)
def test_batchnorm_relu_conv1x1_matches_reference(shape, c_out, affine):
    # Gradients through the batch statistics; the mean is large against the spread, so a statistic computed as
    # E[x^2] - E[x]^2 would fail here.
    c = shape[1]
    x = torch.randn(shape, **F64) * 0.5 + 20.0
    bn = [torch.rand(c, **F64) + 0.5, torch.randn(c, **F64)] if affine else []
    conv = [torch.randn(c_out, c, **F64), torch.randn(c_out, **F64)]

    def call(x, *rest):
        weight, bias = (rest[0], rest[1]) if affine else (None, None)
        y, mean, var = ops.batchnorm_relu_conv1x1(x, weight, bias, 1e-5, *rest[-2:])
        return y + 0.1 * (mean.sum() + var.sum())  # gradients through the returned statistics too

    assert_matches_reference(call, x, *bn, *conv, rtol=1e-9, atol=1e-9, grad_tol=dict(rtol=1e-8, atol=1e-9))


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_relu_conv1x1_gradcheck_and_gradgradcheck(affine):
    x = torch.randn(2, 3, 4, 6, **F64, requires_grad=True)
    w, b = (torch.rand(3, **F64) + 0.5).requires_grad_(), torch.randn(3, **F64, requires_grad=True)
    cw, cb = torch.randn(2, 3, **F64, requires_grad=True), torch.randn(2, **F64, requires_grad=True)
    if affine:
        fn, inputs = (lambda x, w, b, cw, cb: ops.batchnorm_relu_conv1x1(x, w, b, 1e-5, cw, cb)), (x, w, b, cw, cb)
    else:
        fn, inputs = (lambda x, cw: ops.batchnorm_relu_conv1x1(x, None, None, 1e-5, cw)), (x, cw)
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_conv1x1_ops_take_a_permuted_view():
    """A strided x (the clique relation hands gamma a permuted view): values and gradients as the reference's."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 9, 6, **F64, generator=gen).permute(0, 3, 1, 2)  # (2, 6, 7, 9), not contiguous
    assert not x.is_contiguous()
    scale, shift = torch.randn(6, **F64, generator=gen), torch.randn(6, **F64, generator=gen)
    conv, conv_bias = torch.randn(4, 6, **F64, generator=gen), torch.randn(4, **F64, generator=gen)
    tol = dict(rtol=1e-9, atol=1e-9)
    assert_matches_reference(ops.affine_relu_conv1x1, x, scale, shift, conv, conv_bias, **tol)
    assert_matches_reference(lambda x, *rest: ops.batchnorm_relu_conv1x1(x, *rest[:2], 1e-5, *rest[2:])[0],
                             x, scale.abs() + 0.5, shift, conv, conv_bias, **tol)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_batchnorm_relu_conv1x1_rejects_bad_input(backend):
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            ops.batchnorm_relu_conv1x1(torch.randn(1, 3, 1), None, None, 1e-5, torch.randn(2, 3))
        with pytest.raises(ValueError, match="eps must be positive"):
            ops.batchnorm_relu_conv1x1(torch.randn(2, 3, 4), None, None, 0.0, torch.randn(2, 3))
        with pytest.raises(ValueError, match=r"conv_weight must have shape \(Cout, 3\)"):
            ops.batchnorm_relu_conv1x1(torch.randn(2, 3, 4), None, None, 1e-5, torch.randn(2, 4))


# --- subtraction2 + training BN + ReLU + conv1x1 without writing z ---------------------------------------------------
# (kernel_size, stride, dilation, padding, H, W, append batch: None, 1 or N)
RELATION_CASES = [
    (3, 1, 1, None, 9, 11, 1),
    (7, 1, 1, None, 13, 12, 2),
    (7, 2, 1, None, 15, 9, None),
    (5, 1, 2, None, 11, 12, 1),
    (3, 2, 1, 2, 5, 7, 2),
    (3, 3, 2, None, 10, 7, 1),
    (3, 1, 1, 0, 7, 6, None),
    (3, 1, 1, 2, 5, 6, 1),
    (3, 1, 1, None, 5, 21, 1),  # rows wider than the shifted copies take: z's rows gathered a row at a time
]


def _relation_inputs(case, dtype, affine=True, n=2, c=3, e=2, c_out=5):
    k, s, d, p, h, w, batch = case
    fp = ops.resolve_footprint(k, s, p, d, "zeros")
    positions = fp.out_size(h) * fp.out_size(w)
    x1, x2 = torch.randn(n, c, h, w, dtype=dtype), torch.randn(n, c, h, w, dtype=dtype)
    append = None if batch is None else torch.randn(batch, e, k * k, positions, dtype=dtype) * 0.5 + 3.0
    ct = c + (0 if append is None else e)
    bn = [torch.rand(ct, dtype=dtype) + 0.5, torch.randn(ct, dtype=dtype)] if affine else []
    conv = [torch.randn(c_out, ct, dtype=dtype), torch.randn(c_out, dtype=dtype)]
    return (x1, x2, *(() if append is None else (append,)), *bn, *conv), dict(kernel_size=k, stride=s, padding=p,
                                                                                dilation=d)


def _relation_call(has_append, affine, mode, stats=True, **fp):
    def call(x1, x2, *rest):
        rest = list(rest)
        append = rest.pop(0) if has_append else None
        weight, bias = (rest.pop(0), rest.pop(0)) if affine else (None, None)
        y, mean, var = ops.subtraction2_batchnorm_relu_conv1x1(x1, x2, weight, bias, 1e-5, *rest, pad_mode=mode,
                                                               **fp, append=append)
        return y + 0.1 * (mean.sum() + var.sum()) if stats else y  # gradients through the returned statistics too
    return call


def _relation_tolerances(dtype):
    out = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    grad = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-9)
    return dict(out, grad_tol=grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", RELATION_CASES, ids=lambda c: case_id(c) + f"_append{c[6]}")
def test_subtraction2_batchnorm_relu_conv1x1_matches_reference(case, mode, dtype):
    # The reference backend writes z and runs the two ops; the fused one gathers z's rows where it needs them.
    tensors, fp = _relation_inputs(case, dtype)
    tensors = (tensors[0] * 0.5 + 4.0, *tensors[1:])  # a mean large against the spread
    assert_matches_reference(_relation_call(case[6] is not None, True, mode, **fp), *tensors,
                             **_relation_tolerances(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", ["shifted_copies", "padded_planes"])
def test_subtraction2_batchnorm_relu_conv1x1_on_both_sides_of_shifted_max_width(side, dtype):
    """Stride-1 outputs up to ``shifted_max_width`` wide read z's rows from column-shifted copies of the planes, wider
    ones from the padded planes: same function either way."""
    limit = _cpu.kernel_constants()["shifted_max_width"]
    width = limit + (side == "padded_planes")
    case = (3, 1, 1, None, 5, width, 1)
    assert ops.output_size((5, width), 3)[1] == width
    tensors, fp = _relation_inputs(case, dtype)
    for mode in MODES:
        assert_matches_reference(_relation_call(True, True, mode, **fp), *tensors, **_relation_tolerances(dtype))


@pytest.mark.parametrize("mode", MODES)
def test_subtraction2_batchnorm_relu_conv1x1_gradcheck_and_gradgradcheck(mode):
    small = [((3, 1, 1, None, 4, 5, 1), True), ((3, 2, 1, 2, 4, 4, 2), False), ((5, 2, 1, None, 6, 5, None), True)]
    for case, affine in small:
        tensors, fp = _relation_inputs(case, torch.float64, affine=affine, n=2, c=2, c_out=2)
        leaves = [t.requires_grad_(True) for t in tensors]
        call = _relation_call(case[6] is not None, affine, mode, **fp)
        with ops.use_backend("cpu"):
            assert torch.autograd.gradcheck(call, leaves)
            # Double backward differentiates the reference composition (ops/_cpu/_register.py); the full
            # second-order Jacobian costs seconds per case, random projections of it (fast_mode) milliseconds.
            assert torch.autograd.gradgradcheck(call, leaves, fast_mode=True)


def test_subtraction2_batchnorm_relu_conv1x1_rejects_bad_input():
    x = torch.randn(2, 2, 5, 5)
    with pytest.raises(ValueError, match=r"conv_weight must have shape \(Cout, 4\)"):
        ops.subtraction2_batchnorm_relu_conv1x1(x, x, None, None, 1e-5, torch.randn(3, 3), kernel_size=3,
                                                append=torch.randn(1, 2, 9, 25))
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        ops.subtraction2_batchnorm_relu_conv1x1(x, x, torch.randn(2), None, 1e-5, torch.randn(3, 4), kernel_size=3,
                                                append=torch.randn(1, 2, 9, 25))
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # z (1, 2, 1, 1): one value per channel
        ops.subtraction2_batchnorm_relu_conv1x1(x[:1, :, :1, :1], x[:1, :, :1, :1], None, None, 1e-5,
                                                torch.randn(3, 2), kernel_size=1)


# --- pairwise_logits for inference: the whole mapping gamma, z and the hidden layer never written ---------------------
def _logits_inputs(case, dtype, c=3, e=2, c_mid=7, c_out=5, n=2):
    """x1, x2, append (or None) as for the relation cases, and two eval-mode BNs (running statistics) with gamma's
    convolutions: (x1, x2, append, norm1, conv1_weight, norm2, conv2_weight, conv2_bias), footprint kwargs."""
    tensors, fp = _relation_inputs(case, dtype, n=n, c=c, e=e, c_out=c_mid)
    x1, x2 = tensors[:2]
    append = tensors[2] if case[6] is not None else None
    ct = c + (0 if append is None else e)

    def norm(channels, mean_scale):
        return (torch.rand(channels, dtype=dtype) + 0.5, torch.randn(channels, dtype=dtype), 1e-5,
                mean_scale * torch.randn(channels, dtype=dtype), torch.rand(channels, dtype=dtype) + 0.5)

    return (x1, x2, append, norm(ct, 1.0), torch.randn(c_mid, ct, dtype=dtype) / ct**0.5, norm(c_mid, 0.5),
            torch.randn(c_out, c_mid, dtype=dtype) / c_mid**0.5, torch.randn(c_out, dtype=dtype)), fp


def _logits(args, mode, fp, backend):
    x1, x2, append, norm1, w1, norm2, w2, b2 = args
    with ops.use_backend(backend):
        return ops.pairwise_logits(x1, x2, norm1, w1, norm2, w2, b2, pad_mode=mode, append=append, **fp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", RELATION_CASES, ids=lambda c: case_id(c) + f"_append{c[6]}")
def test_pairwise_logits_inference_matches_reference(case, mode, dtype):
    args, fp = _logits_inputs(case, dtype)
    with torch.no_grad():
        ours, ref = _logits(args, mode, fp, "cpu"), _logits(args, mode, fp, "reference")
    assert ours[1:] == (None,) * 4 and ref[1:] == (None,) * 4  # running statistics: none returned
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(ours[0], ref[0], **tol)
    assert ref[0].abs().max() > 1 and (ref[0] > 0).any() and (ref[0] < 0).any()  # not a trivial output


def test_pairwise_logits_inference_runs_the_kernel_only_where_no_gradient_or_batch_statistics(monkeypatch):
    from torchsan.ops._cpu import subtraction2_conv1x1 as module

    args, fp = _logits_inputs((3, 2, 1, None, 9, 8, 1), torch.float64)
    calls = []
    original = module.pairwise_logits_inference_op
    monkeypatch.setattr(module, "pairwise_logits_inference_op", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        expected = _logits(args, "reflect", fp, "reference")[0]
        assert torch.equal(_logits(args, "reflect", fp, "cpu")[0], _logits(args, "reflect", fp, "cpu")[0])
    assert len(calls) == 2
    # a gradient wanted: the reference composition, differentiable, the same values
    w1 = args[4].clone().requires_grad_(True)
    out = _logits((*args[:4], w1, *args[5:]), "reflect", fp, "cpu")[0]
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)
    out.sum().backward()
    assert w1.grad is not None and len(calls) == 2
    # batch statistics (training mode): the reference composition, which returns them
    norm1 = (*args[3][:3], None, None)
    with torch.no_grad():
        out = _logits((*args[:3], norm1, *args[4:]), "reflect", fp, "cpu")
    assert out[1] is not None and len(calls) == 2


@pytest.mark.parametrize("case,n", [((7, 1, 1, None, 30, 31, 1), 2), ((7, 1, 1, None, 30, 31, 1), 1),
                                    ((3, 1, 1, 1, 5, 5, 1), 1)],
                         ids=["large", "large_one_image", "one_small_image"])
def test_pairwise_logits_inference_with_1_and_2_threads(case, n):
    # Large: the register-tiled products, the same bits whatever the threads (for one image, its pixel chunks differ
    # with the thread count and start within output rows). One small image (K L within a sub-block): the products in
    # torch's BLAS, whose sums may be split differently for another thread count.
    from _helpers import per_thread_count

    args, fp = _logits_inputs(case, torch.float32, c=6, c_mid=16, c_out=8, n=n)
    with torch.no_grad():
        outs = per_thread_count(lambda: _logits(args, "reflect", fp, "cpu")[0])
        ref = _logits(args, "reflect", fp, "reference")[0]
    assert outs[0].shape[0] == n
    if case[4] > 5:
        assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[1], ref, rtol=1e-5, atol=1e-5)


# --- pairwise_attention for inference: the logits, their softmax and the aggregation per block of output rows -------
def _attention(args, values, mode, fp, backend):
    x1, x2, append, norm1, w1, norm2, w2, b2 = args
    with ops.use_backend(backend):
        return ops.pairwise_attention(x1, x2, values, norm1, w1, norm2, w2, b2, pad_mode=mode, append=append, **fp)


def _values(args, channels_per_weight=3):
    gen = torch.Generator().manual_seed(7)
    x1, w2 = args[0], args[6]
    return torch.randn(x1.shape[0], channels_per_weight * w2.shape[0], *x1.shape[2:], dtype=x1.dtype, generator=gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", RELATION_CASES, ids=lambda c: case_id(c) + f"_append{c[6]}")
def test_pairwise_attention_inference_matches_reference(case, mode, dtype):
    # stride 1: the kernel; stride 2 and 3: this backend's composition
    args, fp = _logits_inputs(case, dtype)
    for per_weight in (1, 3, 8):  # value channels per weight channel: the aggregation's 8-channel blocks and the rest
        values = _values(args, per_weight)
        with torch.no_grad():
            ours, ref = _attention(args, values, mode, fp, "cpu"), _attention(args, values, mode, fp, "reference")
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(ours, ref, **tol)
        assert ref.abs().max() > 0.01 and (ref > 0).any() and (ref < 0).any()  # not a trivial output


# maps of several blocks of rows: narrow rows (read from column-shifted copies), dilation, padding edges
BLOCK_ROW_CASES = [(7, 1, 1, None, 40, 16, 1), (5, 1, 2, None, 30, 14, None), (3, 1, 1, 0, 40, 27, 1),
                   (3, 1, 3, None, 23, 50, 1)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", BLOCK_ROW_CASES, ids=lambda c: case_id(c) + f"_append{c[6]}")
def test_attention_inference_over_several_blocks_of_rows(case, mode):
    args, fp = _logits_inputs(case, torch.float64)
    values = _values(args, 9)
    patchwise, values_p, fp_p = _patchwise_attention_inputs(case, torch.float64, 2, 9)
    with torch.no_grad():
        ours, ref = (_attention(args, values, mode, fp, b) for b in ("cpu", "reference"))
        ours_p, ref_p = (_patchwise_attention(patchwise, values_p, mode, fp_p, b) for b in ("cpu", "reference"))
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(ours_p, ref_p, rtol=1e-11, atol=1e-11)


def test_pairwise_attention_inference_runs_the_kernel_only_at_stride_1_without_gradient(monkeypatch):
    from torchsan.ops._cpu import subtraction2_conv1x1 as module

    calls = []
    original = module.pairwise_attention_inference_op
    monkeypatch.setattr(module, "pairwise_attention_inference_op", lambda *a: calls.append(1) or original(*a))
    args, fp = _logits_inputs((5, 1, 1, None, 13, 12, 1), torch.float64)
    values = _values(args)
    with torch.no_grad():
        expected = _attention(args, values, "reflect", fp, "reference")
        first, second = (_attention(args, values, "reflect", fp, "cpu") for _ in range(2))
    assert torch.equal(first, second)
    assert len(calls) == 2
    # a gradient wanted: the composition, differentiable, the same values
    v = values.clone().requires_grad_(True)
    out = _attention(args, v, "reflect", fp, "cpu")
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)
    out.sum().backward()
    assert v.grad is not None and len(calls) == 2
    # stride 2: the composition
    strided, fp2 = _logits_inputs((5, 2, 1, None, 13, 12, 1), torch.float64)
    with torch.no_grad():
        ours, ref = (_attention(strided, values, "reflect", fp2, backend) for backend in ("cpu", "reference"))
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
    assert len(calls) == 2
    # batch statistics: rejected (the op applies running statistics)
    with pytest.raises(ValueError, match="running statistics"):
        _attention((*args[:3], (*args[3][:3], None, None), *args[4:]), values, "reflect", fp, "cpu")


@pytest.mark.parametrize("width", [255, 257], ids=["row_fits", "row_too_long"])
def test_pairwise_attention_inference_rows_up_to_a_sub_block(width, monkeypatch):
    """One output row per block up to the kernel's sub-block; a longer row takes the composition. Same values."""
    from torchsan.ops._cpu import subtraction2_conv1x1 as module
    from torchsan.ops._cpu.policy import ATTENTION_MAX_ROW

    assert ATTENTION_MAX_ROW == _cpu.kernel_constants()["sub_block"]
    calls = []
    original = module.pairwise_attention_inference_op
    monkeypatch.setattr(module, "pairwise_attention_inference_op", lambda *a: calls.append(1) or original(*a))
    args, fp = _logits_inputs((3, 1, 1, None, 3, width, 1), torch.float64, n=1)
    values = _values(args)
    with torch.no_grad():
        ours, ref = _attention(args, values, "zeros", fp, "cpu"), _attention(args, values, "zeros", fp, "reference")
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
    assert len(calls) == (width <= ATTENTION_MAX_ROW)


# (case, batch): two images of 30 x 31; one of 28 x 28, whose blocks of rows differ with the thread count (fewer
# rows per block on two threads, which share them better: 9 -> 8 rows with 512-bit vectors, 8 -> 7 with 256-bit)
THREAD_CASES = [((7, 1, 1, None, 30, 31, 1), 2), ((7, 1, 1, None, 28, 28, 1), 1)]


@pytest.mark.parametrize("case,n", THREAD_CASES)
def test_pairwise_attention_inference_same_bits_with_1_and_2_threads(case, n):
    from _helpers import per_thread_count

    args, fp = _logits_inputs(case, torch.float32, c=6, c_mid=16, c_out=8, n=n)
    values = _values(args, 8)
    with torch.no_grad():
        outs = per_thread_count(lambda: _attention(args, values, "reflect", fp, "cpu"))
        ref = _attention(args, values, "reflect", fp, "reference")
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sa_type,kernel_op", [("pairwise", "pairwise_logits_inference_op"),
                                               ("patchwise", "patchwise_weights_inference_op")])
def test_layer_in_eval_runs_gamma_as_one_op_and_matches_its_modules(sa_type, kernel_op, monkeypatch):
    from torchsan.layers import ATTENTION_TYPES
    from torchsan.ops._cpu import subtraction2_conv1x1 as module

    torch.manual_seed(0)
    layer = ATTENTION_TYPES[sa_type](16, 4, 16, share_planes=4, kernel_size=5).double()
    for m in layer.modules():  # running statistics other than the initial ones
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    layer.eval()
    x = torch.randn(2, 16, 11, 9, dtype=torch.float64)
    calls = []
    original = getattr(module, kernel_op)
    monkeypatch.setattr(module, kernel_op, lambda *a: calls.append(1) or original(*a))
    with torch.no_grad(), ops.use_backend("cpu"):
        fused = layer(x)
        with ops.fusion(False):
            modules = layer(x)
    assert calls == [1]
    torch.testing.assert_close(fused, modules, rtol=1e-11, atol=1e-11)
    with ops.use_backend("cpu"):  # a gradient wanted (say an attack on the input): not the inference op
        layer(x.requires_grad_(True)).sum().backward()
    assert calls == [1] and x.grad is not None


# --- patchwise_weights for inference: the concatenation relation's whole mapping, z and the hidden layer never written
def _patchwise_inputs(case, dtype, c=3, c_mid=6, c_out=10, n=2):
    """x1, x2 and two eval-mode BNs (running statistics) with gamma's convolutions:
    (x1, x2, norm1, conv1_weight, norm2, conv2_weight, conv2_bias), footprint kwargs."""
    k, s, d, p, h, w, _ = case
    gen = torch.Generator().manual_seed(k * 100 + h)
    ct = c * (k * k + 1)

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, generator=gen)

    def norm(channels, mean_scale):
        return (rand(channels).abs() + 0.5, rand(channels), 1e-5, mean_scale * rand(channels),
                rand(channels).abs() + 0.5)

    args = (rand(n, c, h, w), rand(n, c, h, w), norm(ct, 1.0), rand(c_mid, ct) / ct**0.5, norm(c_mid, 0.5),
            rand(c_out, c_mid) / c_mid**0.5, rand(c_out))
    return args, dict(kernel_size=k, stride=s, padding=p, dilation=d)


def _patchwise(args, mode, fp, backend):
    with ops.use_backend(backend):
        return ops.patchwise_weights(*args, pad_mode=mode, **fp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", RELATION_CASES, ids=case_id)
def test_patchwise_weights_inference_matches_reference(case, mode, dtype):
    args, fp = _patchwise_inputs(case, dtype)
    with torch.no_grad():
        ours, ref = _patchwise(args, mode, fp, "cpu"), _patchwise(args, mode, fp, "reference")
    assert ours[1:] == (None,) * 4 and ref[1:] == (None,) * 4
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(ours[0], ref[0], **tol)
    assert ref[0].abs().max() > 1 and (ref[0] > 0).any() and (ref[0] < 0).any()  # not a trivial output


@pytest.mark.parametrize("n,c", [(0, 3), (2, 0)])
def test_patchwise_weights_inference_takes_empty_inputs(n, c):
    args, fp = _patchwise_inputs((3, 1, 1, None, 5, 6, 1), torch.float64, c=c, n=n)
    with torch.no_grad():
        ours, ref = _patchwise(args, "reflect", fp, "cpu")[0], _patchwise(args, "reflect", fp, "reference")[0]
    assert ours.shape == ref.shape == (n, 10, 1, 30)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("case", [(7, 1, 1, None, 9, 8, 1), (3, 2, 2, None, 13, 11, 1)], ids=case_id)
def test_patchwise_weights_inference_on_one_small_image_with_1_and_2_threads(case):
    # One image of fewer pixels than a sub-block: the threads share its staged rows; the products run in torch's
    # BLAS, whose sums may be split differently for another thread count.
    from _helpers import per_thread_count

    args, fp = _patchwise_inputs(case, torch.float32, c=5, c_mid=14, c_out=40, n=1)
    with torch.no_grad():
        outs = per_thread_count(lambda: _patchwise(args, "reflect", fp, "cpu")[0])
        ref = _patchwise(args, "reflect", fp, "reference")[0]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[1], ref, rtol=1e-5, atol=1e-5)


def test_patchwise_weights_inference_on_one_image_of_several_sub_blocks_same_bits_with_1_and_2_threads():
    # 575 positions: the register-tiled products in one chunk on one thread, in two (288 and 287 positions, the
    # second starting within an output row) on two: the same bits.
    from _helpers import per_thread_count

    args, fp = _patchwise_inputs((3, 1, 1, None, 23, 25, 1), torch.float32, n=1)
    with torch.no_grad():
        outs = per_thread_count(lambda: _patchwise(args, "reflect", fp, "cpu")[0])
        ref = _patchwise(args, "reflect", fp, "reference")[0]
    assert outs[0].shape[-1] == 575
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], ref, rtol=1e-5, atol=1e-5)


# (case, batch, threads): maps of more than a sub-block (256 positions) on at most as many threads as sub-blocks
# (the register-tiled products); small maps side by side in groups of up to 256 columns with a partial last group,
# and a map of two sub-blocks with more threads than sub-blocks (the BLAS route, its second sub-block written at an
# offset into the output)
ROUTE_CASES = [((3, 1, 1, None, 17, 18, 1), 2, 2), ((5, 1, 1, None, 9, 11, None), 1, 2),
               ((3, 1, 1, None, 9, 11, 1), 5, 2), ((3, 1, 1, None, 17, 18, 1), 1, 4)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,n,threads", ROUTE_CASES, ids=str)
def test_patchwise_weights_inference_matches_reference_on_each_route(case, n, threads, dtype, bias):
    from _helpers import num_threads

    args, fp = _patchwise_inputs(case, dtype, n=n)
    if not bias:
        args = (*args[:6], None)
    with torch.no_grad(), num_threads(threads):
        ours, ref = _patchwise(args, "reflect", fp, "cpu")[0], _patchwise(args, "reflect", fp, "reference")[0]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(ours, ref, **tol)
    assert ref.abs().max() > 1 and (ref > 0).any() and (ref < 0).any()


def test_patchwise_weights_inference_runs_the_kernel_only_where_no_gradient_or_batch_statistics(monkeypatch):
    from torchsan.ops._cpu import subtraction2_conv1x1 as module

    args, fp = _patchwise_inputs((3, 1, 1, None, 9, 8, 1), torch.float64)
    calls = []
    original = module.patchwise_weights_inference_op
    monkeypatch.setattr(module, "patchwise_weights_inference_op", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        expected = _patchwise(args, "reflect", fp, "reference")[0]
        assert torch.equal(_patchwise(args, "reflect", fp, "cpu")[0], _patchwise(args, "reflect", fp, "cpu")[0])
    assert len(calls) == 2
    w1 = args[3].clone().requires_grad_(True)  # a gradient wanted: the reference composition
    out = _patchwise((*args[:3], w1, *args[4:]), "reflect", fp, "cpu")[0]
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)
    out.sum().backward()
    assert w1.grad is not None and len(calls) == 2
    with torch.no_grad():  # batch statistics (training mode): the reference composition, which returns them
        out = _patchwise((*args[:2], (*args[2][:3], None, None), *args[3:]), "reflect", fp, "cpu")
    assert out[1] is not None and len(calls) == 2


# --- patchwise_attention for inference: the weights and the aggregation per block of output rows --------------------
def _patchwise_attention(args, values, mode, fp, backend):
    with ops.use_backend(backend):
        return ops.patchwise_attention(args[0], args[1], values, *args[2:], pad_mode=mode, **fp)


def _patchwise_attention_inputs(case, dtype, weight_channels=2, per_weight=3, n=2):
    """_patchwise_inputs with K * weight_channels outputs, and values of per_weight channels per weight channel."""
    k = case[0]
    args, fp = _patchwise_inputs(case, dtype, c_out=weight_channels * k * k, n=n)
    gen = torch.Generator().manual_seed(11)
    values = torch.randn(n, per_weight * weight_channels, *args[0].shape[2:], dtype=dtype, generator=gen)
    return args, values, fp


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", RELATION_CASES, ids=case_id)
def test_patchwise_attention_inference_matches_reference(case, mode, dtype):
    # stride 1: the kernel; stride 2 and 3: this backend's composition
    for weight_channels, per_weight in ((1, 8), (2, 3), (3, 9)):  # the aggregation's 8-channel blocks and the rest
        args, values, fp = _patchwise_attention_inputs(case, dtype, weight_channels, per_weight)
        with torch.no_grad():
            ours = _patchwise_attention(args, values, mode, fp, "cpu")
            ref = _patchwise_attention(args, values, mode, fp, "reference")
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(ours, ref, **tol)
        assert ref.abs().max() > 1 and (ref > 0).any() and (ref < 0).any()  # not a trivial output


def test_patchwise_attention_inference_runs_the_kernel_only_at_stride_1_without_gradient(monkeypatch):
    from torchsan.ops._cpu import subtraction2_conv1x1 as module

    calls = []
    original = module.patchwise_attention_inference_op
    monkeypatch.setattr(module, "patchwise_attention_inference_op", lambda *a: calls.append(1) or original(*a))
    args, values, fp = _patchwise_attention_inputs((5, 1, 1, None, 13, 12, 1), torch.float64)
    with torch.no_grad():
        expected = _patchwise_attention(args, values, "reflect", fp, "reference")
        first, second = (_patchwise_attention(args, values, "reflect", fp, "cpu") for _ in range(2))
    assert torch.equal(first, second) and len(calls) == 2
    v = values.clone().requires_grad_(True)  # a gradient wanted: the composition, differentiable
    out = _patchwise_attention(args, v, "reflect", fp, "cpu")
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)
    out.sum().backward()
    assert v.grad is not None and len(calls) == 2
    with pytest.raises(ValueError, match="running statistics"):  # batch statistics: rejected
        _patchwise_attention((*args[:2], (*args[2][:3], None, None), *args[3:]), values, "reflect", fp, "cpu")
    with pytest.raises(ValueError, match="multiple of K"):
        _patchwise_attention((*args[:5], args[5][:-1], args[6][:-1]), values, "reflect", fp, "cpu")


@pytest.mark.parametrize("case,n", THREAD_CASES)
def test_patchwise_attention_inference_same_bits_with_1_and_2_threads(case, n):
    from _helpers import per_thread_count

    args, values, fp = _patchwise_attention_inputs(case, torch.float32, 2, 8, n=n)
    with torch.no_grad():
        outs = per_thread_count(lambda: _patchwise_attention(args, values, "reflect", fp, "cpu"))
        ref = _patchwise_attention(args, values, "reflect", fp, "reference")
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1], ref, rtol=5e-5, atol=5e-5)  # float32 sums over C (K + 1) = 150 inputs


@pytest.mark.parametrize("sa_type,kernel_op", [("pairwise", "pairwise_attention_inference_op"),
                                               ("patchwise", "patchwise_attention_inference_op")])
def test_layer_in_eval_runs_the_whole_attention_as_one_op_and_matches_its_modules(sa_type, kernel_op, monkeypatch):
    """An eval-mode layer on a map whose blocks of rows are large enough (ops.should_fuse): the relation, gamma,
    (the softmax) and the aggregation as one op; the same function as the modules one by one."""
    from _helpers import num_threads
    from torchsan.layers import ATTENTION_TYPES
    from torchsan.ops._cpu import subtraction2_conv1x1 as module

    torch.manual_seed(0)
    layer = ATTENTION_TYPES[sa_type](16, 4, 16, share_planes=4, kernel_size=7).double()
    for m in layer.modules():  # running statistics other than the initial ones
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    layer.eval()
    x = torch.randn(2, 16, 24, 20, dtype=torch.float64)
    calls = []
    original = getattr(module, kernel_op)
    monkeypatch.setattr(module, kernel_op, lambda *a: calls.append(1) or original(*a))
    with torch.no_grad(), ops.use_backend("cpu"), num_threads(2):  # 4 blocks of 12 rows: fused up to 4 threads
        fused = layer(x)
        with ops.fusion(False):
            modules = layer(x)
    assert calls == [1]
    torch.testing.assert_close(fused, modules, rtol=1e-11, atol=1e-11)
    with ops.use_backend("cpu"):  # a gradient wanted: not the inference op
        layer(x.requires_grad_(True)).sum().backward()
    assert calls == [1] and x.grad is not None
