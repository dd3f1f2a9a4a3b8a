"""Self-attention layers against per-pixel evaluations of the paper's equations, and every option."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import oracle
from _helpers import randomise
from torchsan import ops
from torchsan.layers import (
    PAIRWISE_RELATIONS,
    PATCHWISE_RELATIONS,
    PairwiseSelfAttention,
    PatchwiseSelfAttention,
    SelfAttentionBlock,
    build_mapping,
    position_grid,
)


def _randomise(module: nn.Module) -> nn.Module:
    """Random parameters and BN statistics, eval mode: BN becomes a fixed per-channel affine map."""
    return randomise(module, scale=0.5).double().eval()


def _pixel(t: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    return oracle.read(t, h, w, mode)  # (N, C)


def _gamma(layer, z: torch.Tensor) -> torch.Tensor:
    """Apply the mapping to one (N, D) vector per image."""
    return layer.gamma(z[:, :, None, None])[:, :, 0, 0]


def _pairwise_delta(relation: str, qi: torch.Tensor, kj: torch.Tensor) -> torch.Tensor:
    """delta(x_i, x_j) of eq. (2) for one pair: (N, rel) x 2 -> (N, D)."""
    if relation == "summation":
        return qi + kj
    if relation == "subtraction":
        return qi - kj
    if relation == "concatenation":
        return torch.cat([qi, kj], 1)
    if relation == "hadamard":
        return qi * kj
    assert relation == "dot"
    return (qi * kj).sum(1, keepdim=True)


def pairwise_loop(layer: PairwiseSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Eq. (1)-(2) evaluated pixel by pixel: y_i = sum_j softmax_j(gamma([delta(x_i, x_j), p_i - p_j])) ⊙ beta(x_j)."""
    k, s, d = layer.kernel_size, layer.stride, layer.aggregation.dilation
    p, mode = layer.aggregation.padding, layer.aggregation.pad_mode
    q, key, v = layer._transforms(x)
    n, _, h, w = x.shape
    pos = layer.pos_proj(position_grid(h, w, x)) if layer.position_encoding else None
    ho_n, wo_n = oracle.out_size(h, k, s, p, d), oracle.out_size(w, k, s, p, d)
    out = torch.zeros(n, layer.out_channels, ho_n, wo_n, dtype=x.dtype)
    chan = torch.arange(layer.out_channels) % layer.weight_channels
    for _, ho, wo, taps in oracle.windows(h, w, k, s, p, d):
        _, hc, wc = taps[len(taps) // 2]
        qi = _pixel(q, hc, wc, mode)
        logits = []
        for _, hh, ww in taps:
            kj = _pixel(key, hh, ww, mode)
            delta = _pairwise_delta(layer.relation, qi, kj)
            if pos is not None:
                delta = torch.cat([delta, (_pixel(pos, hc, wc, mode) - _pixel(pos, hh, ww, mode)).expand(n, 2)], 1)
            logits.append(_gamma(layer, delta))
        alpha = torch.softmax(torch.stack(logits, 0), dim=0)  # (K, N, G)
        for j, (_, hh, ww) in enumerate(taps):
            out[:, :, ho, wo] += alpha[j][:, chan] * _pixel(v, hh, ww, mode)
    return out


def patchwise_loop(layer: PatchwiseSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Eq. (3)-(4) pixel by pixel: y_i = sum_j gamma(delta(x_R(i)))_j ⊙ beta(x_j)."""
    k, s, d = layer.kernel_size, layer.stride, layer.aggregation.dilation
    p, mode = layer.aggregation.padding, layer.aggregation.pad_mode
    q, key, v = layer._transforms(x)
    n, _, h, w = x.shape
    area, groups = k * k, layer.weight_channels
    ho_n, wo_n = oracle.out_size(h, k, s, p, d), oracle.out_size(w, k, s, p, d)
    out = torch.zeros(n, layer.out_channels, ho_n, wo_n, dtype=x.dtype)
    chan = torch.arange(layer.out_channels) % groups
    for _, ho, wo, taps in oracle.windows(h, w, k, s, p, d):
        _, hc, wc = taps[len(taps) // 2]
        qi = _pixel(q, hc, wc, mode)
        kj = torch.stack([_pixel(key, hh, ww, mode) for _, hh, ww in taps], 2)  # (N, rel, K)
        if layer.relation == "concatenation":
            delta = torch.cat([qi, kj.reshape(n, -1)], 1)  # phi(x_i), then psi channel-major c*K + k
        elif layer.relation == "star":
            delta = torch.einsum("nc,nck->nk", qi, kj)
        else:
            qj = torch.stack([_pixel(q, hh, ww, mode) for _, hh, ww in taps], 2)
            delta = torch.einsum("ncj,nck->njk", qj, kj).reshape(n, -1)
        alpha = _gamma(layer, delta).view(n, groups, area)  # channel g*K + k -> (g, k)
        for j, (_, hh, ww) in enumerate(taps):
            out[:, :, ho, wo] += alpha[:, chan, j] * _pixel(v, hh, ww, mode)
    return out


FOOTPRINTS = [dict(kernel_size=3), dict(kernel_size=3, stride=2), dict(kernel_size=3, dilation=2, pad_mode="zeros"),
              dict(kernel_size=5, pad_mode="zeros")]


@pytest.mark.parametrize("relation", PAIRWISE_RELATIONS)
@pytest.mark.parametrize("fp", FOOTPRINTS, ids=str)
def test_pairwise_matches_per_pixel_equations(relation, fp):
    layer = _randomise(PairwiseSelfAttention(8, 2, 4, share_planes=2, relation=relation, **fp))
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), pairwise_loop(layer, x))


@pytest.mark.parametrize("options", [dict(position_encoding=False), dict(transform="shared_phi_psi"),
                                     dict(mapping="L"), dict(mapping="L-R-L"), dict(mapping="R-L")], ids=str)
def test_pairwise_options_match_per_pixel(options):
    layer = _randomise(PairwiseSelfAttention(8, 2, 4, share_planes=2, kernel_size=3, **options))
    x = torch.randn(1, 8, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), pairwise_loop(layer, x))


def test_pairwise_shared_all_matches_per_pixel():
    layer = _randomise(PairwiseSelfAttention(8, 4, 4, share_planes=2, kernel_size=3, transform="shared_all"))
    assert layer.psi is None and layer.beta is None
    x = torch.randn(1, 8, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), pairwise_loop(layer, x))


@pytest.mark.parametrize("relation", PATCHWISE_RELATIONS)
@pytest.mark.parametrize("fp", FOOTPRINTS[:3], ids=str)
def test_patchwise_matches_per_pixel_equations(relation, fp):
    layer = _randomise(PatchwiseSelfAttention(8, 2, 4, share_planes=2, relation=relation, **fp))
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), patchwise_loop(layer, x))


def test_position_grid_layout():
    g = position_grid(3, 5, torch.empty(0, dtype=torch.float64))
    assert g.shape == (1, 2, 3, 5)
    torch.testing.assert_close(g[0, 0, 1], torch.linspace(-1, 1, 5, dtype=torch.float64))
    torch.testing.assert_close(g[0, 1, :, 2], torch.linspace(-1, 1, 3, dtype=torch.float64))


def test_pairwise_is_a_set_operation_without_position():
    """Without position encoding, pairwise attention is permutation-invariant over the footprint:
    a 180-degree rotation of the input rotates the output (reflect padding is symmetric)."""
    layer = _randomise(PairwiseSelfAttention(8, 2, 4, share_planes=2, kernel_size=3, position_encoding=False))
    x = torch.randn(1, 8, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x.flip(2, 3)), layer(x).flip(2, 3))
    with_pos = _randomise(PairwiseSelfAttention(8, 2, 4, share_planes=2, kernel_size=3))
    with torch.no_grad():
        assert not torch.allclose(with_pos(x.flip(2, 3)), with_pos(x).flip(2, 3))


ALL_OPTIONS = (
    [("pairwise", dict(relation=r)) for r in PAIRWISE_RELATIONS]
    + [("patchwise", dict(relation=r)) for r in PATCHWISE_RELATIONS]
    + [("pairwise", dict(position_encoding=False)), ("pairwise", dict(mapping="L-R-L")),
       ("patchwise", dict(mapping="R-L")), ("pairwise", dict(transform="shared_phi_psi")),
       ("patchwise", dict(transform="shared_phi_psi")), ("pairwise", dict(pad_mode="zeros")),
       ("patchwise", dict(dilation=2)), ("pairwise", dict(kernel_size=5, share_planes=4))]
)


@pytest.mark.parametrize("sa_type,options", ALL_OPTIONS, ids=str)
def test_block_forward_backward(sa_type, options):
    options = {"kernel_size": 3, **options}
    block = SelfAttentionBlock(32, sa_type, rel_reduction=8, mid_reduction=2, **options)
    x = torch.randn(2, 32, 7, 6, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_block_shared_all_and_residual():
    block = SelfAttentionBlock(16, "pairwise", kernel_size=3, rel_reduction=4, mid_reduction=4, share_planes=2,
                               transform="shared_all").double().eval()
    nn.init.zeros_(block.proj.weight)
    nn.init.zeros_(block.proj.bias)
    x = torch.randn(1, 16, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(block(x), x)  # zero projection: the block is the identity shortcut


@pytest.mark.parametrize("size", [5, 30])  # 30 px: the projection as one matrix product (conv1x1's eval route)
def test_block_shortcut_leaves_a_hooked_projection_output_alone(size):
    """Without autograd the block adds its shortcut in place into the projection's output, which it owns; a forward
    hook on the projection has seen that output, so then it must add out of place."""
    torch.manual_seed(0)
    block = randomise(SelfAttentionBlock(16, "pairwise", kernel_size=3, rel_reduction=4, mid_reduction=4,
                                         share_planes=2)).eval()
    x = torch.randn(2, 16, size, size)
    seen = {}

    def keep(module, inputs, output):
        seen["output"], seen["copy"] = output, output.clone()

    with torch.no_grad():
        expected = block(x)
        handle = block.proj.register_forward_hook(keep)
        try:
            out = block(x)
        finally:
            handle.remove()
    assert torch.equal(seen["output"], seen["copy"])  # not written after the hook saw it
    torch.testing.assert_close(out, seen["copy"] + x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_layer_stride_output_shape():
    layer = PairwiseSelfAttention(8, 2, 8, share_planes=4, kernel_size=3, stride=2)
    assert layer(torch.randn(1, 8, 7, 9)).shape == (1, 8, 4, 5)
    layer = PatchwiseSelfAttention(8, 2, 8, share_planes=4, kernel_size=3, stride=2)
    assert layer(torch.randn(1, 8, 7, 9)).shape == (1, 8, 4, 5)


def test_mapping_structure():
    seq = build_mapping("R-L-R-L", 6, 4, 3)
    kinds = [type(m).__name__ for m in seq]
    assert kinds == ["BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    assert seq[2].bias is None and seq[5].bias is not None  # a conv feeding a BN has no bias
    assert (seq[2].in_channels, seq[2].out_channels, seq[5].out_channels) == (6, 4, 3)
    single = build_mapping("L", 6, 4, 3)
    assert len(single) == 1 and single[0].out_channels == 3 and single[0].bias is not None


BAD_LAYER_ARGS = [
    (PairwiseSelfAttention, dict(relation="cosine"), "relation must be one of"),
    (PatchwiseSelfAttention, dict(relation="subtraction"), "relation must be one of"),
    (PairwiseSelfAttention, dict(mapping="L-R"), "mapping must be"),
    (PairwiseSelfAttention, dict(mapping="X-L"), "mapping must be"),
    (PairwiseSelfAttention, dict(transform="shared_all"), "rel_channels == out_channels"),
    (PairwiseSelfAttention, dict(transform="tied"), "transform must be one of"),
    (PairwiseSelfAttention, dict(share_planes=3), "divisible by share_planes"),
    (PairwiseSelfAttention, dict(kernel_size=4), "kernel_size must be odd"),
    (PatchwiseSelfAttention, dict(pad_mode="replicate"), "pad_mode must be one of"),
]


@pytest.mark.parametrize("cls,kwargs,match", BAD_LAYER_ARGS, ids=[str(b[1]) for b in BAD_LAYER_ARGS])
def test_bad_layer_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(8, 2, 4, **{"share_planes": 2, **kwargs})


def test_bad_layer_inputs():
    layer = PairwiseSelfAttention(8, 2, 4, kernel_size=3, share_planes=2)
    with pytest.raises(ValueError, match="expects \\(N, 8, H, W\\)"):
        layer(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="reflect padding"):
        PairwiseSelfAttention(8, 2, 4, kernel_size=7, share_planes=2)(torch.randn(1, 8, 3, 3))
    with pytest.raises(ValueError, match="sa_type"):
        SelfAttentionBlock(16, "axial")
    with pytest.raises(ValueError, match="divisible by rel_reduction"):
        SelfAttentionBlock(24, rel_reduction=16)


def test_every_relation_and_footprint_in_float32():
    for (sa, relation), k in itertools.product(
        [("pairwise", r) for r in PAIRWISE_RELATIONS] + [("patchwise", r) for r in PATCHWISE_RELATIONS], (1, 3)
    ):
        block = SelfAttentionBlock(16, sa, kernel_size=k, rel_reduction=4, mid_reduction=2, share_planes=2,
                                   relation=relation)
        assert block(torch.randn(1, 16, 4, 5)).shape == (1, 16, 4, 5)


EVERY_RELATION = ([(PairwiseSelfAttention, r) for r in PAIRWISE_RELATIONS]
                  + [(PatchwiseSelfAttention, r) for r in PATCHWISE_RELATIONS])


@pytest.mark.parametrize("stride,memory_efficient", [(1, False), (2, True)], ids=["plain", "stride2-memory_efficient"])
@pytest.mark.parametrize("cls,relation", EVERY_RELATION, ids=lambda v: getattr(v, "__name__", v))
def test_empty_batch_in_eval_mode(cls, relation, stride, memory_efficient):
    """A batch of 0 in eval mode (running BN statistics) gives (0, out, H_out, W_out), forward and backward, on every
    backend, fused or not."""
    layer = _randomise(cls(8, 2, 4, share_planes=2, kernel_size=3, stride=stride, relation=relation,
                           memory_efficient=memory_efficient))
    ho, wo = ops.output_size((5, 6), 3, stride)
    for backend, fused in itertools.product(("reference", "auto"), (True, False)):
        with ops.use_backend(backend), ops.fusion(fused):
            x = torch.randn(0, 8, 5, 6, dtype=torch.float64, requires_grad=True)
            y = layer(x)
            assert y.shape == (0, 4, ho, wo), (backend, fused)
            y.sum().backward()
            assert x.grad.shape == x.shape
            # the same layer still serves a real batch
            assert layer(torch.randn(2, 8, 5, 6, dtype=torch.float64)).shape == (2, 4, ho, wo)


@pytest.mark.parametrize("cls,relation", [(PairwiseSelfAttention, "subtraction"), (PairwiseSelfAttention, "dot"),
                                          (PatchwiseSelfAttention, "concatenation")])
def test_layer_gradcheck(cls, relation):
    layer = _randomise(cls(4, 2, 4, share_planes=2, kernel_size=3, relation=relation))
    x = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_memory_efficient_is_the_same_function(sa_type):
    """Recomputing the weights in backward changes neither outputs, gradients nor BN running statistics."""
    torch.manual_seed(3)
    plain = SelfAttentionBlock(16, sa_type, kernel_size=3, rel_reduction=4, mid_reduction=2, share_planes=2).double()
    lean = SelfAttentionBlock(16, sa_type, kernel_size=3, rel_reduction=4, mid_reduction=2, share_planes=2,
                              memory_efficient=True).double()
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 6, 7, dtype=torch.float64)
    results = []
    for block in (plain, lean):
        block.train()
        y = block(x)
        y.square().sum().backward()
        results.append((y.detach(), {n: p.grad for n, p in block.named_parameters()},
                        {n: b.clone() for n, b in block.named_buffers()}))
    (y0, g0, b0), (y1, g1, b1) = results
    torch.testing.assert_close(y0, y1)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], msg=name)
    for name in b0:
        torch.testing.assert_close(b0[name], b1[name], msg=name)  # BN stats updated once, not twice


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_memory_efficient_recomputes_with_the_forward_backend(sa_type, monkeypatch):
    block = SelfAttentionBlock(16, sa_type, kernel_size=3, rel_reduction=4, mid_reduction=2, share_planes=2,
                               memory_efficient=True).double()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64, requires_grad=True)
    with ops.use_backend("reference"):
        y = block(x)
    served = []
    implementation = ops.implementation
    monkeypatch.setattr(ops, "implementation", lambda t: served.append(implementation(t).__name__) or
                        implementation(t))
    y.sum().backward()  # outside the context: the recomputation must still use the reference backend
    assert served and set(served) == {"torchsan.ops.reference"}, served
    assert torch.isfinite(x.grad).all()
