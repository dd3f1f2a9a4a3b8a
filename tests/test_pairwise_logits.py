"""``ops.pairwise_logits`` (subtraction2 and the whole mapping gamma as one op) against the reference composition,
and the pairwise layer that runs it: values, every gradient, BN running statistics, dtypes, what autograd keeps.

The triton kernels run on CPU tensors through Triton's interpreter where there is no GPU (conftest.py sets
``TRITON_INTERPRET=1``): the shapes are small. The reference composition is itself the modules' own function
(``nn.BatchNorm2d``, ``F.conv2d``); the layer tests compare against the modules run one by one.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from conftest import REORDERS_PROGRAMS  # noqa: E402
from torchsan import ops  # noqa: E402
from torchsan.layers import PairwiseSelfAttention  # noqa: E402
from torchsan.ops import _triton  # noqa: E402
from torchsan.ops._triton import pairwise_kernels  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not _triton.available(), reason=f"triton backend: {_triton.unavailable_reason()}")

# (C, E, Cm, Cw): broadcast products (channels under 16: SAN's first stages) and tl.dot (16 and more)
SMALL, DOT = (3, 2, 4, 2), (14, 2, 16, 16)
# (kernel_size, stride, padding, dilation, pad_mode, H, W): odd sizes, stride, dilation, explicit padding
FOOTPRINTS = [
    (3, 1, None, 1, "reflect", 5, 6),
    (3, 2, None, 2, "zeros", 7, 5),
    (5, 2, 1, 1, "reflect", 6, 7),
]


@pytest.fixture(autouse=True)
def _several_programs_per_image(monkeypatch):
    """Blocks of 16 positions: the small maps here span several programs, whose partial sums must combine."""
    monkeypatch.setattr(pairwise_kernels, "BLOCK_L", 16)
    monkeypatch.setattr(pairwise_kernels, "INTERPRETER_BLOCK_L", 16)


def _inputs(channels, footprint, dtype, batch=2, append_batch=1, running=False, seed=0):
    """Leaves for one call: (tensors, norms' running statistics or None, footprint kwargs)."""
    c, e, cm, cw = channels
    ks, stride, padding, dilation, mode, h, w = footprint
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, positive=False):
        t = torch.rand(*shape, generator=gen) + 0.5 if positive else torch.randn(*shape, generator=gen)
        return t.to(DEVICE, dtype)

    fp = ops.resolve_footprint(ks, stride, padding, dilation, mode)
    h_out, w_out = fp.out_hw(h, w)
    tensors = dict(x1=rand(batch, c, h, w), x2=rand(batch, c, h, w),
                   append=rand(append_batch, e, ks * ks, h_out * w_out) if e else None,
                   weight1=rand(c + e, positive=True), bias1=rand(c + e), conv1=rand(cm, c + e) / (c + e) ** 0.5,
                   weight2=rand(cm, positive=True), bias2=rand(cm), conv2=rand(cw, cm) / cm ** 0.5, conv2_bias=rand(cw))
    stats = None
    if running:  # eval-mode BNs: their running statistics
        stats = (rand(c + e), rand(c + e, positive=True), rand(cm), rand(cm, positive=True))
    kwargs = dict(kernel_size=ks, stride=stride, padding=padding, dilation=dilation, pad_mode=mode)
    return tensors, stats, kwargs


def _call(t, stats, kwargs):
    stats = stats or (None,) * 4
    return ops.pairwise_logits(t["x1"], t["x2"], (t["weight1"], t["bias1"], 1e-5, stats[0], stats[1]), t["conv1"],
                               (t["weight2"], t["bias2"], 1e-5, stats[2], stats[3]), t["conv2"], t["conv2_bias"],
                               append=t["append"], **kwargs)


def _run(backend, tensors, stats, kwargs, dtype, grad=None):
    """(outputs, {name: gradient}) on ``backend``, the inputs cast to ``dtype``, for output gradient ``grad``."""
    leaves = {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in tensors.items()}
    with ops.use_backend(backend):
        out = _call(leaves, stats, kwargs)
    if grad is None:
        grad = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(out[0], [leaves[k] for k in names], grad.to(out[0].device, out[0].dtype))
    return out, dict(zip(names, grads)), grad


def _relative(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("footprint", FOOTPRINTS, ids=lambda f: f"k{f[0]}s{f[1]}p{f[2]}d{f[3]}-{f[4]}-{f[5]}x{f[6]}")
@pytest.mark.parametrize("append_batch", [1, 2, None], ids=["append1", "appendN", "no-append"])
def test_matches_reference_float64(footprint, append_batch):
    channels = SMALL if append_batch else (3, 0, 4, 2)
    tensors, stats, kwargs = _inputs(channels, footprint, torch.float64, append_batch=append_batch or 1)
    (out, grads, g), (ref, ref_grads, _) = (_run(b, tensors, stats, kwargs, torch.float64) for b in ("triton",
                                                                                                    "reference"))
    for a, b in zip(out, ref):  # logits, then both BNs' batch mean and biased variance
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-9, msg=name)


def test_running_statistics_float64():
    """Eval-mode BNs (their running statistics given) skip the statistics passes and their batch terms."""
    tensors, stats, kwargs = _inputs(SMALL, FOOTPRINTS[0], torch.float64, running=True)
    (out, grads, _), (ref, ref_grads, _) = (_run(b, tensors, stats, kwargs, torch.float64) for b in ("triton",
                                                                                                    "reference"))
    assert out[1:] == (None,) * 4 and ref[1:] == (None,) * 4
    torch.testing.assert_close(out[0], ref[0], rtol=1e-10, atol=1e-10)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("running", [False, True], ids=["batch-stats", "running-stats"])
def test_gradcheck(running):
    tensors, stats, kwargs = _inputs(SMALL, (3, 1, None, 1, "reflect", 3, 4), torch.float64, batch=1,
                                     running=running)
    names = ["x1", "x2", "append", "weight1", "bias1", "conv1", "weight2", "bias2", "conv2", "conv2_bias"]
    leaves = [tensors[k].requires_grad_() for k in names]

    def fn(*values):
        with ops.use_backend("triton"):
            return _call(dict(zip(names, values)), stats, kwargs)[0]

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


# tl.dot in half precision is the slowest case through the interpreter: those two run with make test-slow.
_HALF_DOT_SLOW = () if CUDA else (pytest.mark.slow,)


@pytest.mark.parametrize("channels, dtype", [
    pytest.param(channels, dtype, id=f"{dtype}-{name}",
                 marks=_HALF_DOT_SLOW if name == "dot" and dtype != torch.float32 else ())
    for channels, name in ((SMALL, "fma"), (DOT, "dot")) for dtype in (torch.float32, torch.bfloat16, torch.float16)])
def test_lower_precision(channels, dtype):
    """Against float64 (relative to the largest value): float32 within 1e-5; float16 and bfloat16 within 1e-2 or, where
    the modules' own error under autocast is larger, within 1.5 times that (BN's backward cancels most of a
    gradient's size, so a bfloat16 forward's rounding shows several times larger in the gradients)."""
    tensors, stats, kwargs = _inputs(channels, (3, 1, None, 1, "reflect", 7, 6), torch.float64)
    tensors = {k: None if v is None else v.to(dtype).double() for k, v in tensors.items()}  # representable
    out, grads, g = _run("triton", tensors, stats, kwargs, dtype)
    g = g.to(dtype).double()
    ref, ref_grads, _ = _run("reference", tensors, stats, kwargs, torch.float64, grad=g)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    modules = (out, grads)  # float32: held to tol alone
    if dtype != torch.float32:
        with torch.autocast(DEVICE, dtype=dtype):
            modules = _run("reference", tensors, stats, kwargs, torch.float32, grad=g)[:2]

    def check(value, reference, autocast, name):
        bound = tol if dtype == torch.float32 else max(tol, 1.5 * _relative(autocast, reference))
        assert _relative(value, reference) < bound, name

    assert out[0].dtype == dtype
    for i, (a, b) in enumerate(zip(out, ref)):
        check(a, b, modules[0][i], f"output {i}")
    for name in grads:
        assert grads[name].dtype == dtype
        check(grads[name], ref_grads[name], modules[1][name], name)


@REORDERS_PROGRAMS
def test_deterministic():
    tensors, stats, kwargs = _inputs(DOT, FOOTPRINTS[0], torch.float32)
    (a, ga, g), (b, gb, _) = (_run("triton", tensors, stats, kwargs, torch.float32) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_double_backward():
    """create_graph: the gradient is itself differentiable (through the reference composition)."""
    tensors, stats, kwargs = _inputs(SMALL, FOOTPRINTS[0], torch.float64)
    results = []
    for backend in ("triton", "reference"):
        x1 = tensors["x1"].detach().clone().requires_grad_()
        with ops.use_backend(backend):
            out = _call({**tensors, "x1": x1}, stats, kwargs)[0]
            (g,) = torch.autograd.grad(out.square().sum(), x1, create_graph=True)
            (gg,) = torch.autograd.grad(g.sin().sum(), x1)
        results.append((g, gg))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bad, message", [
    (lambda t: dict(norm1=(t["weight1"], t["bias1"], 1e-5)), "must be \\(weight, bias, eps"),
    (lambda t: dict(norm1=(t["weight1"][:-1], t["bias1"], 1e-5, None, None)), "norm1's weight must be"),
    (lambda t: dict(norm2=(t["weight2"], t["bias2"], 0.0, None, None)), "eps must be positive"),
    (lambda t: dict(norm2=(t["weight2"], t["bias2"], 1e-5, t["bias2"], None)), "both running_mean"),
    (lambda t: dict(conv1=t["conv1"][:, :-1]), "conv1_weight must have shape"),
    (lambda t: dict(conv2=t["conv2"][:, :-1]), "conv2_weight must have shape"),
])
def test_bad_arguments(bad, message):
    tensors, _, kwargs = _inputs(SMALL, FOOTPRINTS[0], torch.float32)
    args = dict(norm1=(tensors["weight1"], tensors["bias1"], 1e-5, None, None), conv1=tensors["conv1"],
                norm2=(tensors["weight2"], tensors["bias2"], 1e-5, None, None), conv2=tensors["conv2"])
    args.update(bad(tensors))
    with ops.use_backend("triton"), pytest.raises((ValueError, TypeError), match=message):
        ops.pairwise_logits(tensors["x1"], tensors["x2"], args["norm1"], args["conv1"], args["norm2"], args["conv2"],
                            append=tensors["append"], **kwargs)


@pytest.mark.parametrize("batch, channels", [(2, (0, 2, 4, 2)), (0, SMALL)], ids=["no-channels", "empty-batch"])
def test_empty_inputs(batch, channels):
    """C = 0 (only the appended channels; batch statistics) and N = 0 (running statistics: a batch has none)."""
    tensors, stats, kwargs = _inputs(channels, FOOTPRINTS[0], torch.float64, batch=batch, running=batch == 0)
    (out, grads, _), (ref, ref_grads, _) = (_run(b, tensors, stats, kwargs, torch.float64) for b in ("triton",
                                                                                                    "reference"))
    assert out[0].shape == ref[0].shape
    torch.testing.assert_close(out[0], ref[0])
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


# --- the layer -------------------------------------------------------------------------------------------------------
def _layer_pair(training):
    torch.manual_seed(0)
    layer = PairwiseSelfAttention(8, 4, 8, share_planes=4, kernel_size=3).double().to(DEVICE)
    with torch.no_grad():  # non-trivial BN parameters and running statistics
        for m in layer.gamma.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(), m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    layer.train(training)
    return layer, copy.deepcopy(layer)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_matches_modules(training, monkeypatch):
    """The layer on the triton backend runs the whole mapping as one op, and computes what its modules compute one
    by one: output, every gradient, the BN running statistics."""
    fused, modules = _layer_pair(training)
    calls = []
    original = ops.pairwise_logits
    monkeypatch.setattr(ops, "pairwise_logits", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, device=DEVICE)
    results = []
    for layer, backend, fusing in ((fused, "triton", True), (modules, "reference", False)):
        xi = x.clone().requires_grad_()
        with ops.use_backend(backend), ops.fusion(fusing):
            y = layer(xi)
            (gx,) = torch.autograd.grad(y, xi, torch.ones_like(y).cumsum(-1).sin())
        results.append((y, gx, dict(layer.named_parameters()), layer.state_dict()))
    assert len(calls) == 1
    (y, gx, params, state), (y2, gx2, params2, state2) = results
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, gx2, rtol=1e-9, atol=1e-9)
    for name in state:
        torch.testing.assert_close(state[name], state2[name], rtol=1e-10, atol=1e-10, msg=name)


def test_layer_keeps_no_k_times_tensor():
    """What autograd keeps for the backward: nothing larger than the logits (N, Cw, K, L); the modules one by one
    keep z (N, C + 2, K, L) and gamma's activations."""
    fused, modules = _layer_pair(True)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    logits = 2 * (8 // 4) * 9 * 30  # N * Cw * K * L
    for layer, backend, fusing in ((fused, "triton", True), (modules, "reference", False)):
        sizes: list[int] = []

        def keep(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with ops.use_backend(backend), ops.fusion(fusing), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            layer(x)
        if fusing:
            assert max(sizes) <= logits
        else:
            assert max(sizes) >= 2 * (4 + 2) * 9 * 30  # z, the subtraction and position channels


# --- the pipeline ----------------------------------------------------------------------------------------------------
@pytest.mark.slow  # the whole pipeline through Triton's interpreter
def test_train_and_eval_bf16_channels_last(image_folder, tmp_path, monkeypatch):
    """``torchsan train --amp bf16 --channels-last`` and ``torchsan eval`` end to end on the triton backend (a GPU's
    CUDA tensors; here the interpreter's CPU tensors), the pairwise layers through ``pairwise_logits``."""
    monkeypatch.undo()  # the default blocks: the model's maps are larger
    from _cli import train_args
    from torchsan.cli import main

    calls = []
    original = ops.pairwise_logits
    monkeypatch.setattr(ops, "pairwise_logits", lambda *a, **k: calls.append(a[0].dtype) or original(*a, **k))
    run = tmp_path / "run"
    flags = ["--amp", "bf16", "--channels-last"]
    with ops.use_backend("triton"):
        assert main(train_args(image_folder, run, *flags, "--epochs", "1", "--train-subset", "3",
                               "--val-subset", "3", "--batch-size", "3", "--device", "cpu")) == 0
        assert calls and set(calls) == {torch.bfloat16}
        summary = __import__("json").loads((run / "summary.json").read_text())
        assert 0.0 <= summary["best_val_top1"] <= 100.0
        calls.clear()
        assert main(["eval", str(run / "model_best.pth"), "--data", str(image_folder), "--val-subset", "3",
                     *flags]) == 0
        assert calls and set(calls) == {torch.bfloat16}
