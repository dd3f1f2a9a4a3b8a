"""The cpu backend's BatchNorm-ReLU-2x2 max-pool ops (``ops/_cpu/pooling.py``) against the reference backend:
``affine_relu_maxpool2x2`` (an eval-mode BN as scale and shift) and ``batchnorm_relu_maxpool2x2`` (a training-mode
BN, gradients through the batch statistics), and the stem's ``conv1x1_affine_relu_maxpool2x2`` and
``conv1x1_batchnorm_relu_maxpool2x2`` (a 1x1 convolution in front)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _helpers import DTYPES, assert_matches_reference, needs_cpu_kernels
from torchsan import ops

pytestmark = needs_cpu_kernels
F64 = dict(dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
# (rows of 35 windows: whole vectors of windows and a partial last one, with an odd column left out)
@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 5, 7, 9), (3, 2, 2, 3), (2, 4, 33, 17), (2, 3, 6, 71),
                                   (1, 2, 4, 58)])
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_relu_maxpool2x2_propagates_nan_like_max_pool2d(dtype):
    x = torch.randn(2, 3, 4, 70, dtype=dtype)
    x[1, 2, 1, 0] = float("nan")
    x[0, 1, 2, 67] = float("nan")  # in the row's partial last vector of windows
    with ops.use_backend("cpu"):
        fused = ops.affine_relu_maxpool2x2(x, torch.ones(3, dtype=dtype), torch.zeros(3, dtype=dtype))
    assert torch.equal(fused.isnan(), F.max_pool2d(torch.relu(x), 2, 2).isnan())
    assert fused.isnan().sum() == 2


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


# --- conv1x1_affine_relu_maxpool2x2 and conv1x1_batchnorm_relu_maxpool2x2: SAN's stem -----------------------------
STEM_SHAPES = [((2, 3, 8, 10), 16), ((1, 1, 7, 9), 5), ((3, 5, 2, 3), 7), ((2, 3, 33, 17), 64),
               ((1, 3, 4, 71), 6)]  # odd: floor mode; 35 windows a row: whole vectors and a partial one


def _stem_inputs(shape, c_out, dtype):
    x = torch.randn(shape, dtype=dtype)
    weight = torch.randn(c_out, shape[1], dtype=dtype)
    scale = torch.randn(c_out, dtype=dtype).abs() + 0.1
    scale[::2] *= -1  # some negative: the pool sees the flipped order
    return x, weight, scale, torch.randn(c_out, dtype=dtype)


def _stem(backend, *tensors):
    with torch.no_grad(), ops.use_backend(backend):
        return ops.conv1x1_affine_relu_maxpool2x2(*tensors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,c_out", STEM_SHAPES)
def test_conv1x1_affine_relu_maxpool2x2_matches_reference(dtype, shape, c_out):
    tensors = _stem_inputs(shape, c_out, dtype)
    ours, ref = _stem("cpu", *tensors), _stem("reference", *tensors)
    # the reference, spelled out: the modules' own functions
    by_hand = F.max_pool2d(torch.relu(F.conv2d(tensors[0], tensors[1][:, :, None, None]) * tensors[2][:, None, None]
                                      + tensors[3][:, None, None]), 2, 2)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref, by_hand, **tol)
    torch.testing.assert_close(ours, ref, **tol)
    assert ours.shape == (shape[0], c_out, shape[2] // 2, shape[3] // 2) and (ref > 0).any()
    assert ref.numel() < 50 or (ref == 0).any()  # the ReLU cuts somewhere


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,c_out", STEM_SHAPES)
def test_conv1x1_affine_relu_maxpool2x2_gradients_match_reference(dtype, shape, c_out):
    # every input's gradient, x's included (an attack on the image), from the fused backward
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert_matches_reference(lambda *t: ops.conv1x1_affine_relu_maxpool2x2(*t), *_stem_inputs(shape, c_out, dtype),
                             **tol)


def test_conv1x1_affine_relu_maxpool2x2_gradcheck_and_gradgradcheck():
    x, weight, scale, shift = (t.requires_grad_() for t in _stem_inputs((2, 3, 5, 7), 4, torch.float64))
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.conv1x1_affine_relu_maxpool2x2, (x, weight, scale, shift))
        assert torch.autograd.gradgradcheck(ops.conv1x1_affine_relu_maxpool2x2, (x, weight, scale, shift))
        # x without a gradient (an image): the kernel skips gx, the rest unchanged
        assert torch.autograd.gradcheck(lambda *t: ops.conv1x1_affine_relu_maxpool2x2(x.detach(), *t),
                                        (weight, scale, shift))


def test_conv1x1_affine_relu_maxpool2x2_propagates_nan():
    x, weight, scale, shift = _stem_inputs((2, 3, 6, 8), 4, torch.float64)
    x[1, 2, 3, 5] = float("nan")
    ours, ref = _stem("cpu", x, weight, scale, shift), _stem("reference", x, weight, scale, shift)
    assert torch.equal(ours.isnan(), ref.isnan()) and ours.isnan().sum() == 4  # every channel's window (1, 1, 2)
    torch.testing.assert_close(ours.nan_to_num(), ref.nan_to_num())


def _stem_train(x, conv_weight, *bn):
    y, mean, var = ops.conv1x1_batchnorm_relu_maxpool2x2(x, conv_weight, *(bn or (None, None)), 1e-5)
    return y + 0.1 * (mean.sum() + var.sum())  # gradients through the returned statistics too


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,c_out", STEM_SHAPES)
def test_conv1x1_batchnorm_relu_maxpool2x2_matches_reference(shape, c_out, affine):
    # The statistics come from x's mean and covariance, the reference's from the convolution's output: a mean
    # large against the spread checks that they are taken about the mean.
    x = torch.randn(shape, **F64) * 0.5 + 20.0
    bn = [torch.rand(c_out, **F64) + 0.5, torch.randn(c_out, **F64)] if affine else []
    assert_matches_reference(_stem_train, x, torch.randn(c_out, shape[1], **F64), *bn, rtol=1e-9, atol=1e-9,
                             grad_tol=dict(rtol=1e-7, atol=1e-8))


def test_conv1x1_batchnorm_relu_maxpool2x2_float32_matches_the_modules():
    """SAN's stem at an image's size in float32: output, statistics and gradients as the conv, BatchNorm, ReLU and
    max-pool modules give them."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 62) * 2 - 0.5
    conv, bn = torch.nn.Conv2d(3, 32, 1, bias=False), torch.nn.BatchNorm2d(32)
    torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
    torch.nn.init.uniform_(bn.bias, -0.5, 0.5)
    grad = torch.randn(2, 32, 32, 31)
    y_modules = F.max_pool2d(torch.relu(bn(conv(x))), 2, 2)
    y_modules.backward(grad)
    expected = [y_modules, conv.weight.grad, bn.weight.grad, bn.bias.grad]
    params = [p.detach().clone().requires_grad_() for p in (conv.weight, bn.weight, bn.bias)]
    with ops.use_backend("cpu"):
        y, mean, var = ops.conv1x1_batchnorm_relu_maxpool2x2(x, params[0].flatten(1), params[1], params[2], bn.eps)
    y.backward(grad)
    var_ref, mean_ref = torch.var_mean(conv(x).detach(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, var_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip([y, params[0].grad.view_as(conv.weight), params[1].grad, params[2].grad], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_conv1x1_batchnorm_relu_maxpool2x2_float32_statistics_of_correlated_channels():
    """An image's channels are strongly correlated: the convolution's variance from x's covariance then cancels
    digits, which float64 statistics keep. Against nn.BatchNorm2d's own (float64 accumulation) on the conv."""
    torch.manual_seed(0)
    base = torch.rand(4, 1, 96, 96)
    x = torch.cat([base + 0.01 * torch.randn_like(base) for _ in range(3)], 1)  # three nearly equal channels
    conv_weight = torch.tensor([[1.0, -2.0, 1.0], [1.0, 1.0, 1.0], [1.0, -1.0, 0.0]])  # near, far from the null space
    with ops.use_backend("cpu"), torch.no_grad():
        _, mean, var = ops.conv1x1_batchnorm_relu_maxpool2x2(x, conv_weight, None, None, 1e-5)
    y = F.conv2d(x.double(), conv_weight.double()[:, :, None, None])
    var_ref, mean_ref = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(var, var_ref.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(mean, mean_ref.float(), rtol=1e-5, atol=1e-7)


def test_conv1x1_affine_relu_maxpool2x2_backward_kernel_rejects_a_map_without_a_window():
    from torchsan.ops._cpu import pooling

    x = torch.randn(2, 3, 1, 6)
    with pytest.raises(RuntimeError, match="at least 2x2"):
        pooling.kernels().conv1x1_affine_relu_maxpool2x2_backward(torch.randn(2, 4, 0, 3), x, torch.randn(4, 3),
                                                                  torch.ones(4), torch.zeros(4), True)


def test_conv1x1_batchnorm_relu_maxpool2x2_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 3, 4, 7, **F64, requires_grad=True)
    conv_weight = torch.randn(4, 3, **F64, requires_grad=True)
    w, b = (torch.rand(4, **F64) + 0.5).requires_grad_(), torch.randn(4, **F64, requires_grad=True)
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(_stem_train, (x, conv_weight, w, b))
        assert torch.autograd.gradgradcheck(_stem_train, (x, conv_weight, w, b))
        assert torch.autograd.gradcheck(_stem_train, (x, conv_weight))


@pytest.mark.parametrize("shape,c_out", [((0, 3, 6, 8), 4), ((2, 0, 6, 8), 4), ((2, 3, 6, 8), 0)])
def test_conv1x1_affine_relu_maxpool2x2_empty_batch_and_channels(shape, c_out):
    tensors = _stem_inputs(shape, c_out, torch.float64)  # Cin = 0: the conv is 0, the output relu(shift) pooled
    ours, ref = _stem("cpu", *tensors), _stem("reference", *tensors)
    assert ours.shape == ref.shape == (shape[0], c_out, 3, 4)
    torch.testing.assert_close(ours, ref)


def test_stem_ops_same_bits_with_1_and_2_threads():
    from _helpers import num_threads

    x, weight, scale, shift = _stem_inputs((3, 3, 40, 38), 16, torch.float32)
    bn_weight, bn_bias = scale.abs(), shift
    grad = torch.randn(3, 16, 20, 19)
    outs = []
    for threads in (1, 2):
        with num_threads(threads), ops.use_backend("cpu"):
            leaves = [t.clone().requires_grad_() for t in (x, weight, bn_weight, bn_bias)]
            y, mean, var = ops.conv1x1_batchnorm_relu_maxpool2x2(*leaves, 1e-5)
            y.backward(grad)
            outs.append([_stem("cpu", x, weight, scale, shift), y, mean, var, *(t.grad for t in leaves)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_conv1x1_affine_relu_maxpool2x2_rejects_bad_input(backend):
    x, weight, scale, shift = _stem_inputs((2, 3, 6, 8), 4, torch.float32)
    bad = [((x[0], weight, scale, shift), ValueError, "x must be 4-D|4 dimensions|\\(N, C, H, W\\)"),
           ((x, weight[:, :2], scale, shift), ValueError, r"weight must have shape \(Cout, 3\)"),
           ((x, weight, scale[:3], shift), ValueError, r"scale must have shape \(4,\), one value per output channel"),
           ((x[:, :, :1], weight, scale, shift), ValueError, "at least 2x2 pixels"),
           ((x, weight.double(), scale, shift), (TypeError, ValueError), "dtype|float64")]
    for args, exc, match in bad:
        with ops.use_backend(backend), pytest.raises(exc, match=match):
            ops.conv1x1_affine_relu_maxpool2x2(*args)
        with ops.use_backend(backend), pytest.raises(exc, match=match.replace("scale", "weight")):
            ops.conv1x1_batchnorm_relu_maxpool2x2(*args, 1e-5)
    with ops.use_backend(backend), pytest.raises(ValueError, match="eps must be positive"):
        ops.conv1x1_batchnorm_relu_maxpool2x2(x, weight, scale, shift, 0.0)
    with ops.use_backend(backend), pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.conv1x1_batchnorm_relu_maxpool2x2(x[:0], weight, scale, shift, 1e-5)  # an empty batch


def test_san_stem_is_one_op_in_inference_and_training_and_matches_its_modules(monkeypatch):
    import timm

    import torchsan  # noqa: F401
    from torchsan.ops._cpu import pooling

    model = timm.create_model("san10_pairwise", width=0.25, num_classes=10).double().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    calls = []
    original = pooling.conv1x1_affine_relu_maxpool2x2_op
    monkeypatch.setattr(pooling, "conv1x1_affine_relu_maxpool2x2_op", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad(), ops.use_backend("cpu"):
        fused = model.stem(x)
        with ops.fusion(False):
            modules = model.stem(x)
    assert calls == [1]
    torch.testing.assert_close(fused, modules, rtol=1e-12, atol=1e-12)
    with ops.use_backend("cpu"):  # gradients wanted (an attack), then training mode: batch statistics
        model.stem(x).sum().backward()
        model.stem.train()(x).sum().backward()
    assert calls == [1, 1, 1]
