"""Self-attention layers against per-pixel evaluations of the paper's equations, and every option."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import oracle
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
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.2)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return module.double().eval()


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


@pytest.mark.parametrize("spec", ["R-L-R-L", "L-R-L", "R-L", "L"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels", [(6, 5, 3), (34, 32, 4)], ids=["small", "stage3"])
def test_fused_mapping_matches_modules(spec, train, channels):
    """run_mapping on the fused backend == the nn.Sequential run module by module (outputs, gradients,
    BN running statistics). "stage3": SAN10's stage-3 widths, 34 x 32 = 1,088 channel pairs, fused
    since the limit went to 2,048."""

    from torchsan.layers.mapping import _fusable, run_mapping

    torch.manual_seed(5)
    seq = _randomise(build_mapping(spec, *channels)).train(train)
    if spec == "R-L-R-L":
        assert _fusable(seq, 0)  # the triple really takes the fused op
    z = torch.randn(2, channels[0], 9, 13, dtype=torch.float64)
    results = []
    for backend in ("cpu", "reference"):
        model = __import__("copy").deepcopy(seq)
        zz = z.clone().requires_grad_()
        with ops.use_backend(backend):
            y = run_mapping(model, zz)
        y.square().sum().backward()
        results.append((y.detach(), zz.grad, [p.grad for p in model.parameters()], list(model.buffers())))
    (y0, gz0, gp0, b0), (y1, gz1, gp1, b1) = results
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(gz0, gz1)
    for a, b in zip(gp0 + b0, gp1 + b1):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_memory_efficient_recomputes_with_the_forward_backend(sa_type):


    block = SelfAttentionBlock(16, sa_type, kernel_size=3, rel_reduction=4, mid_reduction=2, share_planes=2,
                               memory_efficient=True).double()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64, requires_grad=True)
    with ops.use_backend("reference"):
        y = block(x)
    y.sum().backward()  # outside the context: the recomputation must still use the reference backend
    assert torch.isfinite(x.grad).all()


def test_fused_mapping_respects_hooks_and_rejects_one_value_per_channel():

    from torchsan.layers.mapping import run_mapping

    seq = build_mapping("R-L-R-L", 4, 3, 2)
    calls = []
    seq[1].register_forward_hook(lambda m, i, o: calls.append(1))
    with ops.use_backend("cpu"):
        run_mapping(seq, torch.randn(2, 4, 3, 5))
    assert calls == [1]  # the hooked triple ran module by module
    with ops.use_backend("cpu"), pytest.raises(ValueError, match="more than 1 value per channel"):
        run_mapping(build_mapping("R-L", 3, 4, 2).train(), torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 4099), (1, 2, 9000), (5, 1, 1, 1)])
def test_channel_var_mean_matches_torch(shape):
    # The fused mapping's BN statistics: values and gradients equal torch.var_mean's (the oracle), across
    # chunk boundaries (4,096 values) and with a mean far larger than the spread.
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).requires_grad_()
    ref_var, ref_mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
    gv, gm = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    ref = torch.autograd.grad((ref_var * gv).sum() + (ref_mean * gm).sum(), x)[0]
    with ops.use_backend("cpu"):
        var, mean = ops.channel_var_mean(x)
        ours = torch.autograd.grad((var * gv).sum() + (mean * gm).sum(), x)[0]
        only_var = torch.autograd.grad(ops.channel_var_mean(x)[0].sum(), x)[0]  # the other output unused
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ref_only = torch.autograd.grad(torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)[0].sum(), x)[0]
    torch.testing.assert_close(only_var, ref_only)
    # float32 with |mean| / std = 1e4: E[x^2] - E[x]^2 would lose every digit; the chunked two-pass keeps them.
    big = (torch.randn(shape, dtype=torch.float64) * 0.1 + 1000.0)
    with ops.use_backend("cpu"):
        var32, mean32 = ops.channel_var_mean(big.float())
    ref_var64, ref_mean64 = torch.var_mean(big, dim=[0, *range(2, big.dim())], correction=0)
    torch.testing.assert_close(var32.double(), ref_var64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mean32.double(), ref_mean64, rtol=1e-6, atol=1e-6)


def test_channel_var_mean_gradcheck_opcheck_and_threads():
    from torch.library import opcheck

    small = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.channel_var_mean, (small,))
        assert torch.autograd.gradgradcheck(ops.channel_var_mean, (small,))
    opcheck(torch.ops.torchsan.channel_var_mean.default, (small,))
    x = torch.randn(4, 6, 10000)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.torchsan.channel_var_mean(x))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))  # a fixed reduction order


@pytest.mark.parametrize("cls", ["pairwise", "patchwise"])
def test_stacked_transforms_match_separate_convs(cls):
    # phi, psi and beta run as one convolution with stacked weights unless a hook is registered; a no-op hook
    # forces the three modules, which must give the same outputs and gradients.
    from torchsan.layers import PairwiseSelfAttention, PatchwiseSelfAttention

    layer_cls = PairwiseSelfAttention if cls == "pairwise" else PatchwiseSelfAttention
    layer = layer_cls(16, 4, 16, share_planes=4, kernel_size=3).double()
    x = torch.randn(2, 16, 6, 7, dtype=torch.float64, requires_grad=True)
    results = []
    for hooked in (False, True):
        layer.zero_grad()
        x.grad = None
        handle = layer.phi.register_forward_hook(lambda m, a, o: None) if hooked else None
        y = layer(x)
        y.square().sum().backward()
        results.append([y.detach(), x.grad.clone(), *[p.grad.clone() for p in layer.parameters()]])
        if handle is not None:
            handle.remove()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
