"""The cpu backend's gathers, subtraction2 (with append), subtraction and unfold (``ops/_cpu/gathers.py``), against
the reference backend: every footprint, the eager fast path, the streamed and staged writes of large outputs (at
sizes read from ``kernel_constants()``), tiny maps, and writes outside the output (the guarded allocator)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from _helpers import (
    CASES,
    DTYPES,
    MODES,
    assert_close,
    assert_matches_reference,
    both,
    case_id,
    guarded_allocations,
    needs_cpu_kernels,
)
from torchsan import ops
from torchsan.ops import _cpu

pytestmark = needs_cpu_kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gathers_match_reference(case, mode, dtype):
    k, s, d, p, h, w = case
    args = (k, s, p, d, mode)
    ho, wo = ops.output_size((h, w), k, s, p, d)
    x, x2 = torch.randn(2, 12, h, w, dtype=dtype), torch.randn(2, 12, h, w, dtype=dtype)
    append1 = torch.randn(1, 2, k * k, ho * wo, dtype=dtype)  # broadcast over the batch, like the position encoding
    append2 = torch.randn(2, 3, k * k, ho * wo, dtype=dtype)
    for fn, inputs in [(lambda a, b: ops.subtraction2(a, b, *args), (x, x2)),
                       (lambda a, b, e: ops.subtraction2(a, b, *args, append=e), (x, x2, append1)),
                       (lambda a, b, e: ops.subtraction2(a, b, *args, append=e), (x, x2, append2)),
                       (lambda a: ops.subtraction(a, *args), (x,)),
                       (lambda a: ops.unfold(a, *args), (x,))]:
        assert_matches_reference(fn, *inputs)


def test_noncontiguous_and_channels_last():
    x = torch.randn(1, 16, 12, 10).to(memory_format=torch.channels_last)
    xt = torch.randn(1, 16, 10, 12).transpose(2, 3)  # (1, 16, 12, 10), non-contiguous
    append = torch.randn(1, 49, 2, 120).transpose(1, 2)  # (1, 2, 49, 120), non-contiguous
    for inp in (x, xt):
        assert_matches_reference(lambda a, b: ops.subtraction2(a, b, 7, pad_mode="zeros"), inp, xt)
        assert_matches_reference(lambda a, b, e: ops.subtraction2(a, b, 7, append=e), inp, x, append)
        assert_matches_reference(lambda a: ops.unfold(a, 5, dilation=2, pad_mode="zeros"), inp)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_and_gradgradcheck(mode):
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    append = torch.randn(1, 2, 9, 6, dtype=torch.float64, requires_grad=True)
    sub = lambda a, b: ops.subtraction2(a, b, 3, stride=2, pad_mode=mode)  # noqa: E731
    sub_padded = lambda a, b: ops.subtraction2(a, b, 3, padding=2, pad_mode=mode)  # noqa: E731
    sub_append = lambda a, b, e: ops.subtraction2(a, b, 3, stride=2, pad_mode=mode, append=e)  # noqa: E731
    unf = lambda a: ops.unfold(a, 3, dilation=2, pad_mode=mode)  # noqa: E731
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b: ops.subtraction2(a, b, 3, pad_mode=mode), (x, x2))
        for fn, inputs in [(sub, (x, x2)), (sub_padded, (x, x2)), (sub_append, (x, x2, append)), (unf, (x,)),
                           (lambda a: ops.subtraction(a, 3, pad_mode=mode), (x,))]:
            assert torch.autograd.gradcheck(fn, inputs)
            assert torch.autograd.gradgradcheck(fn, inputs)


def test_append_of_batch_one_gets_the_summed_gradient():
    x1, x2 = torch.randn(3, 2, 5, 6, dtype=torch.float64), torch.randn(3, 2, 5, 6, dtype=torch.float64)
    append = torch.randn(1, 2, 9, 30, dtype=torch.float64)
    (_, (_, _, g_append)), (_, (_, _, g_ref)) = both(lambda a, b, e: ops.subtraction2(a, b, 3, append=e), x1, x2,
                                                      append)
    assert g_append.shape == (1, 2, 9, 30)
    assert_close(g_append, g_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_fast_path_matches_the_custom_ops(dtype):
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


# --- large outputs: streamed, or staged through a plane buffer -------------------------------------------------------
def _gathers(x1, x2, k):
    return [("subtraction2", lambda: ops.subtraction2(x1, x2, k)), ("unfold", lambda: ops.unfold(x2, k))]


def _forward_guarded_matches_reference(fn, name):
    """fn() on the cpu backend with guards around every allocation, against the reference backend, bit for bit;
    returns the output's size in bytes."""
    with guarded_allocations() as guards, ops.use_backend("cpu"):
        fused = fn()
        assert guards.check(fused) == "intact", name  # the output itself sat between guards, untouched
    with ops.use_backend("reference"):
        torch.testing.assert_close(fused, fn(), rtol=0, atol=0, msg=name)
    size = fused.numel() * fused.element_size()
    del fused  # freed: its guards are checked now
    assert guards.violations == 0, name
    return size


@pytest.mark.parametrize("side", ["below", "streamed"])
def test_gathers_on_both_sides_of_the_streaming_threshold(side):
    # Stride-1 outputs of stream_bytes and more, with taps of stream_run_bytes and more, are written with streaming
    # stores: taps of 15 KB here, starting at unaligned addresses (L = 63 * 61 is odd); just below: normal stores.
    c = _cpu.kernel_constants()
    n, k, h, w = 2, 7, 63, 61
    tap = h * w * 4
    assert tap >= c["stream_run_bytes"]
    per_channel = n * k * k * tap
    channels = -(-c["stream_bytes"] // per_channel) - (side == "below")  # the fewest that reach it, or one fewer
    x1, x2 = torch.randn(n, channels, h, w), torch.randn(n, channels, h, w)
    assert (channels * per_channel >= c["stream_bytes"]) == (side == "streamed")
    for name, fn in _gathers(x1, x2, k):
        _forward_guarded_matches_reference(fn, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gathers_staged_through_a_plane_buffer_match_reference(dtype):
    # Outputs over staged_stream_bytes (and under stream_bytes or with taps under stream_run_bytes) with taps of
    # staged_run_bytes and more and planes up to small_plane_bytes are gathered plane by plane into a buffer and
    # streamed out: planes of 49 * 143 or 49 * 99 values, so most planes start unaligned. The backward prefetches the
    # next plane's gradient on the same shapes.
    c = _cpu.kernel_constants()
    n, k, (h, w) = 2, 7, ((11, 13) if dtype == torch.float32 else (9, 11))
    size = torch.empty(0, dtype=dtype).element_size()
    tap = h * w * size
    assert c["staged_run_bytes"] <= tap < c["stream_run_bytes"] and k * k * tap <= c["small_plane_bytes"]
    channels = c["staged_stream_bytes"] // (n * k * k * tap) + 1
    x1, x2 = torch.randn(n, channels, h, w, dtype=dtype), torch.randn(n, channels, h, w, dtype=dtype)
    for name, fn in _gathers(x1, x2, k):
        assert _forward_guarded_matches_reference(fn, name) > c["staged_stream_bytes"]
    for fn, inputs in [(lambda a, b: ops.subtraction2(a, b, k), (x1, x2)), (lambda a: ops.unfold(a, k), (x2,))]:
        (_, g0), (_, g1) = both(fn, *inputs)
        for a, b in zip(g0, g1):
            torch.testing.assert_close(a, b)


# --- tiny maps, and nothing written outside the output ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_gathers_on_tiny_maps_match_reference_and_stay_inside_their_outputs(dtype):
    # The stride-1 gathers run each tap as one vectorised loop over column-shifted copies of the plane: on maps
    # narrower than a vector, and with many planes (a write past one channel's block would hit another's), the
    # results must still be exact, and nothing may be written outside the output (or outside the gradients, in the
    # backward): every tensor torch allocates meanwhile sits between guard regions, checked when it is freed.
    for h, w in [(1, 1), (2, 3), (3, 2), (5, 3), (7, 7), (9, 2)]:
        for k in (1, 3, 5):
            x1, x2 = torch.randn(3, 5, h, w, dtype=dtype), torch.randn(3, 5, h, w, dtype=dtype)
            append = torch.randn(1, 2, k * k, h * w, dtype=dtype)

            def call(a, b, e, k=k):
                return ops.subtraction2(a, b, k, pad_mode="zeros", append=e) + torch.cat(
                    [ops.unfold(b, k, pad_mode="zeros"), ops.subtraction(a, k, pad_mode="zeros")[:, :2]], 1)

            with guarded_allocations() as guards:
                (yf, gf), (yr, gr) = both(call, x1, x2, append)
                assert [guards.check(t) for t in (yf, *gf)] == ["intact"] * 4  # the kernels' outputs, guarded
                assert_close(yf, yr, dtype)
                for a, b in zip(gf, gr):
                    assert_close(a, b, dtype)
                del yf, gf, yr, gr  # freed: their guards are checked now
            assert guards.allocations > 0 and guards.violations == 0, (h, w, k)


def test_the_guards_catch_a_write_outside_an_output():
    """The check above can fail: one value written just past a gather's output, or just before it, is caught."""
    x = torch.randn(3, 5, 2, 3)
    for offset in (lambda t: t.numel() * t.element_size(), lambda t: -t.element_size()):
        with guarded_allocations() as guards, ops.use_backend("cpu"):
            out = ops.unfold(x, 3, pad_mode="zeros")
            assert guards.check(out) == "intact"
            ctypes.memset(out.data_ptr() + offset(out), 0, out.element_size())
            assert guards.check(out) == "written"
            del out
        assert guards.violations == 1


def test_raw_ops_check_their_geometry():
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match="reflect padding"):
        torch.ops.torchsan.unfold(x, 3, 1, 4, 1, True)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.torchsan.unfold(x, 5, 1, 0, 1, False)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.torchsan.subtraction2(torch.randn(1, 1, 2, 2), torch.randn(2, 4, 20, 20), None, 3, 1, 1, 1, False)
    with pytest.raises(RuntimeError, match="append must be"):
        torch.ops.torchsan.subtraction2(x, x, torch.randn(1, 1, 9, 8), 3, 1, 1, 1, False)
