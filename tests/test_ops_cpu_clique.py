"""The cpu backend's clique relation (``ops/_cpu/clique.py``) against the reference backend (``torch.einsum``)."""

from __future__ import annotations

import pytest
import torch

from _helpers import DTYPES, assert_matches_reference, needs_cpu_kernels, per_thread_count
from torchsan import ops

pytestmark = needs_cpu_kernels


# (N, C, K, L): rows shorter than a vector, a partial vector at the end, tap counts not a multiple of the four rows a
# block computes, SAN's 7 x 7 footprint on a 7 x 7 map, no channels, more channels than the kernel takes (einsum),
# and rows split into several chunks of positions (a chunk's q and k fill half the L2: 32 channels and 49 taps in
# float64 take 25 KB a position, so even a 4 MB L2 splits 1,500 positions).
SHAPES = [(2, 3, 9, 13), (1, 5, 49, 49), (3, 2, 25, 3), (2, 7, 6, 17), (1, 1, 1, 1), (2, 16, 9, 40), (2, 0, 9, 5),
          (2, 32, 9, 21), (1, 40, 9, 10), (1, 32, 49, 1501)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_clique_products_match_reference(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    q, k = (torch.randn(shape, dtype=dtype, generator=gen) for _ in range(2))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert_matches_reference(ops.clique_products, q, k, **tol)


def test_clique_products_take_strided_inputs():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 11, 4, 9, dtype=torch.float64, generator=gen).permute(0, 2, 3, 1)  # (2, 4, 9, 11)
    k = torch.randn(2, 4, 9, 22, dtype=torch.float64, generator=gen)[..., ::2]
    assert not q.is_contiguous() and not k.is_contiguous()
    assert_matches_reference(ops.clique_products, q, k, rtol=1e-12, atol=1e-12)


def test_clique_products_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.clique_products, (q, k))
        assert torch.autograd.gradgradcheck(ops.clique_products, (q, k))


def test_clique_products_same_bits_with_1_and_2_threads():
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 32, 49, 1501, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    grad = torch.randn(1, 49, 49, 1501, dtype=torch.float64, generator=gen)  # one image: threads split its chunks

    def run():
        with ops.use_backend("cpu"):
            out = ops.clique_products(q, k)
        return (out.detach(), *torch.autograd.grad(out, (q, k), grad))

    one, two = per_thread_count(run)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_clique_products_reject_bad_input(backend):
    q = torch.randn(2, 3, 9, 5)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="same shape"):
            ops.clique_products(q, torch.randn(2, 3, 9, 6))
        with pytest.raises(TypeError, match="dtype"):
            ops.clique_products(q, q.double())
        with pytest.raises(ValueError, match="4-D"):
            ops.clique_products(q[0], q[0])
