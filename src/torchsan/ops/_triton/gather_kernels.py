"""The gathers on the GPU: subtraction2 (with append), subtraction and unfold, forward and backward.

``out[n, c, k, o] = x1[n, c, centre(o)] - x2[n, c, nbr_k(o)]`` (subtraction2; subtraction is x1 = x2) or
``x[n, c, nbr_k(o)]`` (unfold), (N, C, H, W) -> (N, C, K, L). A program writes one (n, c) plane's taps for a block
of output positions. The backward is gather-style: a program owns a block of input pixels and sums, over every
(tap, output) that read each pixel (reflected reads included), the gradient there. No atomics: deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .._checks import Footprint
from ._common import BLOCK, accumulator, image_of, output_of, source


@triton.jit
def _gather_forward(x1_ptr, x2_ptr, out_ptr, C, C_out, H, W, W_out, L, STRIDE, PAD, DIL,
                    KS: tl.constexpr, REFLECT: tl.constexpr, HAS_X1: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)  # n * C + c
    n, c = plane // C, plane % C
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = o < L
    oh, ow = o // W_out, o % W_out
    x_base = plane * H * W
    out_base = (n * C_out + c) * (KS * KS) * L
    if HAS_X1:
        ch, vh = source(oh * STRIDE - PAD + (KS // 2) * DIL, H, REFLECT)
        cw, vw = source(ow * STRIDE - PAD + (KS // 2) * DIL, W, REFLECT)
        centre = tl.load(x1_ptr + x_base + ch * W + cw, mask=live & vh & vw, other=0.0).to(ACC)
    for kh in tl.static_range(KS):
        sh, vh = source(oh * STRIDE - PAD + kh * DIL, H, REFLECT)
        for kw in tl.static_range(KS):
            sw, vw = source(ow * STRIDE - PAD + kw * DIL, W, REFLECT)
            v = tl.load(x2_ptr + x_base + sh * W + sw, mask=live & vh & vw, other=0.0).to(ACC)
            if HAS_X1:
                v = centre - v
            tl.store(out_ptr + out_base + (kh * KS + kw) * L + o, v.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _gather_backward(grad_ptr, g1_ptr, g2_ptr, C, C_grad, H, W, H_out, W_out, L, STRIDE, PAD, DIL,
                     KS: tl.constexpr, REFLECT: tl.constexpr, NEED1: tl.constexpr, NEED2: tl.constexpr,
                     SIGN2: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    n, c = plane // C, plane % C
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = p < H * W
    ph, pw = p // W, p % W
    g_base = (n * C_grad + c) * (KS * KS) * L
    acc1 = tl.zeros([BLOCK], dtype=ACC)
    acc2 = tl.zeros([BLOCK], dtype=ACC)
    for ah in tl.static_range(3 if REFLECT else 1):  # a pixel is read as itself and, reflected, from the padding
        qh, eh = image_of(ph, H, ah, REFLECT)
        for aw in tl.static_range(3 if REFLECT else 1):
            qw, ew = image_of(pw, W, aw, REFLECT)
            here = live & eh & ew
            if NEED2:
                for kh in tl.static_range(KS):
                    oh, okh = output_of(qh, kh, H_out, STRIDE, PAD, DIL)
                    for kw in tl.static_range(KS):
                        ow, okw = output_of(qw, kw, W_out, STRIDE, PAD, DIL)
                        g = tl.load(grad_ptr + g_base + (kh * KS + kw) * L + oh * W_out + ow,
                                    mask=here & okh & okw, other=0.0)
                        acc2 += g.to(ACC)
            if NEED1:  # x1 is read at the centre tap only, by every tap's output
                oh, okh = output_of(qh, KS // 2, H_out, STRIDE, PAD, DIL)
                ow, okw = output_of(qw, KS // 2, W_out, STRIDE, PAD, DIL)
                for k in tl.static_range(KS * KS):
                    g = tl.load(grad_ptr + g_base + k * L + oh * W_out + ow, mask=here & okh & okw, other=0.0)
                    acc1 += g.to(ACC)
    if NEED1:
        tl.store(g1_ptr + plane * H * W + p, acc1.to(g1_ptr.dtype.element_ty), mask=live)
    if NEED2:
        tl.store(g2_ptr + plane * H * W + p, (SIGN2 * acc2).to(g2_ptr.dtype.element_ty), mask=live)


def gather_forward(x1: Tensor | None, x2: Tensor, fp: Footprint, append: Tensor | None = None) -> Tensor:
    """subtraction2 (x1 given) or unfold (x1 None) of (N, C, H, W) inputs -> (N, C + E, K, L); ``append`` (1 or N,
    E, K, L) fills the last E channels."""
    unfold = x1 is None
    x2 = x2.contiguous()
    x1 = x2 if unfold else x1.contiguous()
    n, c, h, w = x2.shape
    h_out, w_out = fp.out_hw(h, w)
    length = h_out * w_out
    extra = 0 if append is None else append.shape[1]
    out = x2.new_empty((n, c + extra, fp.area, length))
    if n * c * length > 0:
        grid = (n * c, triton.cdiv(length, BLOCK))
        _gather_forward[grid](x1, x2, out, c, c + extra, h, w, w_out, length, fp.stride, fp.padding, fp.dilation,
                              KS=fp.kernel_size, REFLECT=fp.reflect, HAS_X1=not unfold,
                              ACC=accumulator(x2.dtype), BLOCK=BLOCK)
    if append is not None:
        out[:, c:] = append
    return out


def gather_backward(grad: Tensor, channels: int, height: int, width: int, fp: Footprint, unfold: bool,
                    need1: bool = True, need2: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """(grad x1, grad x2) of subtraction2 (or, with ``unfold``, (None, grad x)) from the first ``channels`` channels
    of grad (N, C + E, K, L)."""
    grad = grad.contiguous()
    n, c_grad, _, length = grad.shape
    h_out, w_out = fp.out_hw(height, width)
    need1 = need1 and not unfold
    g1 = grad.new_empty((n, channels, height, width)) if need1 else None
    g2 = grad.new_empty((n, channels, height, width)) if need2 else None
    if (need1 or need2) and n * channels * height * width > 0:
        grid = (n * channels, triton.cdiv(height * width, BLOCK))
        _gather_backward[grid](grad, g1 if need1 else grad, g2 if need2 else grad, channels, c_grad, height, width,
                               h_out, w_out, length, fp.stride, fp.padding, fp.dilation, KS=fp.kernel_size,
                               REFLECT=fp.reflect, NEED1=need1, NEED2=need2, SIGN2=1.0 if unfold else -1.0,
                               ACC=accumulator(grad.dtype), BLOCK=BLOCK)
    return g1, g2
