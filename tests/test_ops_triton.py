"""The triton backend's kernels against the reference ops: values, gradients, dtypes, determinism, dispatch.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set
by conftest.py before anything imports triton): slow, so the shapes are small. With a GPU they run on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")

import timm  # noqa: E402

from conftest import REORDERS_PROGRAMS, TINY_SAN  # noqa: E402
from torchsan import ops  # noqa: E402
from torchsan.ops import _triton  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not _triton.available(), reason=f"triton backend: {_triton.unavailable_reason()}")

# (kernel_size, stride, padding, dilation, pad_mode, H, W): odd sizes, stride, dilation, explicit padding, both modes
FOOTPRINTS = [
    (3, 1, None, 1, "reflect", 7, 6),
    (3, 2, None, 1, "zeros", 7, 5),
    (5, 1, 4, 2, "reflect", 7, 6),
    (3, 2, 2, 1, "reflect", 6, 5),
    (7, 1, None, 1, "zeros", 3, 4),
]


def _ids(case):
    k, s, p, d, mode, h, w = case
    return f"k{k}s{s}p{p}d{d}-{mode}-{h}x{w}"


def _both(fn, *inputs, dtype=torch.float64):
    """fn on the triton and on the reference backend: [(output, input gradients)] for one random output gradient."""
    results, grad = [], None
    for backend in ("triton", "reference"):
        leaves = [t.detach().to(DEVICE, dtype).requires_grad_(t.is_floating_point()) for t in inputs]
        with ops.use_backend(backend):
            out = fn(*leaves)
        if grad is None:  # the same for every dtype: a fixed seed
            grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            grad = grad.to(out.device, out.dtype)
        grads = torch.autograd.grad(out, leaves, grad)
        results.append((out, grads))
    return results


def _close(a, b, dtype):
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    if dtype in (torch.bfloat16, torch.float16):
        tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.double(), b.double(), **tol)


@pytest.mark.parametrize("case", FOOTPRINTS, ids=_ids)
def test_gathers_match_reference(case):
    k, s, p, d, mode, h, w = case
    fp = dict(kernel_size=k, stride=s, padding=p, dilation=d, pad_mode=mode)
    x1, x2 = torch.randn(1, 2, h, w), torch.randn(1, 2, h, w)
    length = ops.output_size((h, w), k, s, p, d)
    append = torch.randn(1, 2, k * k, length[0] * length[1])
    for fn, inputs in ((lambda a, b: ops.subtraction2(a, b, **fp), (x1, x2)),
                       (lambda a, b, e: ops.subtraction2(a, b, **fp, append=e), (x1, x2, append)),
                       (lambda a: ops.subtraction(a, **fp), (x1,)),
                       (lambda a: ops.unfold(a, **fp), (x2,))):
        (out, grads), (ref, ref_grads) = _both(fn, *inputs)
        _close(out, ref, torch.float64)
        for g, r in zip(grads, ref_grads):
            _close(g, r, torch.float64)


@pytest.mark.parametrize("case", FOOTPRINTS[:4], ids=_ids)
@pytest.mark.parametrize("softmax", [False, True], ids=["aggregation", "softmax_aggregation"])
def test_aggregation_matches_reference(case, softmax):
    k, s, p, d, mode, h, w = case
    fp = dict(kernel_size=k, stride=s, padding=p, dilation=d, pad_mode=mode)
    h_out, w_out = ops.output_size((h, w), k, s, p, d)
    x, weight = torch.randn(2, 6, h, w), torch.randn(2, 2, k * k, h_out * w_out)  # channel c uses weight c % 2
    fn = ops.softmax_aggregation if softmax else ops.aggregation
    (out, grads), (ref, ref_grads) = _both(lambda a, b: fn(a, b, **fp), x, weight)
    _close(out, ref, torch.float64)
    for g, r in zip(grads, ref_grads):
        _close(g, r, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_float32(dtype):
    x, logits = torch.randn(1, 4, 6, 7), torch.randn(1, 2, 9, 42)
    (out, grads), _ = _both(lambda a, b: ops.softmax_aggregation(a, b, 3), x, logits, dtype=dtype)
    (ref, ref_grads), _ = _both(lambda a, b: ops.softmax_aggregation(a, b, 3), x, logits, dtype=torch.float64)
    assert out.dtype == dtype
    _close(out, ref, dtype)
    for g, r in zip(grads, ref_grads):
        _close(g, r, dtype)
    (d, _), _ = _both(lambda a, b: ops.subtraction2(a, b, 3, pad_mode="zeros"), x, x * 0.5, dtype=dtype)
    (dr, _), _ = _both(lambda a, b: ops.subtraction2(a, b, 3, pad_mode="zeros"), x, x * 0.5)
    assert d.dtype == dtype
    _close(d, dr, dtype)


def test_gradcheck_float64():
    x = torch.randn(1, 4, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    logits = torch.randn(1, 2, 9, 20, dtype=torch.float64, device=DEVICE, requires_grad=True)
    append = torch.randn(1, 1, 9, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.randn(1, 2, 4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with ops.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda a, b: ops.softmax_aggregation(a, b, 3), (x, logits), fast_mode=True)
        assert torch.autograd.gradcheck(lambda a, b: ops.aggregation(a, b, 3), (x, logits), fast_mode=True)
        assert torch.autograd.gradcheck(lambda a, e: ops.subtraction2(a, a * a, 3, stride=2, append=e), (y, append),
                                        fast_mode=True)
        assert torch.autograd.gradcheck(lambda a: ops.unfold(a, 3, dilation=2, pad_mode="zeros"), (x,),
                                        fast_mode=True)


@REORDERS_PROGRAMS
def test_backward_is_deterministic():
    x = torch.randn(2, 4, 6, 6, device=DEVICE, requires_grad=True)
    logits = torch.randn(2, 2, 9, 36, device=DEVICE, requires_grad=True)
    grad = torch.randn(2, 4, 6, 6, device=DEVICE)
    with ops.use_backend("triton"):
        first = torch.autograd.grad(ops.softmax_aggregation(x, logits, 3), (x, logits), grad)
        second = torch.autograd.grad(ops.softmax_aggregation(x, logits, 3), (x, logits), grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_ops_are_the_same_custom_ops():
    # The triton kernels are the CUDA kernels of the cpu backend's torch.ops.torchsan ops: one op for every device.
    x = torch.randn(1, 2, 5, 5, device=DEVICE)
    with ops.use_backend("triton"):
        out = torch.ops.torchsan.unfold(x, 3, 1, 1, 1, True)
    with ops.use_backend("reference"):
        ref = ops.unfold(x, 3)
    torch.testing.assert_close(out, ref)


def test_dispatch(monkeypatch):
    x = torch.randn(1, 2, 4, 4)
    assert ops.backend_for(x) in ("cpu", "reference")  # auto never sends CPU tensors through the interpreter
    if not CUDA:
        with ops.use_backend("triton"):
            assert ops.backend_for(x) == "triton"  # forced, under the interpreter
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            with pytest.raises(ValueError, match="backend 'triton' serves CUDA tensors"):
                ops.unfold(x, 3)


def _slow_without_gpu(test):
    """Through the interpreter, for make test-slow only."""
    return test if CUDA else pytest.mark.slow(test)


@_slow_without_gpu  # the whole model: every op it runs is tested alone above
def test_tiny_san_matches_reference():
    # The whole model on this backend (its fused softmax + aggregation and gather with append included).
    model = timm.create_model("san10_pairwise", num_classes=3, **TINY_SAN)
    model = model.double().to(DEVICE)
    with torch.no_grad():  # off the ReLU kinks: at init a tap's position difference p_i - p_i = 0 meets a mean of ~0
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.uniform_(0.1, 0.3)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        model.zero_grad()
        with ops.use_backend(backend):
            out = model(x)
            out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out, grads), (ref, ref_grads) = results
    _close(out, ref, torch.float64)
    for g, r in zip(grads, ref_grads):
        _close(g, r, torch.float64)


@pytest.mark.parametrize("n,c", [(0, 4), (2, 0)], ids=["empty-batch", "no-channels"])
def test_empty_inputs(n, c):
    x, logits = torch.randn(n, c, 5, 5), torch.randn(n, 1, 9, 25)
    for fn, inputs in ((lambda a, b: ops.softmax_aggregation(a, b, 3), (x, logits)),
                       (lambda a, b: ops.aggregation(a, b, 3), (x, logits)),
                       (lambda a: ops.subtraction2(a, a * 2, 3), (x,)),
                       (lambda a: ops.unfold(a, 3, stride=2), (x,))):
        (out, grads), (ref, ref_grads) = _both(fn, *inputs)
        assert out.shape == ref.shape
        for g, r in zip(grads, ref_grads):
            assert g.shape == r.shape
            _close(g, r, torch.float64)
