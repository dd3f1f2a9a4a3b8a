"""When the layers run fused ops instead of their modules (``torchsan/ops/_fusion.py``), and that both routes compute
the same function.

1. The policy: the switch ``ops.fusion`` (its state, nesting, threads, ``TORCHSAN_FUSION``), hooks, unknown ops, and
   each backend's ``fuses`` answers on both sides of each of its thresholds (read from the backend's constants).
2. Every fused route, proved to run by counting calls of the ``torchsan.ops`` function it calls (the layers call
   the ops through the module attribute): the mapping's BN-ReLU-conv1x1 triples, the block's BN-ReLU-conv1x1 pairs,
   the stage boundaries' BN-ReLU-max-pool (stem and stages), the relation gathered straight into gamma, z written
   in one pass, the softmax inside the aggregation and phi, psi and beta stacked into one convolution. In each case
   the fused route and the modules route (``ops.fusion(False)``, which calls none of them) agree in float64:
   outputs, every gradient, BN running statistics; in training and eval mode, pairwise and patchwise; for a layer,
   a block, a stage and the whole model (there against the modules on the reference backend).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from _helpers import count_calls, needs_cpu_kernels, randomise
from torchsan import ops
from torchsan.layers import (
    PairwiseSelfAttention,
    PatchwiseSelfAttention,
    SelfAttentionBlock,
    attention,
    build_mapping,
    fused,
)
from torchsan.models.san import SANStage, SANStem
from torchsan.ops import _cpu, reference

DEFAULT = os.environ.get("TORCHSAN_FUSION", "1") == "1"
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def _fusion_as_found():
    """Every test starts with the default and leaves it so (a failing test must not switch fusion off for the rest)."""
    assert ops.fusion_enabled() == DEFAULT
    yield
    ops.set_fusion(DEFAULT)


# --- 1. the policy ---------------------------------------------------------------------------------------------------
def test_the_switch_nests_and_restores_its_state():
    with ops.fusion(False):
        assert not ops.fusion_enabled()
        with ops.fusion(True):
            assert ops.fusion_enabled()
            with ops.fusion(False):
                assert not ops.fusion_enabled()
            assert ops.fusion_enabled()
        assert not ops.fusion_enabled()
        with ops.fusion():  # on, by default
            assert ops.fusion_enabled()
    assert ops.fusion_enabled() == DEFAULT
    with pytest.raises(KeyError), ops.fusion(False):
        raise KeyError("restored on the way out of an exception too")
    assert ops.fusion_enabled() == DEFAULT
    ops.set_fusion(False)
    assert not ops.fusion_enabled()
    with ops.fusion(True):
        assert ops.fusion_enabled()
    assert not ops.fusion_enabled()  # back to what set_fusion left
    ops.set_fusion(True)
    assert ops.fusion_enabled()


def test_the_switch_is_per_thread():
    seen = {}

    def look(key, switch=None):
        if switch is not None:
            ops.set_fusion(switch)
        seen[key] = ops.fusion_enabled()

    with ops.fusion(False):
        thread = threading.Thread(target=look, args=("other thread",))
        thread.start()
        thread.join()
        assert not ops.fusion_enabled()
    assert seen["other thread"] == DEFAULT
    thread = threading.Thread(target=look, args=("switched there", not DEFAULT))
    thread.start()
    thread.join()
    assert seen["switched there"] == (not DEFAULT) and ops.fusion_enabled() == DEFAULT


def _import_with(value):
    probe = "import torchsan.ops as o; print(o.fusion_enabled())"
    env = dict(os.environ, TORCHSAN_FUSION=value, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)


def test_the_environment_sets_every_threads_default():
    off = _import_with("0")
    assert off.returncode == 0 and off.stdout.split() == ["False"], off.stderr
    bad = _import_with("yes")
    assert bad.returncode != 0 and "TORCHSAN_FUSION='yes' must be 0 or 1" in bad.stderr


def test_should_fuse_rejects_an_unknown_op():
    x = torch.randn(1, 2, 3, 3)
    for enabled in (True, False):
        with ops.fusion(enabled), pytest.raises(ValueError, match="unknown fused op 'conv3x3'"):
            ops.should_fuse("conv3x3", x)


HOOKS = ["register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
         "register_full_backward_pre_hook"]


@needs_cpu_kernels
def test_should_fuse_is_false_when_switched_off_or_when_a_module_has_hooks():
    x = torch.randn(2, 8, 16, 16)
    bn, act, conv = nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1)

    def asks():
        return ops.should_fuse("batchnorm_relu_conv1x1", x, bn, act, conv, out_channels=8)

    assert asks()
    with ops.fusion(False):
        assert not asks()
        assert not any(ops.should_fuse(op, x, in_channels=8, out_channels=8, positions=256) for op in ops.FUSED_OPS)
    for name in HOOKS:
        for module in (bn, act, conv):
            handle = getattr(module, name)(lambda *args: None)
            assert not asks(), (name, module)
            handle.remove()
            assert asks()
    for name in HOOKS:  # the global ones: every module has them
        handle = getattr(module_hooks, name.replace("register_", "register_module_"))(lambda *args: None)
        assert not asks(), name
        handle.remove()
        assert asks()


def _meta(c, *spatial):
    return torch.empty(2, c, *spatial, device="meta")


@needs_cpu_kernels
@pytest.mark.parametrize("op", ["affine_relu_conv1x1", "batchnorm_relu_conv1x1"])
def test_cpu_fuses_conv1x1_on_both_sides_of_each_threshold(op):
    max_in, max_out = _cpu.CONV1X1_MAX_IN_CHANNELS, _cpu.CONV1X1_MAX_OUT_CHANNELS
    per_output, narrow, narrow_min = (_cpu.CONV1X1_POSITIONS_PER_OUTPUT, _cpu.CONV1X1_NARROW_INPUT,
                                      _cpu.CONV1X1_NARROW_MIN_POSITIONS)

    def fuses(c_in, c_out, positions):
        return _cpu.fuses(op, _meta(c_in, 1, positions), out_channels=c_out)

    many = 4 * per_output * max_out
    assert fuses(max_in, 8, many) and not fuses(max_in + 1, 8, many)  # the widest input
    assert fuses(64, max_out, many) and not fuses(64, max_out + 1, many)  # the widest output
    wide = narrow + 1  # positions per output channel
    assert fuses(wide, 16, per_output * 16) and not fuses(wide, 16, per_output * 16 - 1)
    c_out = narrow_min  # narrow inputs: enough positions, though fewer than per_output * c_out
    assert per_output * c_out > narrow_min
    assert fuses(narrow, c_out, narrow_min) and not fuses(narrow, c_out, narrow_min - 1)
    assert not fuses(wide, c_out, narrow_min)  # (the narrow rule stops at CONV1X1_NARROW_INPUT channels)
    # positions: all spatial dimensions together, whatever their number
    assert fuses(wide, 16, per_output * 16) == _cpu.fuses(op, _meta(wide, 4, 12), out_channels=16)
    assert not _cpu.fuses(op, _meta(wide, 47), out_channels=16)
    # ops.should_fuse asks the backend that serves the input
    x = torch.empty(2, wide, 4, 12)
    assert ops.should_fuse(op, x, out_channels=16) and not ops.should_fuse(op, x, out_channels=17)


@needs_cpu_kernels
def test_cpu_fuses_the_relation_on_both_sides_of_each_threshold():
    op, min_positions = "subtraction2_batchnorm_relu_conv1x1", _cpu.SUBTRACTION2_CONV1X1_MIN_POSITIONS
    max_in, max_out = _cpu.CONV1X1_MAX_IN_CHANNELS, _cpu.CONV1X1_MAX_OUT_CHANNELS

    def fuses(c_in, positions, c_out=8):  # c_in: z's channels, the conv's input (x1's, plus the appended)
        return _cpu.fuses(op, _meta(4, 5, 5), in_channels=c_in, positions=positions, out_channels=c_out)

    assert fuses(6, min_positions) and not fuses(6, min_positions - 1)
    assert fuses(6, min_positions, max_out) and not fuses(6, min_positions, max_out + 1)
    assert fuses(max_in, min_positions) and not fuses(max_in + 1, min_positions)
    x = torch.empty(2, 4, 5, 5)
    assert ops.should_fuse(op, x, positions=min_positions, in_channels=6, out_channels=8)
    assert not ops.should_fuse(op, x, positions=min_positions - 1, in_channels=6, out_channels=8)


@needs_cpu_kernels
def test_cpu_always_fuses_the_ops_without_a_threshold():
    tiny = torch.empty(1, 1, 2, 2)
    for op in ("affine_relu_maxpool2x2", "batchnorm_relu_maxpool2x2", "subtraction2_append", "softmax_aggregation",
               "tap_softmax", "stacked_conv1x1"):
        assert _cpu.fuses(op, tiny) and ops.should_fuse(op, tiny), op


def test_reference_backend_fuses_only_the_stacked_transforms():
    x = torch.randn(2, 8, 16, 16)
    for op in ops.FUSED_OPS:
        expected = op == "stacked_conv1x1"
        shape = dict(in_channels=8, out_channels=8, positions=256)
        assert reference.fuses(op, x, **shape) == expected, op
        with ops.use_backend("reference"):
            assert ops.should_fuse(op, x, **shape) == expected, op
        with ops.use_backend("auto"):  # bfloat16 is the reference backend's at "auto"
            assert ops.should_fuse(op, x.bfloat16(), **shape) == expected, op


# --- 2. the fused routes ---------------------------------------------------------------------------------------------
# The torchsan.ops functions the fused routes call, and how a call is recorded: conv1x1 ops by (in, out) channels,
# pools by input (C, H, W), the relation by z's channels and the conv's output channels, the softmax and the
# aggregation by channels; subtraction2 only with an append (z written in one pass).
def _signature(name, args, kwargs):
    if name == "affine_relu_conv1x1":
        return args[0].shape[1], args[3].shape[0]
    if name == "batchnorm_relu_conv1x1":
        return args[0].shape[1], args[4].shape[0]
    if name.endswith("maxpool2x2"):
        return tuple(args[0].shape[1:])
    if name == "subtraction2_batchnorm_relu_conv1x1":
        append = kwargs.get("append")
        return args[0].shape[1] + (0 if append is None else append.shape[1]), args[5].shape[0]
    if name in ("softmax_aggregation", "tap_softmax"):
        return args[0].shape[1]
    if name == "pairwise_logits":  # (z's channels, gamma's hidden and output channels)
        return args[3].shape[1], args[3].shape[0], args[5].shape[0]
    assert name == "subtraction2"
    append = kwargs.get("append")
    return None if append is None else (args[0].shape[1], append.shape[1])


FUSED_FUNCTIONS = ("affine_relu_conv1x1", "batchnorm_relu_conv1x1", "affine_relu_maxpool2x2",
                   "batchnorm_relu_maxpool2x2", "conv1x1_affine_relu_maxpool2x2", "conv1x1_batchnorm_relu_maxpool2x2",
                   "subtraction2_batchnorm_relu_conv1x1", "softmax_aggregation", "tap_softmax", "subtraction2",
                   "pairwise_logits")


class FusedCalls:
    """Counts the calls of every fused op (see _signature) and of the stacked transforms."""

    def __init__(self, monkeypatch):
        self._calls = count_calls(monkeypatch, *FUSED_FUNCTIONS)
        self._stacked = []
        stacked_transform = attention._SelfAttention.stacked_transform

        def counting(layer):
            self._stacked.append(layer.in_channels)
            return stacked_transform(layer)

        monkeypatch.setattr(attention._SelfAttention, "stacked_transform", counting)

    def clear(self):
        for recorded in self._calls.values():
            recorded.clear()
        self._stacked.clear()

    def summary(self):
        """{op: sorted signatures of its calls} (subtraction2 with an append as "subtraction2_append"), the ops
        that ran only."""
        out = {}
        for name, recorded in self._calls.items():
            for args, kwargs in recorded:
                sig = _signature(name, args, kwargs)
                if sig is not None:
                    out.setdefault("subtraction2_append" if name == "subtraction2" else name, []).append(sig)
        if self._stacked:
            out["stacked_conv1x1"] = self._stacked
        return {name: sorted(sigs) for name, sigs in out.items()}


@pytest.fixture
def calls(monkeypatch):
    return FusedCalls(monkeypatch)


def compare_routes(module, x, calls, *, train, modules_backend="cpu"):
    """One step (forward, backward of a random projection of the output) of ``module`` in float64 on the fused
    route (cpu backend) and on the modules route (``ops.fusion(False)``, on ``modules_backend``), from the same
    random state: outputs, the input's and every parameter's gradient and every buffer must agree, and the modules
    route must call no fused op. Returns the fused route's calls (FusedCalls.summary)."""
    randomise(module).double().train(train)
    initial = copy.deepcopy(module.state_dict())
    results, summaries = [], []
    for fused_route in (True, False):
        module.load_state_dict(initial)
        module.zero_grad(set_to_none=True)
        calls.clear()
        xi = x.detach().clone().requires_grad_(True)
        with ops.use_backend("cpu" if fused_route else modules_backend), ops.fusion(fused_route):
            y = module(xi)
            (y * torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2))).sum().backward()
        summaries.append(calls.summary())
        results.append((y.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()},
                        {n: b.clone() for n, b in module.named_buffers()}))
    (y0, gx0, gp0, b0), (y1, gx1, gp1, b1) = results
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(gx0, gx1)
    assert gp0.keys() == gp1.keys() and b0.keys() == b1.keys()
    for name in gp0:
        assert (gp0[name] is None) == (gp1[name] is None), name
        if gp0[name] is not None:
            torch.testing.assert_close(gp0[name], gp1[name], msg=name)
    for name in b0:
        torch.testing.assert_close(b0[name], b1[name], rtol=1e-7, atol=1e-9, msg=name)
    assert summaries[1] == {}, f"the modules route ran fused ops: {summaries[1]}"
    return summaries[0]


class Mapping(nn.Module):
    """gamma(z) through torchsan.layers.fused.run_mapping."""

    def __init__(self, spec, *channels):
        super().__init__()
        self.gamma = build_mapping(spec, *channels)

    def forward(self, z):
        return fused.run_mapping(self.gamma, z)


MAPPING_CHANNELS = {"small": (6, 5, 3), "stage3": (34, 32, 4)}  # stage3: SAN10's stage-3 gamma widths


@needs_cpu_kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spec", ["R-L-R-L", "L-R-L", "R-L", "L"])
@pytest.mark.parametrize("channels", ["small", "stage3"])
def test_mapping_triples(spec, channels, train, calls):
    c_in, hidden, c_out = MAPPING_CHANNELS[channels]
    z = torch.randn(2, c_in, 9, 13, dtype=torch.float64)  # 117 positions: enough for every triple here
    assert 9 * 13 >= max(_cpu.CONV1X1_NARROW_MIN_POSITIONS, _cpu.CONV1X1_POSITIONS_PER_OUTPUT * hidden)
    triples = {"R-L-R-L": [(c_in, hidden), (hidden, c_out)], "L-R-L": [(hidden, c_out)], "R-L": [(c_in, c_out)],
               "L": []}[spec]
    op = "batchnorm_relu_conv1x1" if train else "affine_relu_conv1x1"
    assert compare_routes(Mapping(spec, c_in, hidden, c_out), z, calls, train=train) == (
        {op: sorted(triples)} if triples else {})


@needs_cpu_kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("side", ["neither", "second"])
def test_mapping_triples_on_both_sides_of_the_thresholds(side, train, calls):
    # SAN10's stage-3 widths, 34 -> 32 -> 4, on few positions: the second triple (32 -> 4) fuses from
    # CONV1X1_POSITIONS_PER_OUTPUT * 4 positions, the first (34 -> 32) needs many more; below that, neither.
    c_in, hidden, c_out = MAPPING_CHANNELS["stage3"]
    positions = _cpu.CONV1X1_POSITIONS_PER_OUTPUT * c_out - (side == "neither")
    assert positions < min(_cpu.CONV1X1_NARROW_MIN_POSITIONS, _cpu.CONV1X1_POSITIONS_PER_OUTPUT * hidden)
    z = torch.randn(2, c_in, 1, positions, dtype=torch.float64)
    op = "batchnorm_relu_conv1x1" if train else "affine_relu_conv1x1"
    expected = {op: [(hidden, c_out)]} if side == "second" else {}
    assert compare_routes(Mapping("R-L-R-L", c_in, hidden, c_out), z, calls, train=train) == expected


@needs_cpu_kernels
def test_mapping_rejects_one_value_per_channel_on_both_routes():
    for enabled in (True, False):
        with ops.fusion(enabled), pytest.raises(ValueError, match="more than 1 value per channel"):
            fused.run_mapping(build_mapping("R-L", 3, 4, 2).train(), torch.randn(1, 3, 1, 1))


def _pairwise(**kw):
    # gamma: z (rel 4 + position 2 = 6 channels) -> 4 -> 4 weight channels
    return PairwiseSelfAttention(16, 4, 16, share_planes=4, kernel_size=5, **kw)


@needs_cpu_kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("size", [(29, 28), (9, 8), "at_threshold", "below_threshold"])
def test_pairwise_layer(size, train, calls):
    """Training on maps of >= SUBTRACTION2_CONV1X1_MIN_POSITIONS: the relation is gathered straight into gamma's
    first triple (z never written), on wide maps (z's rows from padded planes) and narrow ones (from column-shifted
    copies). Below that, and in eval mode (running statistics): z written in one pass (subtraction2 with append),
    then both triples fused. Always: the softmax inside the aggregation, phi, psi and beta as one convolution."""
    minimum = _cpu.SUBTRACTION2_CONV1X1_MIN_POSITIONS
    side = math.isqrt(minimum - 1) + 1  # the smallest square map at the threshold
    h, w = {"at_threshold": (side, side), "below_threshold": (side - 1, side)}.get(size, size)
    relation_fused = train and h * w >= minimum
    assert (h * w >= minimum) == (size != "below_threshold")
    x = torch.randn(2, 16, h, w, dtype=torch.float64)
    expected = {"softmax_aggregation": [16], "stacked_conv1x1": [16]}
    conv = "batchnorm_relu_conv1x1" if train else "affine_relu_conv1x1"
    if relation_fused:
        expected.update(subtraction2_batchnorm_relu_conv1x1=[(6, 4)], batchnorm_relu_conv1x1=[(4, 4)])
    else:
        expected.update({"subtraction2_append": [(4, 2)], conv: [(4, 4), (6, 4)]})
    assert compare_routes(_pairwise(), x, calls, train=train) == expected


@needs_cpu_kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("size", [(9, 8), (6, 6)])
def test_patchwise_layer(size, train, calls):
    """gamma maps z (N, rel * (K + 1) = 40, 1, L) -> 4 -> K * 4 = 36: the first triple fuses from 3 * 4 positions,
    the second (4 input channels: narrow) from CONV1X1_NARROW_MIN_POSITIONS."""
    h, w = size
    second = h * w >= _cpu.CONV1X1_NARROW_MIN_POSITIONS
    assert h * w >= _cpu.CONV1X1_POSITIONS_PER_OUTPUT * 4 and (h * w < _cpu.CONV1X1_POSITIONS_PER_OUTPUT * 36)
    layer = PatchwiseSelfAttention(16, 4, 16, share_planes=4, kernel_size=3)
    conv = "batchnorm_relu_conv1x1" if train else "affine_relu_conv1x1"
    expected = {"stacked_conv1x1": [16], conv: [(4, 36), (40, 4)] if second else [(40, 4)]}
    assert compare_routes(layer, torch.randn(2, 16, h, w, dtype=torch.float64), calls, train=train) == expected


@needs_cpu_kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
@pytest.mark.parametrize("size", [(9, 8), (7, 9)])
def test_block(sa_type, size, train, calls):
    """The block's pairs: norm1-act1-(phi|psi|beta) (32 -> 2 + 2 + 8 channels) and norm2-act2-proj (8 -> 32), as
    one op each where the backend fuses them: both on 72 positions; on 63, below CONV1X1_NARROW_MIN_POSITIONS, only
    the first (12 outputs need 3 * 12 positions, 32 outputs 3 * 32)."""
    h, w = size
    narrow_min, per_output = _cpu.CONV1X1_NARROW_MIN_POSITIONS, _cpu.CONV1X1_POSITIONS_PER_OUTPUT
    both_pairs = h * w >= narrow_min
    assert per_output * 12 <= h * w < per_output * 32 and (h * w >= narrow_min) == (size == (9, 8))
    block = SelfAttentionBlock(32, sa_type, kernel_size=3, share_planes=4)
    pairs = [(32, 12), (8, 32)] if both_pairs else [(32, 12)]
    conv = "batchnorm_relu_conv1x1" if train else "affine_relu_conv1x1"
    if sa_type == "pairwise":  # gamma: 2 + 2 -> 2 -> 2, on 9 * L positions
        relation_fused = train and h * w >= _cpu.SUBTRACTION2_CONV1X1_MIN_POSITIONS
        gamma = [(2, 2)] if relation_fused else [(2, 2), (4, 2)]
        expected = {conv: sorted(pairs + gamma), "softmax_aggregation": [8]}
        expected.update(subtraction2_batchnorm_relu_conv1x1=[(4, 2)] if relation_fused else [])
        expected.update(subtraction2_append=[] if relation_fused else [(2, 2)])
        expected = {k: v for k, v in expected.items() if v}
    else:  # gamma: 2 * 10 -> 2 -> 9 * 2, on L positions: both triples, on either size
        assert h * w >= per_output * 18
        expected = {conv: sorted(pairs + [(20, 2), (2, 18)])}
    # the stacked transforms run inside the fused pair (or alone when the pair is not fused)
    expected["stacked_conv1x1"] = [32]
    assert compare_routes(block, torch.randn(2, 32, h, w, dtype=torch.float64), calls, train=train) == expected


@needs_cpu_kernels
@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_block_in_inference_adds_the_shortcut_in_the_projections_epilogue(sa_type, monkeypatch):
    """Eval under no_grad: norm2-act2-proj and the shortcut x + ... as one op (the residual added as the output is
    stored); the same output as the modules (float64)."""
    block = randomise(SelfAttentionBlock(32, sa_type, kernel_size=3, share_planes=4)).double().eval()
    x = torch.randn(2, 32, 9, 8, dtype=torch.float64)
    residuals = []
    original = ops.affine_relu_conv1x1

    def spy(*args, residual=None):
        residuals.append(residual)
        return original(*args, residual=residual)

    monkeypatch.setattr(ops, "affine_relu_conv1x1", spy)
    with torch.no_grad():
        with ops.use_backend("cpu"):
            fused = block(x)
        assert sum(r is x for r in residuals) == 1
        with ops.fusion(False), ops.use_backend("reference"):
            modules = block(x)
    torch.testing.assert_close(fused, modules)


@needs_cpu_kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool", [True, False])
def test_stem(pool, train, calls):
    # An odd size: the pool drops the last row and column (floor mode), on both routes. With a pool, conv, BN, ReLU
    # and pool are one op (recorded by x's shape); without, the conv runs alone and BN-ReLU as modules.
    stem = SANStem(3, 8, pool=pool)
    x = torch.randn(2, 3, 17, 16, dtype=torch.float64)
    op = "conv1x1_batchnorm_relu_maxpool2x2" if train else "conv1x1_affine_relu_maxpool2x2"
    assert compare_routes(stem, x, calls, train=train) == ({op: [(3, 17, 16)]} if pool else {})


@needs_cpu_kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_stage_ends_with_the_next_stages_pool(sa_type, train, calls):
    stage = SANStage(8, 16, 1, sa_type, 3, pool=True, share_planes=4, rel_reduction=8)
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    summary = compare_routes(stage, x, calls, train=train)
    op = "batchnorm_relu_maxpool2x2" if train else "affine_relu_maxpool2x2"
    assert summary[op] == [(16, 9, 11)]
    assert summary["stacked_conv1x1"] == [16]  # (the block's own fused ops: test_block)


@needs_cpu_kernels
def test_hooks_send_each_part_of_a_layer_through_its_modules(calls):
    """A hook on a module sends the fused run it belongs to through the modules, and sees them run; the rest stays
    fused, and the function is the same."""
    layer = randomise(_pairwise()).double().eval()
    x = torch.randn(2, 16, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
    for module, gone, kept in [
        (layer.aggregation, {"softmax_aggregation"}, {"tap_softmax": [4]}),  # the softmax alone, fused
        (layer.softmax, {"softmax_aggregation", "tap_softmax"}, {}),
        (layer.phi, {"stacked_conv1x1"}, {}),
        # gamma not as one op: its first triple through the modules, the second fused
        (layer.gamma[1], {"pairwise_logits"}, {"affine_relu_conv1x1": [(4, 4)]}),
        (layer.subtraction2, {"subtraction2_append", "pairwise_logits"}, {}),
    ]:
        seen = []
        handle = module.register_forward_hook(lambda *args, seen=seen: seen.append(1))
        calls.clear()
        try:
            with torch.no_grad():
                torch.testing.assert_close(layer(x), expected)
        finally:
            handle.remove()
        summary = calls.summary()
        assert seen == [1], module
        assert not gone & summary.keys(), (module, summary)
        for name, sigs in kept.items():
            assert summary[name] == sigs, (module, summary)
    calls.clear()
    with torch.no_grad():
        layer(x)
    # inference: gamma, with the relation gathered into it, is one op
    assert calls.summary().keys() == {"softmax_aggregation", "stacked_conv1x1", "pairwise_logits"}
    assert calls.summary()["pairwise_logits"] == [(6, 4, 4)]


@needs_cpu_kernels
@pytest.mark.parametrize("forward_fused", [True, False])
def test_memory_efficient_recomputes_on_the_forwards_route(forward_fused, calls):
    """The backward pass recomputes the relation and gamma with the fusion setting of the forward pass, whatever the
    setting when backward runs."""
    block = randomise(SelfAttentionBlock(32, "pairwise", kernel_size=3, share_planes=4, memory_efficient=True))
    x = torch.randn(2, 32, 9, 8, dtype=torch.float64, requires_grad=True)
    block.double().train()
    with ops.fusion(forward_fused):
        y = block(x)
    calls.clear()
    with ops.fusion(not forward_fused):
        y.square().sum().backward()
    recomputed = calls.summary()
    if forward_fused:
        assert recomputed == {"subtraction2_batchnorm_relu_conv1x1": [(4, 2)], "batchnorm_relu_conv1x1": [(2, 2)]}
    else:
        assert recomputed == {}


@needs_cpu_kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_double_backward_through_the_fused_routes(train, calls):
    """A gradient penalty (create_graph=True) differentiates the fused ops' backward (through the reference
    composition, ops/_cpu/_register.py): as the modules do, here on the reference backend."""
    layer = randomise(_pairwise()).double().train(train)
    initial = copy.deepcopy(layer.state_dict())
    x = torch.randn(2, 16, 9, 8, dtype=torch.float64, requires_grad=True)
    penalties = []
    for backend, fused_route in (("cpu", True), ("reference", False)):
        layer.load_state_dict(initial)
        layer.zero_grad()
        calls.clear()
        with ops.use_backend(backend), ops.fusion(fused_route):
            (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
            gx.square().sum().backward()
        assert bool(calls.summary()) == fused_route
        penalties.append([gx.detach()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*penalties):
        torch.testing.assert_close(a, b)


# --- the whole model -------------------------------------------------------------------------------------------------
SMALL = dict(widths=(16, 32, 32, 64, 64), stem_width=16, share_planes=4, layers=(1, 1, 1, 1, 1), num_classes=7)


@needs_cpu_kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
@pytest.mark.parametrize("pools,size,boundaries,stem", [
    # small-input pooling: the stages at 20x18, 10x9 and three at 5x4; pools end stages 0 and 1
    (None, (20, 18), [(16, 20, 18), (32, 10, 9)], None),
    # a pool after the stem too (the stem as one op), at odd sizes (17 -> 8 px): every kind of boundary
    ((True, True, True, False, False), (36, 34), [(16, 18, 17), (32, 9, 8)], (3, 36, 34)),
], ids=["small_input", "stem_pool"])
def test_model(sa_type, pools, size, boundaries, stem, train, calls):
    """The whole model on the fused route against its modules on the reference backend: one fused BN-ReLU-pool per
    stage boundary (the stem's with its conv), and every other fused route somewhere in it."""
    model = timm.create_model(f"san10_{sa_type}", small_input=True, stage_pools=pools, **SMALL)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    summary = compare_routes(model, x, calls, train=train, modules_backend="reference")
    pool = "batchnorm_relu_maxpool2x2" if train else "affine_relu_maxpool2x2"
    assert summary.pop(pool) == sorted(boundaries)
    if stem is not None:
        assert summary.pop(f"conv1x1_{pool}") == [stem]
    conv = "batchnorm_relu_conv1x1" if train else "affine_relu_conv1x1"
    expected = {conv, "stacked_conv1x1"}
    if sa_type == "pairwise":
        expected |= {"softmax_aggregation", "subtraction2_append"}
        expected |= {"subtraction2_batchnorm_relu_conv1x1"} if train else set()
        assert summary["softmax_aggregation"] == sorted(SMALL["widths"][t] // 4 for t in range(5))
    assert summary.keys() == expected
    assert summary["stacked_conv1x1"] == sorted(SMALL["widths"])
