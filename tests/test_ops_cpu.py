"""The fused CPU kernels against the reference backend (the oracle for fast kernels)."""

from __future__ import annotations

import pytest
import torch

from torchsan import ops
from torchsan.ops import _cpu

pytestmark = pytest.mark.skipif(not _cpu.available(), reason=f"CPU kernels unavailable: {_cpu.unavailable_reason()}")

# (kernel_size, stride, dilation, padding, H, W)
CASES = [
    (3, 1, 1, None, 9, 7),
    (7, 1, 1, None, 13, 11),
    (7, 2, 1, None, 15, 9),
    (3, 2, 1, None, 8, 9),
    (5, 1, 2, None, 11, 12),
    (3, 3, 2, None, 10, 7),
    (3, 1, 1, 0, 6, 7),
    (3, 1, 1, 2, 6, 5),  # stride 1 with more padding than the half-span: centres are not the input plane
    (5, 1, 2, 3, 12, 11),
    (3, 2, 1, 2, 5, 7),
    (1, 1, 1, None, 4, 5),
]
MODES = ["reflect", "zeros"]


def _ids(case):
    k, s, d, p, h, w = case
    return f"k{k}s{s}d{d}p{p}_{h}x{w}"


def _both(fn, *tensors):
    """Run fn on the fused and the reference backend with cloned leaf inputs; return outputs and grads."""
    results = []
    for backend in ("cpu", "reference"):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        with ops.use_backend(backend):
            out = fn(*leaves)
        # randn(shape), not randn_like: the same logical gradient whatever the output's strides
        g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        out.backward(g)
        results.append((out.detach(), [leaf.grad for leaf in leaves]))
    return results


def _close(a, b, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fused_matches_reference(case, mode, dtype):
    k, s, d, p, h, w = case
    args = (k, s, p, d, mode)
    ho, wo = ops.output_size((h, w), k, s, p, d)
    x = torch.randn(2, 12, h, w, dtype=dtype)
    x2 = torch.randn(2, 12, h, w, dtype=dtype)
    for cw in (1, 3, 12):
        weight = torch.randn(2, cw, k * k, ho * wo, dtype=dtype)
        for fn in (ops.aggregation, ops.softmax_aggregation):  # (softmax_aggregation: weight as logits)
            (yf, gf), (yr, gr) = _both(lambda a, b, fn=fn: fn(a, b, *args), x, 3 * weight)
            _close(yf, yr, dtype)
            for a, b in zip(gf, gr):
                _close(a, b, dtype)
    extra1 = torch.randn(1, 2, k * k, ho * wo, dtype=dtype)  # broadcast over the batch, like the position encoding
    extra2 = torch.randn(2, 3, k * k, ho * wo, dtype=dtype)
    for fn, inputs in [(lambda a, b: ops.subtraction2(a, b, *args), (x, x2)),
                       (lambda a, b, e: ops.subtraction2(a, b, *args, append=e), (x, x2, extra1)),
                       (lambda a, b, e: ops.subtraction2(a, b, *args, append=e), (x, x2, extra2)),
                       (lambda a: ops.subtraction(a, *args), (x,)),
                       (lambda a: ops.unfold(a, *args), (x,))]:
        (yf, gf), (yr, gr) = _both(fn, *inputs)
        _close(yf, yr, dtype)
        for a, b in zip(gf, gr):
            _close(a, b, dtype)


def test_noncontiguous_channels_last_and_batch1():
    x = torch.randn(1, 16, 12, 10).to(memory_format=torch.channels_last)
    xt = torch.randn(1, 16, 10, 12).transpose(2, 3)  # (1, 16, 12, 10), non-contiguous
    weight = torch.randn(1, 49, 4, 120).transpose(1, 2)  # (1, 4, 49, 120), non-contiguous
    assert not weight.is_contiguous() and not xt.is_contiguous()
    for inp in (x, xt):
        (yf, gf), (yr, gr) = _both(lambda a, b: ops.aggregation(a, b, 7), inp, weight)
        _close(yf, yr, torch.float32)
        for a, b in zip(gf, gr):
            _close(a, b, torch.float32)
        (yf, gf), (yr, gr) = _both(lambda a, b: ops.subtraction2(a, b, 7, pad_mode="zeros"), inp, xt)
        _close(yf, yr, torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_full_and_double_backward(mode):
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 1, 9, 20, dtype=torch.float64, requires_grad=True)
    with ops.use_backend("cpu"):
        agg = lambda a, b: ops.aggregation(a, b, 3, pad_mode=mode)  # noqa: E731
        sub = lambda a, b: ops.subtraction2(a, b, 3, stride=2, pad_mode=mode)  # noqa: E731
        sub1 = lambda a, b: ops.subtraction2(a, b, 3, padding=2, pad_mode=mode)  # noqa: E731
        unf = lambda a: ops.unfold(a, 3, dilation=2, pad_mode=mode)  # noqa: E731
        assert torch.autograd.gradcheck(agg, (x, weight))
        assert torch.autograd.gradcheck(sub, (x, x2))
        assert torch.autograd.gradcheck(sub1, (x, x2))
        assert torch.autograd.gradcheck(lambda a, b: ops.subtraction2(a, b, 3, pad_mode=mode), (x, x2))
        assert torch.autograd.gradgradcheck(agg, (x, weight))
        assert torch.autograd.gradgradcheck(sub, (x, x2))
        assert torch.autograd.gradgradcheck(unf, (x,))
        sagg = lambda a, b: ops.softmax_aggregation(a, b, 3, pad_mode=mode)  # noqa: E731
        sagg2 = lambda a, b: ops.softmax_aggregation(a, b, 3, stride=2, dilation=2, pad_mode=mode)  # noqa: E731
        assert torch.autograd.gradcheck(sagg, (x, weight))
        assert torch.autograd.gradgradcheck(sagg, (x, weight))
        assert torch.autograd.gradcheck(sagg2, (x, weight[..., :6].clone().requires_grad_(True)))
        extra = torch.randn(1, 2, 9, 6, dtype=torch.float64, requires_grad=True)
        app = lambda a, b, e: ops.subtraction2(a, b, 3, stride=2, pad_mode=mode, append=e)  # noqa: E731
        assert torch.autograd.gradcheck(app, (x, x2, extra))
        assert torch.autograd.gradgradcheck(app, (x, x2, extra))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gathers_eager_fast_path_matches_the_custom_ops(dtype):
    # In plain eager mode the gathers call the kernels from an autograd.Function (less per-call overhead); under a
    # dispatch mode (as when tracing) they go through the torch.ops.torchsan custom ops. Same kernels, same bits.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x1, x2 = torch.randn(2, 3, 9, 8, dtype=dtype), torch.randn(2, 3, 9, 8, dtype=dtype)
    g = torch.randn(2, 3, 25, 72, dtype=dtype)
    cases = [("subtraction2", lambda a, b: ops.subtraction2(a, b, 5, pad_mode="zeros"), (x1, x2)),
             ("unfold", lambda a: ops.unfold(a, 5, dilation=1), (x2,)),
             ("subtraction", lambda a: ops.subtraction(a, 5), (x1,))]
    with ops.use_backend("cpu"):
        for name, fn, inputs in cases:
            results = []
            for mode in (None, Passthrough()):
                leaves = [t.clone().requires_grad_(True) for t in inputs]
                if mode is None:
                    out = fn(*leaves)
                    assert type(out.grad_fn).__name__.endswith("FunctionBackward"), (name, out.grad_fn)
                else:
                    with mode:
                        out = fn(*leaves)
                    assert "torchsan" in type(out.grad_fn).__name__, (name, out.grad_fn)
                grads = torch.autograd.grad(out, leaves, g)
                results.append((out.detach(), grads))
            (y0, g0), (y1, g1) = results
            assert torch.equal(y0, y1), name
            assert all(torch.equal(a, b) for a, b in zip(g0, g1)), name
        # Only the gradients asked for are computed; grads of grads go through the differentiable custom ops.
        a = x1.clone().requires_grad_(True)
        (ga,) = torch.autograd.grad(ops.subtraction2(a, x2, 3), (a,), torch.randn(2, 3, 9, 72, dtype=dtype))
        assert ga.shape == a.shape
        if dtype == torch.float64:
            b = x2.clone().requires_grad_(True)
            assert torch.autograd.gradgradcheck(lambda t: ops.subtraction(t, 3), (b,))
            assert torch.autograd.gradgradcheck(lambda t: ops.unfold(t, 3, dilation=2), (b,))


def test_gathers_with_streaming_stores_match_reference():
    # Outputs of 8 MB and more with taps of 2 KB and more are written with streaming stores (san_cpu.cpp,
    # kStreamBytes): 9 MB here, taps of 15 KB starting at unaligned addresses (L = 63 * 61 is odd).
    x1, x2 = torch.randn(2, 6, 63, 61), torch.randn(2, 6, 63, 61)
    for fn, inputs in [(lambda a, b: ops.subtraction2(a, b, 7), (x1, x2)), (lambda a: ops.unfold(a, 7), (x2,))]:
        with ops.use_backend("cpu"):
            fused = fn(*inputs)
        assert fused.numel() * 4 >= 8 << 20
        with ops.use_backend("reference"):
            ref = fn(*inputs)
        torch.testing.assert_close(fused, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gathers_staged_through_a_plane_buffer_match_reference(dtype):
    # Outputs over 32 MB with taps of 512 bytes to 2 KB are gathered plane by plane into a buffer and streamed out
    # (san_cpu.cpp, kStagedStreamBytes): planes of 49 * 143 or 49 * 99 values, so most planes start unaligned. The
    # backward prefetches the next plane's gradient on the same shapes.
    shape = (2, 620, 11, 13) if dtype == torch.float32 else (2, 440, 9, 11)
    x1, x2 = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
    for fn, inputs in [(lambda a, b: ops.subtraction2(a, b, 7), (x1, x2)), (lambda a: ops.unfold(a, 7), (x2,))]:
        results = []
        for backend in ("cpu", "reference"):
            leaves = [t.clone().requires_grad_(True) for t in inputs]
            with ops.use_backend(backend):
                out = fn(*leaves)
            assert out.numel() * out.element_size() > 32 << 20
            g = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
            results.append((out.detach(), torch.autograd.grad(out, leaves, g)))
        (y0, g0), (y1, g1) = results
        torch.testing.assert_close(y0, y1, rtol=0, atol=0)
        for a, b in zip(g0, g1):
            torch.testing.assert_close(a, b)


def test_same_result_with_1_and_2_threads():
    x = torch.randn(3, 16, 17, 15)
    weight = torch.randn(3, 8, 49, 17 * 15)
    brc_args = (torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64),
                torch.randn(6, 9, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
    z = torch.randn(2, 9, 3, 5000, dtype=torch.float64)  # several pixel chunks per image
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            (y, g), _ = _both(lambda a, b: ops.aggregation(a, b, 7), x, weight)
            (ys, gs), _ = _both(lambda a, b: ops.softmax_aggregation(a, b, 7), x, weight)
            y, g = torch.cat([y.flatten(), ys.flatten()]), g + gs
            s = ops.subtraction2(x, x.flip(3), 7, append=weight[:1, :2])
            (yb, gb), _ = _both(lambda *t: ops.bn_relu_conv(*t), z, *brc_args)
            outs.append((y, g, s, yb, gb))
    finally:
        torch.set_num_threads(previous)
    (y1, g1, s1, yb1, gb1), (y2, g2, s2, yb2, gb2) = outs
    assert torch.equal(y1, y2) and torch.equal(s1, s2) and torch.equal(yb1, yb2)
    assert all(torch.equal(a, b) for a, b in zip(g1 + gb1, g2 + gb2))


def test_opcheck():
    from torch.library import opcheck

    x = torch.randn(2, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 9, 56, dtype=torch.float64, requires_grad=True)
    for reflect in (True, False):
        fp = (3, 1, 1, 1, reflect)
        opcheck(torch.ops.torchsan.aggregation.default, (x, weight, *fp))
        opcheck(torch.ops.torchsan.subtraction2.default, (x, x2, *fp))
        opcheck(torch.ops.torchsan.unfold.default, (x, *fp))
        grad = torch.randn(2, 6, 7, 8, dtype=torch.float64)
        opcheck(torch.ops.torchsan.aggregation_backward.default, (grad, x, weight, *fp))
        opcheck(torch.ops.torchsan.softmax_aggregation.default, (x, weight, *fp))
        probs = torch.softmax(weight.detach(), 2).requires_grad_(True)
        opcheck(torch.ops.torchsan.softmax_aggregation_backward.default, (grad.requires_grad_(True), x, probs, *fp))
        gcols = torch.randn(2, 6, 9, 56, dtype=torch.float64)
        opcheck(torch.ops.torchsan.subtraction2_backward.default, (gcols, 7, 8, *fp))
        opcheck(torch.ops.torchsan.unfold_backward.default, (gcols, 7, 8, *fp))
        for batch in (1, 2):
            extra = torch.randn(batch, 2, 9, 56, dtype=torch.float64, requires_grad=True)
            opcheck(torch.ops.torchsan.subtraction2_append.default, (x, x2, extra, *fp))
        gz = torch.randn(2, 8, 9, 56, dtype=torch.float64, requires_grad=True)
        opcheck(torch.ops.torchsan.subtraction2_append_backward.default, (gz, 6, 7, 8, *fp))
    strided = (5, 2, 4, 2, True)  # kernel, stride, padding, dilation, reflect
    weight2 = torch.randn(2, 2, 25, 16, dtype=torch.float64, requires_grad=True)
    opcheck(torch.ops.torchsan.aggregation.default, (x, weight2, *strided))


def test_meta_tensors_infer_shapes():
    x = torch.empty(2, 16, 30, 22, device="meta")
    w = torch.empty(2, 4, 49, 15 * 11, device="meta")
    y = torch.ops.torchsan.aggregation(x, w, 7, 2, 3, 1, True)
    assert y.shape == (2, 16, 15, 11) and y.device.type == "meta"
    assert torch.ops.torchsan.unfold(x, 3, 1, 1, 1, False).shape == (2, 16, 9, 660)


def test_dispatch_rules():
    x = torch.randn(1, 4, 6, 6)
    with ops.use_backend("auto"):
        assert ops.implementation(x) is _cpu
        assert ops.implementation(x.bfloat16()) is not _cpu  # reference serves other dtypes
    with ops.use_backend("cpu"), pytest.raises(TypeError, match="float32 and float64"):
        ops.unfold(x.bfloat16(), 3)
    with ops.use_backend("cpu"), pytest.raises(ValueError, match="needs CPU tensors"):
        ops.unfold(torch.empty(1, 4, 6, 6, device="meta"), 3)


def test_build_failure_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(_cpu, "_ext", None)
    monkeypatch.setattr(_cpu, "_error", None)

    def broken():
        raise OSError("no compiler found")

    monkeypatch.setattr(_cpu, "_load", broken)
    with pytest.warns(RuntimeWarning, match="falling back to the reference"):
        assert not _cpu.available()
    x = torch.randn(1, 2, 5, 5)
    with ops.use_backend("auto"):
        assert ops.implementation(x).__name__.endswith("reference")
        assert ops.unfold(x, 3).shape == (1, 2, 9, 25)  # still works
    with ops.use_backend("cpu"), pytest.raises(RuntimeError, match="no compiler found"):
        ops.unfold(x, 3)


BAD = [
    (lambda: ops.aggregation(torch.randn(2, 8, 6, 6), torch.randn(2, 3, 9, 36), 3), ValueError, "divisible"),
    (lambda: ops.aggregation(torch.randn(2, 8, 6, 6), torch.randn(2, 4, 9, 35), 3), ValueError, "weight dim 3"),
    (lambda: ops.aggregation(torch.randn(2, 8, 6, 6), torch.randn(2, 4, 9, 36).double(), 3), TypeError, "dtype"),
    (lambda: ops.aggregation(torch.randn(8, 6, 6), torch.randn(2, 4, 9, 36), 3), ValueError, "4-D"),
    (lambda: ops.subtraction2(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), 7), ValueError, "reflect padding"),
    (lambda: ops.unfold(torch.randn(1, 2, 5, 5), 4), ValueError, "odd"),
    (lambda: ops.subtraction2(torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 5), 3, append=torch.randn(2, 1, 9, 24)),
     ValueError, "append must be"),
    (lambda: ops.subtraction2_batchnorm_relu_conv(torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 5), None, None, 1e-5,
                                                  torch.randn(3, 3), kernel_size=3, append=torch.randn(1, 2, 9, 25)),
     ValueError, r"conv_weight must have shape \(Cout, 4\)"),
    (lambda: ops.subtraction2_batchnorm_relu_conv(torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 5), torch.randn(3),
                                                  None, 1e-5, torch.randn(3, 2), kernel_size=3),
     ValueError, r"weight must have shape \(2,\)"),
    (lambda: ops.subtraction2_batchnorm_relu_conv(torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 4), None, None, 1e-5,
                                                  torch.randn(3, 2), kernel_size=3),
     ValueError, "same shape"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
@pytest.mark.parametrize("i", range(len(BAD)))
def test_every_backend_rejects_bad_input_the_same_way(backend, i):
    call, exc, match = BAD[i]
    with ops.use_backend(backend), pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
@pytest.mark.parametrize("pools,size", [(None, (20, 18)), ((True, True, True, False, False), (36, 34))])
def test_model_fused_matches_reference(sa_type, pools, size):
    # pools=None: the small-input form (no pool before stage 0). The other case pools after the stem too, at odd
    # sizes (17 -> 8 px), so the fused BN-ReLU-max-pool runs at every kind of stage boundary.
    import timm

    model = timm.create_model(f"san10_{sa_type}", small_input=True, num_classes=7, widths=(16, 32, 32, 64, 64),
                              stem_width=16, share_planes=4, layers=(1, 1, 1, 1, 1), stage_pools=pools).double()
    # Random parameters: at the default init (BN bias 0) the centre tap of the symmetric position encoding
    # sits exactly on ReLU's kink, where two correct implementations may pick different subgradients.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    outs = []
    for backend in ("cpu", "reference"):
        model.load_state_dict(initial)
        model.zero_grad()
        with ops.use_backend(backend):
            y = model(x)
            y.square().sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in model.parameters()],
                     [b.clone() for b in model.buffers()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1] + outs[0][2], outs[1][1] + outs[1][2]):
        torch.testing.assert_close(a, b)


def _layer_step_matches_reference(layer, x):
    """Random parameters and running statistics (random BN shifts: with the default zero shift, a pairwise layer's
    centre tap z = p_i - p_i = 0 sits on ReLU's kink, a rounding error away from 0, and backends may round apart),
    then one forward + backward on the cpu and the reference backends from the same state: outputs, gradients
    (input and parameters) and buffers must agree."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        for name, b in layer.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn_like(b))
    initial = {k: v.clone() for k, v in layer.state_dict().items()}
    outs = []
    for backend in ("cpu", "reference"):
        layer.load_state_dict(initial)
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        with ops.use_backend(backend):
            y = layer(xi)
            y.square().sum().backward()
        outs.append((y.detach(), [xi.grad] + [p.grad.clone() for p in layer.parameters()],
                     [b.clone() for b in layer.buffers()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1] + outs[0][2], outs[1][1] + outs[1][2]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
@pytest.mark.parametrize("training", [True, False])
def test_block_fused_bn_relu_conv_matches_reference(sa_type, training, monkeypatch):
    """On maps of >= MIN_FUSED_PIXELS the block runs norm1-act1-(phi|psi|beta) and norm2-act2-proj fused."""
    from torchsan.layers import SelfAttentionBlock, block

    calls = []
    fused = block.bn_relu_conv1x1
    monkeypatch.setattr(block, "bn_relu_conv1x1", lambda *a: calls.append(a[0]) or fused(*a))
    layer = SelfAttentionBlock(32, sa_type, kernel_size=3, share_planes=4).double().train(training)
    x = torch.randn(2, 32, 33, 32, dtype=torch.float64)  # 1056 pixels
    assert x.shape[2] * x.shape[3] >= block.MIN_FUSED_PIXELS
    _layer_step_matches_reference(layer, x)
    assert calls == [layer.norm1, layer.norm2]  # the cpu run fused both pairs; the reference run none


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_torch_compile_fullgraph_matches_eager(sa_type, monkeypatch):
    import timm

    # As in a fresh process: the extension is (re)loaded while the graph is traced.
    monkeypatch.setattr(_cpu, "_ext", None)
    monkeypatch.setattr(_cpu, "_error", None)

    model = timm.create_model(f"san10_{sa_type}", small_input=True, num_classes=5, widths=(16, 32, 32, 64, 64),
                              stem_width=16, share_planes=4, layers=(1, 1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break fails
    with ops.use_backend("cpu"), torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_torch_compile_training_step_matches_eager(sa_type):
    # Training mode: the fused BN-with-batch-statistics ops (gamma, stage boundaries) inside one graph, BN running
    # statistics updated in it, gradients equal to eager's.
    import timm

    kwargs = dict(num_classes=5, widths=(16, 32, 32, 64, 64), stem_width=16, share_planes=4, layers=(1, 1, 1, 1, 1),
                  stage_pools=(True, True, True, False, False))
    model = timm.create_model(f"san10_{sa_type}", **kwargs).train()
    eager = timm.create_model(f"san10_{sa_type}", **kwargs).train()
    eager.load_state_dict(model.state_dict())
    _check_compiled_training_step(model, eager, torch.randn(2, 3, 36, 34))


def _check_compiled_training_step(model, eager, x):
    """One training step of torch.compile(model) (one graph, no break) against eager's on a copy: outputs,
    gradients and BN running statistics."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with ops.use_backend("cpu"):
        y = compiled(x)
        y.square().sum().backward()
        y_eager = eager(x)
        y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-4)
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)
    for a, b in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,cin,cout,spatial,bias", [(2, 18, 16, (9, 23), False), (3, 16, 8, (49, 97), True),
                                                     (1, 5, 3, (1, 7), True), (2, 40, 3, (1, 4099), True),
                                                     (2, 7, 13, (3, 300), True), (1, 1, 1, (1, 1), False),
                                                     (2, 130, 9, (17, 17), True)])
def test_bn_relu_conv_matches_reference(dtype, n, cin, cout, spatial, bias):
    x = torch.randn(n, cin, *spatial, dtype=dtype)
    params = [torch.randn(cin, dtype=dtype), torch.randn(cin, dtype=dtype), torch.randn(cout, cin, dtype=dtype)]
    if bias:
        params.append(torch.randn(cout, dtype=dtype))
    (yf, gf), (yr, gr) = _both(lambda *t: ops.bn_relu_conv(*t), x, *params)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(yf, yr, **tol)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, **tol)


def test_bn_relu_conv_gradcheck_and_opcheck():
    from torch.library import opcheck

    args = [torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True),
            torch.randn(3, dtype=torch.float64, requires_grad=True),
            torch.randn(3, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(2, dtype=torch.float64, requires_grad=True)]
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.bn_relu_conv, args)
    opcheck(torch.ops.torchsan.bn_relu_conv.default, tuple(args))
    opcheck(torch.ops.torchsan.bn_relu_conv.default, (*args[:4], None))


def test_double_backward_through_a_layer():
    from torchsan.layers import PairwiseSelfAttention

    layer = PairwiseSelfAttention(16, 4, 16, share_planes=4, kernel_size=3).double()
    with torch.no_grad():  # random parameters: away from ReLU's kink (see test_model_fused_matches_reference)
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64, requires_grad=True)
    penalties = []
    for backend in ("cpu", "reference"):
        layer.zero_grad()
        with ops.use_backend(backend):
            (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
            gx.square().sum().backward()
        penalties.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*penalties):
        torch.testing.assert_close(a, b)


def test_bn_relu_conv_propagates_nan_like_relu():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x[0, 0, 0, 0] = float("nan")
    args = (x, torch.ones(3, dtype=x.dtype), torch.zeros(3, dtype=x.dtype), torch.randn(2, 3, dtype=x.dtype))
    with ops.use_backend("cpu"):
        fused = ops.bn_relu_conv(*args)
    with ops.use_backend("reference"):
        ref = ops.bn_relu_conv(*args)
    assert torch.equal(fused.isnan(), ref.isnan()) and fused.isnan().any()


def test_raw_ops_check_their_geometry():
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match="reflect padding"):
        torch.ops.torchsan.unfold(x, 3, 1, 4, 1, True)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.torchsan.unfold(x, 5, 1, 0, 1, False)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.torchsan.subtraction2(torch.randn(1, 1, 2, 2), torch.randn(2, 4, 20, 20), 3, 1, 1, 1, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 5, 7, 9), (3, 2, 2, 3), (2, 4, 33, 17)])
def test_bn_relu_maxpool_matches_reference(dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    x[0, 0, :2, :2] = 0.5  # a tie inside one window: the first wins, as in max_pool2d
    scale = torch.randn(shape[1], dtype=dtype)  # some negative: the pool sees the flipped order
    shift = torch.randn(shape[1], dtype=dtype)
    (yf, gf), (yr, gr) = _both(lambda *t: ops.bn_relu_maxpool(*t), x, scale, shift)
    _close(yf, yr, dtype)
    for a, b in zip(gf, gr):
        _close(a, b, dtype)


def test_bn_relu_maxpool_gradcheck_opcheck_nan_threads():
    from torch.library import opcheck

    args = [torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True),
            torch.randn(3, dtype=torch.float64, requires_grad=True),
            torch.randn(3, dtype=torch.float64, requires_grad=True)]
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.bn_relu_maxpool, args)
        assert torch.autograd.gradgradcheck(ops.bn_relu_maxpool, args)
    opcheck(torch.ops.torchsan.bn_relu_maxpool.default, tuple(args))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x[1, 2, 1, 0] = float("nan")
    nan_args = (x, torch.ones(3, dtype=x.dtype), torch.zeros(3, dtype=x.dtype))
    with ops.use_backend("cpu"):
        fused = ops.bn_relu_maxpool(*nan_args)
    assert torch.equal(fused.isnan(), torch.nn.functional.max_pool2d(torch.relu(x), 2, 2).isnan())
    assert fused.isnan().sum() == 1
    x = torch.randn(4, 6, 50, 52)
    scale, shift, grad = torch.randn(6), torch.randn(6), torch.randn(4, 6, 25, 26)
    previous, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(torch.ops.torchsan.bn_relu_maxpool_backward(grad, x, scale, shift))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_bn_relu_maxpool_rejects_bad_input():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="scale must have shape"):
        ops.bn_relu_maxpool(x, torch.ones(4), torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2x2"):
        ops.bn_relu_maxpool(torch.randn(2, 3, 1, 4), torch.ones(3), torch.zeros(3))
    with pytest.raises(TypeError):
        ops.bn_relu_maxpool(x, torch.ones(3, dtype=torch.float64), torch.zeros(3))


def _train_bn_cases():
    conv = lambda *t: ops.batchnorm_relu_conv(*t)  # noqa: E731
    pool = lambda *t: ops.batchnorm_relu_maxpool(*t)  # noqa: E731
    return [("conv", conv, (2, 5, 9, 31), 3), ("conv", conv, (3, 4, 4100), 6), ("pool", pool, (2, 3, 9, 10), None),
            ("pool", pool, (1, 4, 16, 15), None)]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("case", range(4))
def test_batchnorm_fused_ops_match_reference(case, affine):
    # Training-mode BN with gradients through the batch statistics, fused with what follows it; the mean is
    # large against the spread, so a statistic computed as E[x^2] - E[x]^2 would fail here.
    kind, fn, shape, c_out = _train_bn_cases()[case]
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 0.5 + 20.0
    bn = [torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)] if affine else [None, None]
    tensors = [x, *[t for t in bn if t is not None]]
    extra = [torch.randn(c_out, c, dtype=torch.float64), torch.randn(c_out, dtype=torch.float64)] if c_out else []

    def call(x, *rest):
        weight, bias = (rest[0], rest[1]) if affine else (None, None)
        args = list(rest[2:] if affine else rest)
        y, mean, var = fn(x, weight, bias, 1e-5, *args)
        return y + 0.1 * (mean.sum() + var.sum())  # gradients through the returned statistics too

    (yf, gf), (yr, gr) = _both(call, *tensors, *extra)
    torch.testing.assert_close(yf, yr, rtol=1e-9, atol=1e-9)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_batchnorm_fused_ops_gradcheck_and_opcheck():
    from torch.library import opcheck

    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    w, b = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(3, dtype=torch.float64,
                                                                                     requires_grad=True)
    cw, cb = torch.randn(2, 3, dtype=torch.float64, requires_grad=True), torch.randn(2, dtype=torch.float64,
                                                                                     requires_grad=True)
    conv = lambda x, w, b, cw, cb: ops.batchnorm_relu_conv(x, w, b, 1e-5, cw, cb)  # noqa: E731
    pool = lambda x, w, b: ops.batchnorm_relu_maxpool(x, w, b, 1e-5)  # noqa: E731
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(conv, (x, w, b, cw, cb))
        assert torch.autograd.gradgradcheck(conv, (x, w, b, cw, cb))
        assert torch.autograd.gradcheck(pool, (x, w, b))
        assert torch.autograd.gradgradcheck(pool, (x, w, b))
    opcheck(torch.ops.torchsan.batchnorm_relu_conv.default, (x, w, b, 1e-5, cw, cb))
    opcheck(torch.ops.torchsan.batchnorm_relu_conv.default, (x, None, None, 1e-5, cw, None))
    opcheck(torch.ops.torchsan.batchnorm_relu_maxpool.default, (x, w, b, 1e-5))
    # The statistics' share of grad x, added in place to a gradient buffer (the fused backward passes use it).
    stats = (x.detach(), x.detach().mean((0, 2, 3)), torch.randn(3, dtype=torch.float64),
             torch.randn(3, dtype=torch.float64))
    base = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    expected = torch.ops.torchsan.channel_var_mean_backward.default(*stats, base)
    opcheck(torch.ops.torchsan.channel_var_mean_backward_.default, (*stats, base.clone()))
    torch.ops.torchsan.channel_var_mean_backward_.default(*stats, base)
    assert torch.equal(base, expected)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.batchnorm_relu_conv(torch.randn(1, 3, 1), None, None, 1e-5, torch.randn(2, 3))
    with pytest.raises(ValueError, match="eps must be positive"):
        ops.batchnorm_relu_conv(torch.randn(2, 3, 4), None, None, 0.0, torch.randn(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 49, 37), (1, 2, 9, 5), (3, 1, 1, 70), (2, 4, 49, 196)])
def test_tap_softmax_matches_reference(dtype, shape):
    x = torch.randn(shape, dtype=dtype) * 8  # spreads of +-30: large exponents, some tiny probabilities
    (yf, gf), (yr, gr) = _both(ops.tap_softmax, x)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(yf, yr, **tol)
    torch.testing.assert_close(gf[0], gr[0], **tol)


def test_tap_softmax_edges_gradcheck_opcheck_threads():
    from torch.library import opcheck

    # +-inf, NaN and huge values behave like torch.softmax (a NaN or all -inf column gives NaN)
    x = torch.randn(1, 2, 5, 11)
    x[0, 0, :, 0] = float("-inf")
    x[0, 0, 2, 1] = float("nan")
    x[0, 0, 1, 2] = float("inf")
    x[0, 1, :, 3] = torch.tensor([1e30, -1e30, 0.0, 88.0, -88.0])
    x[0, 1, 0, 4] = -200.0
    with ops.use_backend("cpu"):
        y = ops.tap_softmax(x)
    torch.testing.assert_close(y, torch.softmax(x, 2), equal_nan=True)
    xd = torch.randn(2, 3, 4, 9, dtype=torch.float64, requires_grad=True)
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.tap_softmax, (xd,))
        assert torch.autograd.gradgradcheck(ops.tap_softmax, (xd,))
    opcheck(torch.ops.torchsan.tap_softmax.default, (xd,))
    out = torch.softmax(xd.detach(), 2).requires_grad_(True)
    opcheck(torch.ops.torchsan.tap_softmax_backward.default, (torch.randn_like(xd), out))
    big = torch.randn(3, 5, 49, 300)
    previous = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with ops.use_backend("cpu"):
                outs.append(ops.tap_softmax(big))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outs[0], outs[1])


def test_softmax_aggregation_large_planes_match_reference():
    """Planes over 256 KB (SAN stage 1: 49 x 3136) are normalised in a separate pass: same function."""
    x = torch.randn(2, 4, 41, 40, dtype=torch.float64)
    logits = 3 * torch.randn(2, 2, 49, 41 * 40, dtype=torch.float64)  # 49 * 1640 doubles = 643 KB per plane
    (yf, gf), (yr, gr) = _both(lambda a, b: ops.softmax_aggregation(a, b, 7), x, logits)
    _close(yf, yr, torch.float64)
    for a, b in zip(gf, gr):
        _close(a, b, torch.float64)


# --- subtraction2 + training BN + ReLU + conv1x1 without writing z ------------------------------------------------
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
    (3, 1, 1, None, 5, 19, 1),  # wider than kShiftedMaxWidth: padded planes, not shifted copies
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
        y, mean, var = ops.subtraction2_batchnorm_relu_conv(x1, x2, weight, bias, 1e-5, *rest, pad_mode=mode, **fp,
                                                            append=append)
        return y + 0.1 * (mean.sum() + var.sum()) if stats else y  # gradients through the returned statistics too
    return call


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", RELATION_CASES, ids=lambda c: _ids(c[:6]) + f"_append{c[6]}")
def test_subtraction2_batchnorm_relu_conv_matches_reference(case, mode, dtype):
    # The reference backend writes z and runs the two ops; the fused one gathers z's rows where it needs them.
    tensors, fp = _relation_inputs(case, dtype)
    tensors = (tensors[0] * 0.5 + 4.0, *tensors[1:])  # a mean large against the spread
    (yf, gf), (yr, gr) = _both(_relation_call(case[6] is not None, True, mode, **fp), *tensors)
    _close(yf, yr, dtype)
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-9)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, **tol)


def test_subtraction2_batchnorm_relu_conv_gradcheck_opcheck_threads():
    from torch.library import opcheck

    small = [((3, 1, 1, None, 4, 5, 1), True), ((3, 2, 1, 2, 4, 4, 2), False), ((5, 2, 1, None, 6, 5, None), True)]
    for case, affine in small:
        tensors, fp = _relation_inputs(case, torch.float64, affine=affine, n=2, c=2, c_out=2)
        leaves = [t.requires_grad_(True) for t in tensors]
        for mode in MODES:
            call = _relation_call(case[6] is not None, affine, mode, **fp)
            with ops.use_backend("cpu"):
                assert torch.autograd.gradcheck(call, leaves)
                assert torch.autograd.gradgradcheck(call, leaves)
    x1, x2 = torch.randn(2, 3, 7, 8, dtype=torch.float64), torch.randn(2, 3, 7, 8, dtype=torch.float64)
    w, b = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    cw, cb = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for t in (x1, x2, w, b, cw, cb):
        t.requires_grad_(True)
    for batch in (1, 2):
        append = torch.randn(batch, 2, 9, 56, dtype=torch.float64, requires_grad=True)
        for reflect in (True, False):
            opcheck(torch.ops.torchsan.subtraction2_batchnorm_relu_conv.default,
                    (x1, x2, append, w, b, 1e-5, cw, cb, 3, 1, 1, 1, reflect))
    opcheck(torch.ops.torchsan.subtraction2_batchnorm_relu_conv.default,
            (x1, x2, None, None, None, 1e-5, cw[:, :3], None, 5, 2, 2, 1, True))
    # Deterministic: the same bits with 1 and 2 threads (several pixel chunks per image). (Without the statistics
    # term: its gradient would come from torch's sum over y's gradient, which depends on the thread count.)
    q, k = torch.randn(3, 6, 17, 15), torch.randn(3, 6, 17, 15)
    append, cw = torch.randn(1, 2, 49, 255), torch.randn(7, 8)
    previous, outs = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            (y, g), _ = _both(_relation_call(True, False, "reflect", stats=False, kernel_size=7), q, k, append, cw,
                              cw[:, 0])
            outs.append((y, g))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outs[0][0], outs[1][0]) and all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


@pytest.mark.parametrize("training", [True, False])
def test_pairwise_layer_fuses_the_relation_into_gamma(training, monkeypatch):
    """On maps of >= MIN_RELATION_FUSED_PIXELS a training pairwise layer never writes z: same outputs, gradients and
    BN running statistics as the reference backend. In eval mode (running statistics) it runs the ops one by one."""
    from torchsan.layers import PairwiseSelfAttention, attention

    calls = []
    fused = ops.subtraction2_batchnorm_relu_conv
    monkeypatch.setattr(ops, "subtraction2_batchnorm_relu_conv", lambda *a, **k: calls.append(1) or fused(*a, **k))
    layer = PairwiseSelfAttention(16, 4, 16, share_planes=4, kernel_size=5).double().train(training)
    # A wide map (z's rows from padded planes) and a narrow one (from column-shifted copies).
    for h, w in [(29, 28), (9, 8)]:
        assert h * w >= attention.MIN_RELATION_FUSED_PIXELS
        _layer_step_matches_reference(layer, torch.randn(2, 16, h, w, dtype=torch.float64))
    assert len(calls) == (2 if training else 0)
    calls.clear()
    with ops.use_backend("cpu"):
        layer(torch.randn(2, 16, 6, 6, dtype=torch.float64))  # a smaller map: z is written
    assert 6 * 6 < attention.MIN_RELATION_FUSED_PIXELS and calls == []


def test_torch_compile_pairwise_layer_with_fused_relation_matches_eager():
    # A training step of a pairwise layer whose relation is fused into gamma (28 x 28 >= MIN_RELATION_FUSED_PIXELS),
    # traced into one graph (no break at the fused op or its backward).
    from torchsan.layers import PairwiseSelfAttention, attention

    torch.manual_seed(0)
    layer = PairwiseSelfAttention(8, 2, 8, share_planes=2, kernel_size=3).train()
    eager = PairwiseSelfAttention(8, 2, 8, share_planes=2, kernel_size=3).train()
    eager.load_state_dict(layer.state_dict())
    assert 28 * 28 >= attention.MIN_RELATION_FUSED_PIXELS
    _check_compiled_training_step(layer, eager, torch.randn(2, 8, 28, 28))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gathers_on_tiny_maps_match_reference(dtype):
    # The stride-1 gathers run each tap as one vectorised loop over column-shifted copies of the plane: on maps
    # narrower than a vector, and with many planes (a write past one channel's block would hit another's), the
    # results must still be exact, and nothing may be written outside the output.
    for h, w in [(1, 1), (2, 3), (3, 2), (5, 3), (7, 7), (9, 2)]:
        for k in (1, 3, 5):
            x1, x2 = torch.randn(3, 5, h, w, dtype=dtype), torch.randn(3, 5, h, w, dtype=dtype)
            guard = torch.randn(3, 5, h, w, dtype=dtype)  # (best effort) a neighbour in memory that must stay as it is
            before = guard.clone()

            def call(a, b, k=k):
                return ops.subtraction2(a, b, k, pad_mode="zeros") + ops.unfold(b, k, pad_mode="zeros")

            (yf, gf), (yr, gr) = _both(call, x1, x2)
            _close(yf, yr, dtype)
            for a, b in zip(gf, gr):
                _close(a, b, dtype)
            assert torch.equal(guard, before)
