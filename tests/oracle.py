"""The tests' one oracle module: independent ground truth, sharing no code with torchsan.

* Per-pixel loops (``aggregation``, ``subtraction2``, ``subtraction``, ``unfold``): the oracle for the reference
  ops. Written from the definitions in DESIGN.md section 1, with explicit index arithmetic. Slow by design; use on
  small shapes only.
* ``neighbours`` and ``position``: the compact, vectorised forms (plain ``F.pad`` + ``F.unfold``) that the authors'
  architecture in ``test_convert.py`` is built from, each checked against the loops above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def source_index(i: int, n: int, mode: str) -> int | None:
    """Where padded coordinate i reads from a length-n axis; None for a zero-padded read."""
    if 0 <= i < n:
        return i
    if mode == "zeros":
        return None
    i = -i if i < 0 else 2 * (n - 1) - i  # a single reflection, like ReflectionPad2d
    assert 0 <= i < n
    return i


def read(x: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    """x[:, :, h, w] with padding semantics: (N, C)."""
    hs, ws = source_index(h, x.shape[2], mode), source_index(w, x.shape[3], mode)
    if hs is None or ws is None:
        return torch.zeros_like(x[:, :, 0, 0])
    return x[:, :, hs, ws]


def windows(h_in: int, w_in: int, k: int, s: int, p: int, d: int):
    """Yield (o, ho, wo, [(kidx, h, w) ...]) for each output pixel, with the centre tap."""
    ho_n, wo_n = out_size(h_in, k, s, p, d), out_size(w_in, k, s, p, d)
    for ho in range(ho_n):
        for wo in range(wo_n):
            taps = [(kh * k + kw, ho * s - p + kh * d, wo * s - p + kw * d) for kh in range(k) for kw in range(k)]
            yield ho * wo_n + wo, ho, wo, taps


def aggregation(x, weight, k, s=1, p=None, d=1, mode="reflect"):
    p = (d * (k - 1) + 1) // 2 if p is None else p
    n, c, h, w = x.shape
    cw = weight.shape[1]
    ho_n, wo_n = out_size(h, k, s, p, d), out_size(w, k, s, p, d)
    out = torch.zeros(n, c, ho_n, wo_n, dtype=x.dtype)
    chan = torch.arange(c) % cw
    for o, ho, wo, taps in windows(h, w, k, s, p, d):
        for kidx, hh, ww in taps:
            out[:, :, ho, wo] += weight[:, chan, kidx, o] * read(x, hh, ww, mode)
    return out


def _centre_tap(taps, k):
    return taps[(k // 2) * k + k // 2]


def subtraction2(x1, x2, k, s=1, p=None, d=1, mode="reflect"):
    p = (d * (k - 1) + 1) // 2 if p is None else p
    n, c, h, w = x1.shape
    length = out_size(h, k, s, p, d) * out_size(w, k, s, p, d)
    out = torch.zeros(n, c, k * k, length, dtype=x1.dtype)
    for o, _, _, taps in windows(h, w, k, s, p, d):
        _, hc, wc = _centre_tap(taps, k)
        centre = read(x1, hc, wc, mode)
        for kidx, hh, ww in taps:
            out[:, :, kidx, o] = centre - read(x2, hh, ww, mode)
    return out


def subtraction(x, k, s=1, p=None, d=1, mode="reflect"):
    return subtraction2(x, x, k, s, p, d, mode)


def unfold(x, k, s=1, p=None, d=1, mode="reflect"):
    p = (d * (k - 1) + 1) // 2 if p is None else p
    n, c, h, w = x.shape
    length = out_size(h, k, s, p, d) * out_size(w, k, s, p, d)
    out = torch.zeros(n, c, k * k, length, dtype=x.dtype)
    for o, _, _, taps in windows(h, w, k, s, p, d):
        for kidx, hh, ww in taps:
            out[:, :, kidx, o] = read(x, hh, ww, mode)
    return out


def clique_products(q, k):
    """out[n, j, kk, l] = sum_c q[n, c, j, l] * k[n, c, kk, l], one tap pair and position at a time."""
    n, c, taps, length = q.shape
    out = torch.zeros(n, taps, taps, length, dtype=q.dtype)
    for j in range(taps):
        for kk in range(taps):
            for o in range(length):
                out[:, j, kk, o] = (q[:, :, j, o] * k[:, :, kk, o]).sum(1)
    return out


# --- compact forms, for whole-model oracles (test_convert.py) -------------------------------------------------------
def neighbours(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, K, L): x at each pixel's k x k window, reflection-padded by k // 2,
    stride 1; neighbour k = kh * kernel_size + kw, F.unfold's channel order c * K + k."""
    n, c, h, w = x.shape
    pad = kernel_size // 2
    cols = F.unfold(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel_size)
    return cols.view(n, c, kernel_size * kernel_size, h * w)


def position(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 2, H, W): channel 0 = linspace(-1, 1, W) along columns, 1 = linspace(-1, 1, H) along rows."""
    cols = torch.linspace(-1, 1, width, dtype=like.dtype).repeat(height, 1)
    rows = torch.linspace(-1, 1, height, dtype=like.dtype).unsqueeze(1).repeat(1, width)
    return torch.stack([cols, rows]).unsqueeze(0)
