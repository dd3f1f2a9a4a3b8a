"""The aggregation on the GPU, with or without the softmax over the footprint taps, forward and backward.

``y[n, c, o] = sum_k w[n, c % Cw, k, o] * x[n, c, nbr_k(o)]`` (the authors' interleaved sharing). A program owns
one (n, weight channel) and a block of positions, and holds the G = C / Cw channels that share the weight as the
rows of a (G, BLOCK) tile: each weight is read once for all of them. With the softmax, the program normalises the
logits of its positions over the taps first (two reads of the logits, one write of the softmax, which the backward
needs). The backward is gather-style (a program owns input pixels and sums what read them): no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import Footprint
from ._common import BLOCK, accumulator, image_of, next_power_of_2, output_of, source


@triton.jit
def _aggregation_forward(x_ptr, w_ptr, y_ptr, s_ptr, C, CW, G, H, W, W_out, L, STRIDE, PAD, DIL,
                         KS: tl.constexpr, REFLECT: tl.constexpr, SOFTMAX: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
    task = tl.program_id(0).to(tl.int64)  # n * Cw + cw
    n, cw = task // CW, task % CW
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = o < L
    oh, ow = o // W_out, o % W_out
    g = tl.arange(0, BLOCK_G)
    rows = g < G
    x_rows = ((n * C + g * CW + cw) * H * W)[:, None]  # the channels c = g * Cw + cw that share this weight
    w_base = task * (KS * KS) * L
    if SOFTMAX:
        peak = tl.full([BLOCK], float("-inf"), ACC)
        for k in tl.static_range(KS * KS):
            peak = tl.maximum(peak, tl.load(w_ptr + w_base + k * L + o, mask=live, other=0.0).to(ACC))
        total = tl.zeros([BLOCK], dtype=ACC)
        for k in tl.static_range(KS * KS):
            total += tl.exp(tl.load(w_ptr + w_base + k * L + o, mask=live, other=0.0).to(ACC) - peak)
    acc = tl.zeros([BLOCK_G, BLOCK], dtype=ACC)
    for kh in tl.static_range(KS):
        sh, vh = source(oh * STRIDE - PAD + kh * DIL, H, REFLECT)
        for kw in tl.static_range(KS):
            sw, vw = source(ow * STRIDE - PAD + kw * DIL, W, REFLECT)
            wk = tl.load(w_ptr + w_base + (kh * KS + kw) * L + o, mask=live, other=0.0).to(ACC)
            if SOFTMAX:
                wk = tl.exp(wk - peak) / total
                tl.store(s_ptr + w_base + (kh * KS + kw) * L + o, wk.to(s_ptr.dtype.element_ty), mask=live)
            v = tl.load(x_ptr + x_rows + (sh * W + sw)[None, :], mask=rows[:, None] & (live & vh & vw)[None, :],
                        other=0.0)
            acc += wk[None, :] * v.to(ACC)
    y_rows = ((n * C + g * CW + cw) * L)[:, None]
    tl.store(y_ptr + y_rows + o[None, :], acc.to(y_ptr.dtype.element_ty), mask=rows[:, None] & live[None, :])


@triton.jit
def _aggregation_grad_weight(x_ptr, gy_ptr, gw_ptr, C, CW, G, H, W, W_out, L, STRIDE, PAD, DIL,
                             KS: tl.constexpr, REFLECT: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr,
                             BLOCK: tl.constexpr):
    """gw[n, cw, k, o] = sum over the channels c sharing cw of gy[n, c, o] * x[n, c, nbr_k(o)]."""
    task = tl.program_id(0).to(tl.int64)
    n, cw = task // CW, task % CW
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = o < L
    oh, ow = o // W_out, o % W_out
    g = tl.arange(0, BLOCK_G)
    rows = g < G
    channel = n * C + g * CW + cw
    gy = tl.load(gy_ptr + (channel * L)[:, None] + o[None, :], mask=rows[:, None] & live[None, :], other=0.0)
    gy = gy.to(ACC)
    w_base = task * (KS * KS) * L
    for kh in tl.static_range(KS):
        sh, vh = source(oh * STRIDE - PAD + kh * DIL, H, REFLECT)
        for kw in tl.static_range(KS):
            sw, vw = source(ow * STRIDE - PAD + kw * DIL, W, REFLECT)
            v = tl.load(x_ptr + (channel * H * W)[:, None] + (sh * W + sw)[None, :],
                        mask=rows[:, None] & (live & vh & vw)[None, :], other=0.0)
            gk = tl.sum(gy * v.to(ACC), axis=0)
            tl.store(gw_ptr + w_base + (kh * KS + kw) * L + o, gk.to(gw_ptr.dtype.element_ty), mask=live)


@triton.jit
def _aggregation_grad_input(w_ptr, gy_ptr, gx_ptr, C, CW, G, H, W, H_out, W_out, L, STRIDE, PAD, DIL,
                            KS: tl.constexpr, REFLECT: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr,
                            BLOCK: tl.constexpr):
    """gx[n, c, p] = sum over the (k, o) that read pixel p of w[n, c % Cw, k, o] * gy[n, c, o] (gather-style)."""
    task = tl.program_id(0).to(tl.int64)
    n, cw = task // CW, task % CW
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = p < H * W
    ph, pw = p // W, p % W
    g = tl.arange(0, BLOCK_G)
    rows = g < G
    channel = n * C + g * CW + cw
    w_base = task * (KS * KS) * L
    acc = tl.zeros([BLOCK_G, BLOCK], dtype=ACC)
    for ah in tl.static_range(3 if REFLECT else 1):
        qh, eh = image_of(ph, H, ah, REFLECT)
        for aw in tl.static_range(3 if REFLECT else 1):
            qw, ew = image_of(pw, W, aw, REFLECT)
            here = live & eh & ew
            for kh in tl.static_range(KS):
                oh, okh = output_of(qh, kh, H_out, STRIDE, PAD, DIL)
                for kw in tl.static_range(KS):
                    ow, okw = output_of(qw, kw, W_out, STRIDE, PAD, DIL)
                    ok = here & okh & okw
                    at = oh * W_out + ow
                    wk = tl.load(w_ptr + w_base + (kh * KS + kw) * L + at, mask=ok, other=0.0).to(ACC)
                    gy = tl.load(gy_ptr + (channel * L)[:, None] + at[None, :], mask=rows[:, None] & ok[None, :],
                                 other=0.0)
                    acc += wk[None, :] * gy.to(ACC)
    tl.store(gx_ptr + (channel * H * W)[:, None] + p[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=rows[:, None] & live[None, :])


def _sizes(x: Tensor, weight: Tensor, fp: Footprint) -> tuple[int, ...]:
    n, c, h, w = x.shape
    cw = weight.shape[1]
    h_out, w_out = fp.out_hw(h, w)
    return n, c, cw, c // cw, h, w, h_out, w_out, h_out * w_out


def aggregation_forward(x: Tensor, weight: Tensor, fp: Footprint, softmax: bool = False) -> tuple[Tensor, Tensor]:
    """(y (N, C, H_out, W_out), softmax(weight) (N, Cw, K, L) if ``softmax`` else ``weight``)."""
    x, weight = x.contiguous(), weight.contiguous()
    n, c, cw, groups, h, w, h_out, w_out, length = _sizes(x, weight, fp)
    y = x.new_empty((n, c, h_out, w_out))
    probs = torch.empty_like(weight) if softmax else weight
    if n * cw * length > 0:
        grid = (n * cw, triton.cdiv(length, BLOCK))
        _aggregation_forward[grid](x, weight, y, probs, c, cw, groups, h, w, w_out, length, fp.stride, fp.padding,
                                   fp.dilation, KS=fp.kernel_size, REFLECT=fp.reflect, SOFTMAX=softmax,
                                   ACC=accumulator(x.dtype), BLOCK_G=next_power_of_2(groups), BLOCK=BLOCK)
    elif c == 0 and softmax:
        probs = weight.softmax(dim=2)
    return y, probs


def aggregation_backward(grad: Tensor, x: Tensor, weight: Tensor, fp: Footprint, need_x: bool = True,
                         need_weight: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """(grad x, grad weight) of ``aggregation_forward`` (without the softmax: see ``tap_softmax_backward``)."""
    grad, x, weight = grad.contiguous(), x.contiguous(), weight.contiguous()
    n, c, cw, groups, h, w, h_out, w_out, length = _sizes(x, weight, fp)
    common = dict(KS=fp.kernel_size, REFLECT=fp.reflect, ACC=accumulator(x.dtype), BLOCK_G=next_power_of_2(groups),
                  BLOCK=BLOCK)
    gx = gw = None
    if need_x:
        gx = torch.empty_like(x) if n * cw * h * w > 0 and length > 0 else torch.zeros_like(x)
        if n * cw * h * w > 0 and length > 0:
            grid = (n * cw, triton.cdiv(h * w, BLOCK))
            _aggregation_grad_input[grid](weight, grad, gx, c, cw, groups, h, w, h_out, w_out, length, fp.stride,
                                          fp.padding, fp.dilation, **common)
    if need_weight:
        gw = torch.empty_like(weight) if c > 0 else torch.zeros_like(weight)
        if n * cw * length > 0:
            grid = (n * cw, triton.cdiv(length, BLOCK))
            _aggregation_grad_weight[grid](x, grad, gw, c, cw, groups, h, w, w_out, length, fp.stride, fp.padding,
                                           fp.dilation, **common)
    return gx, gw
