"""What the layers keep between inference calls (torchsan.layers.cache.reuse) and the 1x1-conv matrix-product route:
the same function as recomputing, never a stale value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _helpers import needs_cpu_kernels, randomise
from torchsan import ops
from torchsan.layers import PairwiseSelfAttention, SelfAttentionBlock, fused, position_grid
from torchsan.layers.cache import reuse
from torchsan.ops import _cpu


def _pairwise(**kwargs):
    torch.manual_seed(0)
    return randomise(PairwiseSelfAttention(8, 4, 8, share_planes=2, kernel_size=3, **kwargs)).double().eval()


def _expected_position_difference(layer, height, width):
    """p_i - p_j from the pos_proj's weights by hand: a 2 x 2 map of the coordinates' differences (its bias
    cancels), the neighbours' coordinates reflected at the border like the layer's padding."""
    grid = position_grid(height, width, layer.pos_proj.weight)[0]  # (2, H, W)
    padded = nn.functional.pad(grid[None], (1, 1, 1, 1), mode="reflect")[0]
    taps = [padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)]
    diff = torch.stack([grid - t for t in taps], dim=1).flatten(2)  # (2, K, L)
    return torch.einsum("oc,ckl->okl", layer.pos_proj.weight.flatten(1), diff)[None]


def test_reuse_rebuilds_when_a_source_or_the_key_changes():
    owner, builds = nn.Module(), []
    weight = nn.Parameter(torch.randn(3))

    def build():
        builds.append(1)
        return weight.detach() * 2

    with torch.no_grad():
        first = reuse(owner, "slot", [weight], build, extra=1)
        assert reuse(owner, "slot", [weight], build, extra=1) is first and len(builds) == 1
        reuse(owner, "slot", [weight], build, extra=2)  # another key
        assert len(builds) == 2
        weight.add_(1.0)  # an in-place update (an optimizer step)
        updated = reuse(owner, "slot", [weight], build, extra=2)
        assert len(builds) == 3 and torch.equal(updated, weight.detach() * 2)
        weight.data = torch.randn(3)  # another tensor
        assert torch.equal(reuse(owner, "slot", [weight], build, extra=2), weight.detach() * 2) and len(builds) == 4
    # a gradient wanted from the value: built every time, never stored
    value = reuse(owner, "slot", [weight], lambda: weight * 2, extra=2)
    assert value.requires_grad and len(builds) == 4
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # another autocast setting
        reuse(owner, "slot", [weight], build, extra=2)
    assert len(builds) == 5


def test_a_value_built_in_inference_mode_is_not_reused_outside_it():
    owner, weight = nn.Module(), torch.randn(3)
    with torch.inference_mode():
        built = reuse(owner, "slot", [weight], lambda: weight * 2)
    assert built.is_inference()
    x = torch.randn(3, requires_grad=True)  # frozen weights, a gradient wanted for the input (an attack)
    value = reuse(owner, "slot", [weight], lambda: weight * 2)
    assert not value.is_inference()
    (x * value).sum().backward()


def test_reuse_does_not_store_inference_mode_parameters():
    with torch.inference_mode():
        weight = torch.randn(3)
        owner = nn.Module()
        calls = []
        for _ in range(2):
            reuse(owner, "slot", [weight], lambda: calls.append(1))
    assert len(calls) == 2


def test_the_position_encoding_follows_its_weights_between_inference_calls():
    layer = _pairwise()
    x = torch.randn(2, 8, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        first = layer._position_difference(x)
        assert layer._position_difference(x) is first  # kept
        torch.testing.assert_close(first, _expected_position_difference(layer, 6, 7))
        layer.pos_proj.weight.mul_(-0.5)
        torch.testing.assert_close(layer._position_difference(x), _expected_position_difference(layer, 6, 7))
        other = layer._position_difference(torch.randn(1, 8, 5, 9, dtype=torch.float64))  # another size
        torch.testing.assert_close(other, _expected_position_difference(layer, 5, 9))
    # training: recomputed, in the graph, so pos_proj gets a gradient
    layer.train()
    layer(x.requires_grad_()).square().sum().backward()
    assert layer.pos_proj.weight.grad is not None and layer.pos_proj.weight.grad.abs().sum() > 0


def test_a_hook_on_the_position_encoding_sees_every_call():
    layer = _pairwise()
    seen = []
    layer.pos_proj.register_forward_hook(lambda *args: seen.append(1))
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer(x)
    assert len(seen) == 2


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_a_block_in_eval_follows_new_weights(sa_type):
    """Inference, new weights loaded (load_state_dict copies in place), inference again: the output of a block
    built with those weights, not of the kept stacked transforms or position encoding."""
    torch.manual_seed(1)
    block, fresh = (randomise(SelfAttentionBlock(32, sa_type, kernel_size=3, share_planes=4)).double().eval()
                    for _ in range(2))
    x = torch.randn(2, 32, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        before = block(x)
        block.load_state_dict(fresh.state_dict())
        after, expected = block(x), fresh(x)
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(after, expected)
    with torch.no_grad(), ops.fusion(False), ops.use_backend("reference"):
        torch.testing.assert_close(after, block(x))


@needs_cpu_kernels
def test_cpu_runs_a_1x1_conv_as_a_matrix_product_from_the_threshold_or_for_one_image_without_gradient():
    least = _cpu.CONV1X1_MATMUL_MIN_POSITIONS

    def fuses(positions, batch=2):
        return _cpu.fuses("conv1x1_matmul", torch.empty(batch, 8, 1, positions, device="meta"), in_channels=8,
                          out_channels=8)

    with torch.no_grad():
        assert fuses(least) and not fuses(least - 1)
        assert fuses(49, batch=1)  # a single image: one product, with no batch to amortise conversions over
    assert not fuses(least) and not fuses(49, batch=1)  # a gradient may be wanted: the convolution


@needs_cpu_kernels
@pytest.mark.parametrize("bias", [True, False])
def test_the_1x1_conv_matrix_product_is_the_convolution(bias):
    side = int(_cpu.CONV1X1_MATMUL_MIN_POSITIONS**0.5) + 1
    conv = nn.Conv2d(5, 7, 1, bias=bias).double()
    x = torch.randn(3, 5, side, side + 2, dtype=torch.float64)
    seen = []
    with torch.no_grad():
        assert ops.should_fuse("conv1x1_matmul", x, conv, in_channels=5, out_channels=7)
        torch.testing.assert_close(fused.conv1x1(conv, x), conv(x))
        torch.testing.assert_close(fused.conv1x1(conv, x.to(memory_format=torch.channels_last)), conv(x))
        conv.register_forward_hook(lambda *args: seen.append(1))
        fused.conv1x1(conv, x)  # a hook: the module runs
    assert seen == [1]
    y = fused.conv1x1(conv, x.requires_grad_())  # with gradients: the module
    assert y.grad_fn is not None and "Convolution" in type(y.grad_fn).__name__


@needs_cpu_kernels
@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_the_stacked_transforms_as_a_matrix_product_match_the_modules(sa_type):
    torch.manual_seed(0)
    block = SelfAttentionBlock(32, sa_type=sa_type, kernel_size=3).double().eval()
    x = torch.randn(1, 32, 7, 9, dtype=torch.float64)  # one image: the transforms run as a matrix product
    with torch.no_grad():
        assert block.attn.stacks_transforms(x) and ops.should_fuse("conv1x1_matmul", x)
        q, k, v = block.attn._transforms(x)
        torch.testing.assert_close(q, block.attn.phi(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(k, block.attn.psi(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v, block.attn.beta(x), rtol=1e-12, atol=1e-12)
