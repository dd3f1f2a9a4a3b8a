"""What the Triton kernels share: source coordinates of a padded footprint tap, launch sizes, accumulator types."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128  # output positions (or input pixels) per program


@triton.jit
def source(q, size, REFLECT: tl.constexpr):
    """A padded coordinate ``q`` -> (the map's index it reads, whether it reads the map at all).

    Reflect padding is a single reflection (``nn.ReflectionPad2d``): -1 reads 1, size reads size - 2. Zero padding
    reads nothing outside [0, size).
    """
    if REFLECT:
        q = tl.where(q < 0, -q, q)
        q = tl.where(q > size - 1, 2 * (size - 1) - q, q)
    valid = (q >= 0) & (q < size)
    return tl.where(valid, q, 0), valid


@triton.jit
def image_of(p, size, a: tl.constexpr, REFLECT: tl.constexpr):
    """The ``a``-th padded coordinate (0, 1, 2) that reads map index ``p``, and whether it exists.

    0: p itself; with reflect padding also 1: -p (p > 0), 2: 2 (size - 1) - p (p < size - 1).
    """
    if a == 0:
        q = p
        exists = p >= 0
    elif a == 1:
        q = -p
        exists = (p > 0) & REFLECT
    else:
        q = 2 * (size - 1) - p
        exists = (p < size - 1) & REFLECT
    return q, exists


@triton.jit
def output_of(q, tap, size_out, STRIDE, PAD, DIL):
    """The output coordinate whose footprint tap ``tap`` sits at padded coordinate ``q``, and whether it exists."""
    t = q + PAD - tap * DIL
    o = t // STRIDE
    ok = (t >= 0) & (t - o * STRIDE == 0) & (o < size_out)
    return tl.where(ok, o, 0), ok


def accumulator(dtype: torch.dtype) -> tl.dtype:
    """float64 for float64 inputs, float32 for the rest (bf16 and fp16 accumulate in float32)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
