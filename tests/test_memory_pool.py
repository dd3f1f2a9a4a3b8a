"""The fused CPU kernels' output pool (``torchsan.allocator.pooled_memory``): outputs of 1 MiB or more are freed into
it, by size, and the next output of that size reuses the block. A reused block holds whatever its last tensor left
there, so every op that draws from the pool runs here on a block poisoned with NaN and must still match the
reference backend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _helpers import needs_cpu_kernels
from torchsan import allocator, ops

pytestmark = needs_cpu_kernels
MIB = 1 << 20


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _norm(channels: int, gen: torch.Generator) -> tuple:
    """An eval-mode BN as (weight, bias, eps, running_mean, running_var)."""
    return (torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen), 1e-5,
            torch.randn(channels, generator=gen), torch.rand(channels, generator=gen) + 0.5)


def _cases() -> dict:
    """op name -> a call of it without gradients whose output is at least 1 MiB."""
    g = _gen(3)
    x = torch.randn(2, 16, 96, 96, generator=g)
    scale, shift = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    w, b, residual = torch.randn(24, 16, generator=g) / 4, torch.randn(24, generator=g), torch.randn(2, 24, 96, 96,
                                                                                                      generator=g)
    xp = torch.randn(4, 8, 96, 96, generator=g)
    wp, sp, tp = torch.randn(32, 8, generator=g) / 3, torch.rand(32, generator=g) + 0.5, torch.randn(32, generator=g)
    v, logits = torch.randn(2, 64, 48, 48, generator=g), torch.randn(2, 8, 49, 48 * 48, generator=g)
    x1, x2, values = (torch.randn(2, 4, 40, 40, generator=g), torch.randn(2, 4, 40, 40, generator=g),
                      torch.randn(2, 96, 40, 40, generator=g))
    gamma = (_norm(4, g), torch.randn(8, 4, generator=g) / 2, _norm(8, g), torch.randn(4, 8, generator=g) / 3,
             torch.randn(4, generator=g))
    # patchwise (concatenation relation), 3 x 3: z has 4 (9 + 1) channels, gamma's output 4 weights per tap
    patch = (_norm(40, g), torch.randn(8, 40, generator=g) / 6, _norm(8, g), torch.randn(36, 8, generator=g) / 3,
             torch.randn(36, generator=g))
    return {
        "affine_relu_conv1x1": lambda: ops.affine_relu_conv1x1(x, scale, shift, w, b),
        "affine_relu_conv1x1 with a residual": lambda: ops.affine_relu_conv1x1(x, scale, shift, w, b,
                                                                               residual=residual),
        "affine_relu_maxpool2x2": lambda: ops.affine_relu_maxpool2x2(torch.cat([x] * 4), scale, shift),
        "conv1x1_affine_relu_maxpool2x2": lambda: ops.conv1x1_affine_relu_maxpool2x2(xp, wp, sp, tp),
        "aggregation": lambda: ops.aggregation(v, logits, 7, pad_mode="zeros"),
        "softmax_aggregation": lambda: ops.softmax_aggregation(v, logits, 7),
        "pairwise_logits": lambda: ops.pairwise_logits(x1, x2, *gamma, kernel_size=7)[0],
        "pairwise_attention": lambda: ops.pairwise_attention(x1, x2, values, *gamma, kernel_size=7),
        "patchwise_weights": lambda: ops.patchwise_weights(torch.cat([x1] * 4), torch.cat([x2] * 4), *patch,
                                                           kernel_size=3)[0],
        "patchwise_attention": lambda: ops.patchwise_attention(x1, x2, values, *patch, kernel_size=3),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_a_reused_block_is_fully_overwritten(name):
    fn = _cases()[name]
    with torch.no_grad():
        with ops.use_backend("reference"):
            expected = fn()
        allocator.release_pooled_memory()
        with ops.use_backend("cpu"):
            first = fn()
            assert first.numel() * first.element_size() >= MIB
            first.fill_(float("nan"))
            del first  # its block goes back to the pool, NaNs and all
            assert allocator.pooled_memory() >= MIB
            out = fn()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_the_next_output_of_the_same_size_reuses_the_block():
    x, scale, shift = torch.randn(4, 8, 256, 256), torch.rand(8) + 0.5, torch.randn(8)
    with torch.no_grad(), ops.use_backend("cpu"):
        allocator.release_pooled_memory()
        y = ops.affine_relu_maxpool2x2(x, scale, shift)
        nbytes, address = y.numel() * y.element_size(), y.data_ptr()
        del y
        assert allocator.pooled_memory() >= nbytes
        y = ops.affine_relu_maxpool2x2(x, scale, shift)
        assert y.data_ptr() == address
        assert allocator.pooled_memory() < nbytes  # taken out again while y lives
        z = ops.affine_relu_maxpool2x2(x, scale, shift)  # a second live output of that size: a new block
        assert z.data_ptr() != address
        del y, z
    assert allocator.release_pooled_memory() >= 2 * nbytes
    assert allocator.pooled_memory() == 0


def test_small_outputs_and_a_zero_limit_bypass_the_pool():
    with torch.no_grad(), ops.use_backend("cpu"):
        allocator.release_pooled_memory()
        ops.affine_relu_maxpool2x2(torch.randn(1, 4, 8, 8), torch.ones(4), torch.zeros(4))  # freed at once
        assert allocator.pooled_memory() == 0
    script = ("import torch; from torchsan import allocator, ops\n"
              "with torch.no_grad(), ops.use_backend('cpu'):\n"
              "    ops.affine_relu_maxpool2x2(torch.randn(4, 8, 256, 256), torch.ones(8), torch.zeros(8))\n"
              "print(allocator.pooled_memory())")
    env = {**os.environ, "TORCHSAN_POOL_MAX_MB": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0"


def test_outputs_that_need_a_gradient_bypass_the_pool():
    """A training step frees its forward's outputs during the backward, which must be able to reuse that memory:
    the kernels that also run in training pool only inputs that need no gradient."""
    x = torch.randn(2, 16, 96, 96, requires_grad=True)
    scale, shift, w = torch.rand(16) + 0.5, torch.randn(16), torch.randn(24, 16) / 4
    with ops.use_backend("cpu"):
        allocator.release_pooled_memory()
        y = ops.affine_relu_conv1x1(x, scale, shift, w, None)
        assert y.numel() * y.element_size() >= MIB
        y.sum().backward()
        del y
        assert allocator.pooled_memory() == 0
        with torch.no_grad():
            ops.affine_relu_conv1x1(x.detach(), scale, shift, w, None)  # freed at once, into the pool
        assert allocator.pooled_memory() >= MIB


def test_the_oldest_blocks_make_room_beyond_the_limit():
    script = ("import torch; from torchsan import allocator, ops\n"
              "x, s, t = torch.randn(1, 8, 512, 512), torch.ones(8), torch.zeros(8)\n"  # 2 MiB pooled outputs
              "with torch.no_grad(), ops.use_backend('cpu'):\n"
              "    for rows in (512, 510, 508, 506):\n"  # four sizes, 2 MiB each, into a pool of 5 MiB
              "        ops.affine_relu_maxpool2x2(x[:, :, :rows].contiguous(), s, t)\n"
              "print(allocator.pooled_memory())")
    env = {**os.environ, "TORCHSAN_POOL_MAX_MB": "5"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    pooled = int(out.stdout.strip().splitlines()[-1])
    assert 2 * MIB < pooled <= 5 * MIB  # the newest two kept, the oldest two given back
