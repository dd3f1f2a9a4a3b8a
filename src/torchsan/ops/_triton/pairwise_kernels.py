"""The pairwise attention's logits on the GPU: subtraction2 (with append) and the mapping gamma = BN-ReLU-conv1x1-
BN-ReLU-conv1x1 in one op, which never writes z or gamma's activations, forward or backward.

``logits[n, :, k, o] = W2 relu(bn2(W1 relu(bn1(z[n, :, k, o])))) + b2``, ``z = [x1[centre(o)] - x2[nbr_k(o)],
append[:, k, o]]``: every tensor before the logits is (N, C', K, L), K times the size of the feature map.

A program owns one image and a block of output positions, and walks the K taps one at a time (a runtime loop, so
k = 7's 49 taps cost registers for one): it gathers z's (positions x channels) tile from x1, x2 and append and runs
gamma on it in registers, with ``tl.dot`` where every channel count reaches 16 and broadcast products below. Each
pass recomputes what it needs, as flash attention does:

* forward: (1) BN1's batch statistics of z, (2) BN2's of ``W1 relu(bn1(z))``, (3) the logits, the one tensor written;
* backward: (4) grad W2, b2 and BN2's reductions, (5) grad W1 and BN1's, (6) grad z, which subtraction2's
  gather-style backward turns into grad x1, x2 and append (that one (N, C + E, K, L) tensor lives for this call only).

A BN given its running statistics (eval mode) skips its statistics pass; its backward has no batch terms. Per-program
partial sums (statistics combined by Chan's formula, so no catastrophic cancellation) are reduced in torch in a fixed
order: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import Footprint
from . import interpreting
from ._common import accumulator, next_power_of_2, source

BLOCK_L = 32  # output positions per program: tiles of (BLOCK_L, channels) stay in registers up to 128 channels
INTERPRETER_BLOCK_L = 128  # the interpreter pays per program, not per register
STATS1, STATS2, LOGITS, GRAD2, GRAD1, GRAD_Z = range(6)  # the passes, in the order they run


@triton.jit
def _rounded(a, DTYPE: tl.constexpr):
    """float32 ``a`` rounded to nearest (even) ``DTYPE`` value, as float32. (The interpreter's own cast to bfloat16
    truncates, so bfloat16 rounds on the bits here.)"""
    if DTYPE == tl.bfloat16:
        bits = a.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return a.to(DTYPE).to(tl.float32)


@triton.jit
def _cast(a, ptr, NATIVE: tl.constexpr):
    """float32 ``a`` as the element type of ``ptr``, rounded to nearest (in the interpreter too)."""
    dtype = ptr.dtype.element_ty
    if not NATIVE and dtype == tl.bfloat16:
        a = _rounded(a, tl.bfloat16)
    return a.to(dtype)


@triton.jit
def _mm(a, b, DOT: tl.constexpr, ROUND_TO: tl.constexpr, NATIVE: tl.constexpr, PRECISION: tl.constexpr):
    """a (M, K) @ b (K, N) with float32 (float64) accumulation: tl.dot where the sizes allow it, else FMA.

    ``ROUND_TO`` float16 or bfloat16 (the forward products of such inputs) multiplies operands rounded to that
    dtype, as the modules' convolutions do under autocast: natively on the GPU, in the interpreter (whose dot
    mishandles bfloat16) as float32 products of the rounded values, exact either way. float32 operands multiply
    at ``PRECISION``: the backward's products stay float32, since BN's backward cancels most of their size."""
    if DOT:
        if ROUND_TO != tl.float32:
            if NATIVE:
                return tl.dot(a.to(ROUND_TO), b.to(ROUND_TO))
            a, b = _rounded(a, ROUND_TO), _rounded(b, ROUND_TO)
        return tl.dot(a, b, input_precision=PRECISION)
    return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _welford(mean, m2, count, tile, live, taken):
    """Combine a tile's per-channel (mean, M2) over its ``count`` live rows into (mean, m2) over ``taken`` rows."""
    tile_mean = tl.sum(tl.where(live[:, None], tile, 0.0), axis=0) / count
    centred = tl.where(live[:, None], tile - tile_mean[None, :], 0.0)
    tile_m2 = tl.sum(centred * centred, axis=0)
    delta = tile_mean - mean
    total = taken + count
    return mean + delta * (count / total), m2 + tile_m2 + delta * delta * (taken * count / total)


@triton.jit
def _pairwise_pass(
    x1_ptr, x2_ptr, app_ptr, APP_BATCH,
    s1_ptr, t1_ptr, mu1_ptr, r1_ptr, c10_ptr, c11_ptr, w1_ptr,
    s2_ptr, t2_ptr, mu2_ptr, r2_ptr, c20_ptr, c21_ptr, w2_ptr, b2_ptr,
    g_ptr, out_ptr, part_ptr, mat_ptr,
    C, C1, CM, CW, H, W, W_out, L, NB, PW, STRIDE, PAD, DIL,
    KS: tl.constexpr, REFLECT: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr,
    DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, NATIVE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BC1: tl.constexpr, BCM: tl.constexpr, BCW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # n * NB + block
    n, block = pid // NB, pid % NB
    o = block * BLOCK_L + tl.arange(0, BLOCK_L)
    live = o < L
    count = tl.sum(live.to(ACC), axis=0)
    oh, ow = o // W_out, o % W_out
    c1 = tl.arange(0, BC1)
    cm = tl.arange(0, BCM)
    cw = tl.arange(0, BCW)
    is_x, is_app = c1 < C, (c1 >= C) & (c1 < C1)
    x_rows = ((n * C + c1) * H * W)[None, :]
    a_rows = (n * APP_BATCH + (c1 - C) * (KS * KS) * L)[None, :]

    # gamma's parameters, padded with zeros to the power-of-2 tiles (padded channels stay exactly 0)
    s1, t1 = tl.load(s1_ptr + c1, mask=c1 < C1, other=0.0), tl.load(t1_ptr + c1, mask=c1 < C1, other=0.0)
    s2, t2 = tl.load(s2_ptr + cm, mask=cm < CM, other=0.0), tl.load(t2_ptr + cm, mask=cm < CM, other=0.0)
    w1t = tl.load(w1_ptr + cm[None, :] * C1 + c1[:, None], mask=(c1 < C1)[:, None] & (cm < CM)[None, :], other=0.0)
    w2t = tl.load(w2_ptr + cw[None, :] * CM + cm[:, None], mask=(cm < CM)[:, None] & (cw < CW)[None, :], other=0.0)
    mu1, mu2 = tl.load(mu1_ptr + c1, mask=c1 < C1, other=0.0), tl.load(mu2_ptr + cm, mask=cm < CM, other=0.0)
    if MODE >= GRAD2:
        r2 = tl.load(r2_ptr + cm, mask=cm < CM, other=0.0)
    if MODE >= GRAD1:
        c20, c21 = tl.load(c20_ptr + cm, mask=cm < CM, other=0.0), tl.load(c21_ptr + cm, mask=cm < CM, other=0.0)
        r1 = tl.load(r1_ptr + c1, mask=c1 < C1, other=0.0)
    if MODE == GRAD_Z:
        c10, c11 = tl.load(c10_ptr + c1, mask=c1 < C1, other=0.0), tl.load(c11_ptr + c1, mask=c1 < C1, other=0.0)

    ch, vch = source(oh * STRIDE - PAD + (KS // 2) * DIL, H, REFLECT)
    cv, vcw = source(ow * STRIDE - PAD + (KS // 2) * DIL, W, REFLECT)
    centre = tl.load(x1_ptr + x_rows + (ch * W + cv)[:, None], mask=(live & vch & vcw)[:, None] & is_x[None, :],
                     other=0.0).to(ACC)

    # what a pass accumulates over the taps
    mean1 = tl.zeros([BC1], dtype=ACC)
    m2_1 = tl.zeros([BC1], dtype=ACC)
    mean2 = tl.zeros([BCM], dtype=ACC)
    m2_2 = tl.zeros([BCM], dtype=ACC)
    sum_w = tl.zeros([BCW], dtype=ACC)
    sum_m = tl.zeros([BCM], dtype=ACC)
    sum_mh = tl.zeros([BCM], dtype=ACC)
    sum_1 = tl.zeros([BC1], dtype=ACC)
    sum_1h = tl.zeros([BC1], dtype=ACC)
    grad_w2 = tl.zeros([BCW, BCM], dtype=ACC)
    grad_w1 = tl.zeros([BCM, BC1], dtype=ACC)

    for tap in range(KS * KS):
        kh, kw = tap // KS, tap % KS
        sh, vh = source(oh * STRIDE - PAD + kh * DIL, H, REFLECT)
        sw, vw = source(ow * STRIDE - PAD + kw * DIL, W, REFLECT)
        neighbour = tl.load(x2_ptr + x_rows + (sh * W + sw)[:, None], mask=(live & vh & vw)[:, None] & is_x[None, :],
                            other=0.0).to(ACC)
        appended = tl.load(app_ptr + a_rows + tap * L + o[:, None], mask=live[:, None] & is_app[None, :], other=0.0)
        z = centre - neighbour + appended.to(ACC)
        taken = (tap * count).to(ACC)
        if MODE == STATS1:
            mean1, m2_1 = _welford(mean1, m2_1, count, z, live, taken)
        else:
            # BN as torch computes it, (u - mean) * scale + bias: exactly 0 where u == mean, so ReLU gates the same
            a1 = tl.maximum((z - mu1[None, :]) * s1[None, :] + t1[None, :], 0.0)
            y = _mm(a1, w1t, DOT, DOT_DTYPE, NATIVE, PRECISION)  # (BLOCK_L, BCM)
            if MODE == STATS2:
                mean2, m2_2 = _welford(mean2, m2_2, count, y, live, taken)
            else:
                a2 = tl.maximum((y - mu2[None, :]) * s2[None, :] + t2[None, :], 0.0)
                w_rows = ((n * CW + cw) * (KS * KS) + tap) * L
                w_mask = live[:, None] & (cw < CW)[None, :]
                if MODE == LOGITS:
                    b2 = tl.load(b2_ptr + cw, mask=cw < CW, other=0.0)
                    logits = _mm(a2, w2t, DOT, DOT_DTYPE, NATIVE, PRECISION) + b2[None, :]
                    tl.store(out_ptr + w_rows[None, :] + o[:, None], _cast(logits, out_ptr, NATIVE), mask=w_mask)
                else:
                    gl = tl.load(g_ptr + w_rows[None, :] + o[:, None], mask=w_mask, other=0.0).to(ACC)
                    # at BN2's output
                    d2 = tl.where(a2 > 0, _mm(gl, tl.trans(w2t), DOT, tl.float32, NATIVE, PRECISION), 0.0)
                    yhat = (y - mu2[None, :]) * r2[None, :]
                    if MODE == GRAD2:
                        grad_w2 += _mm(tl.trans(gl), a2, DOT, tl.float32, NATIVE, PRECISION)
                        sum_w += tl.sum(gl, axis=0)
                        sum_m += tl.sum(d2, axis=0)
                        sum_mh += tl.sum(d2 * yhat, axis=0)
                    else:
                        dy = d2 * s2[None, :] + c20[None, :] + c21[None, :] * yhat  # at BN2's input
                        dy = tl.where(live[:, None], dy, 0.0)
                        # at BN1's output
                        d1 = tl.where(a1 > 0, _mm(dy, tl.trans(w1t), DOT, tl.float32, NATIVE, PRECISION), 0.0)
                        zhat = (z - mu1[None, :]) * r1[None, :]
                        if MODE == GRAD1:
                            grad_w1 += _mm(tl.trans(dy), a1, DOT, tl.float32, NATIVE, PRECISION)
                            sum_1 += tl.sum(d1, axis=0)
                            sum_1h += tl.sum(d1 * zhat, axis=0)
                        else:
                            dz = d1 * s1[None, :] + c10[None, :] + c11[None, :] * zhat
                            z_rows = ((n * C1 + c1) * (KS * KS) + tap) * L
                            tl.store(out_ptr + z_rows[None, :] + o[:, None], _cast(dz, out_ptr, NATIVE),
                                     mask=live[:, None] & (c1 < C1)[None, :])

    # partial results: vectors in the rows of part (P, 4, PW), matrices in mat (P, rows, cols)
    part = part_ptr + pid * 4 * PW
    if MODE == STATS1:
        tl.store(part + c1, mean1)
        tl.store(part + PW + c1, m2_1)
    if MODE == STATS2:
        tl.store(part + cm, mean2)
        tl.store(part + PW + cm, m2_2)
    if MODE == GRAD2:
        tl.store(part + cm, sum_m)
        tl.store(part + PW + cm, sum_mh)
        tl.store(part + 2 * PW + cw, sum_w)
        tl.store(mat_ptr + pid * BCW * BCM + cw[:, None] * BCM + cm[None, :], grad_w2)
    if MODE == GRAD1:
        tl.store(part + c1, sum_1)
        tl.store(part + PW + c1, sum_1h)
        tl.store(mat_ptr + pid * BCM * BC1 + cm[:, None] * BC1 + c1[None, :], grad_w1)


class Gamma:
    """The pass launcher for one call: inputs, padded sizes and the per-channel vectors of both BNs."""

    def __init__(self, x1: Tensor, x2: Tensor, append: Tensor | None, w1: Tensor, w2: Tensor, b2: Tensor | None,
                 fp: Footprint) -> None:
        self.x1, self.x2, self.fp = x1.contiguous(), x2.contiguous(), fp
        self.n, self.c, self.h, self.w = x1.shape
        self.h_out, self.w_out = fp.out_hw(self.h, self.w)
        self.length = self.h_out * self.w_out
        self.append = append.contiguous() if append is not None else None
        extra = 0 if append is None else append.shape[1]
        self.c1, self.cm, self.cw = self.c + extra, w1.shape[0], w2.shape[0]
        self.acc = torch.float64 if x1.dtype == torch.float64 else torch.float32
        self.w1 = w1.to(self.acc).contiguous()
        self.w2 = w2.to(self.acc).contiguous()
        self.b2 = (b2.to(self.acc) if b2 is not None else w2.new_zeros(self.cw, dtype=self.acc)).contiguous()
        self.bc1, self.bcm, self.bcw = (max(16, next_power_of_2(s)) for s in (self.c1, self.cm, self.cw))
        self.dot = x1.dtype != torch.float64 and not _tiny(self.c1, self.cm, self.cw)
        if not self.dot:  # broadcast products: no padding to tl.dot's 16 needed
            self.bc1, self.bcm, self.bcw = (next_power_of_2(s) for s in (self.c1, self.cm, self.cw))
        self.block = INTERPRETER_BLOCK_L if interpreting() else BLOCK_L
        self.blocks = triton.cdiv(self.length, self.block)
        self.programs = self.n * self.blocks
        # rows counted per program: every live position of a block, once per tap
        live = torch.full((self.blocks,), self.block, dtype=self.acc, device=x1.device)
        live[-1] = self.length - (self.blocks - 1) * self.block
        self.counts = live.repeat(self.n) * fp.area
        self.vectors: dict[str, Tensor] = {}

    @property
    def elements(self) -> int:
        """Rows of z per channel: N * K * L."""
        return self.n * self.fp.area * self.length

    def set(self, **vectors: Tensor) -> None:
        self.vectors.update({k: v.to(self.acc).contiguous() for k, v in vectors.items()})

    def run(self, mode: int, grad: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Launch one pass; returns (out, part, mat): the tensor it writes, its partial vectors and matrices."""
        dev, acc = self.x1.device, self.acc
        out = part = mat = None
        if mode == LOGITS:
            out = self.x1.new_empty((self.n, self.cw, self.fp.area, self.length))
        elif mode == GRAD_Z:
            out = self.x1.new_empty((self.n, self.c1, self.fp.area, self.length))
        else:
            part = torch.zeros((self.programs, 4, max(self.bc1, self.bcm, self.bcw)), dtype=acc, device=dev)
            if mode == GRAD2:
                mat = torch.empty((self.programs, self.bcw, self.bcm), dtype=acc, device=dev)
            elif mode == GRAD1:
                mat = torch.empty((self.programs, self.bcm, self.bc1), dtype=acc, device=dev)
        if self.programs == 0:
            return out, part, mat
        v = self.vectors
        dummy = self.w1
        app = self.append if self.append is not None else self.x1
        app_batch = 0 if self.append is None or self.append.shape[0] == 1 else self.append[0].numel()
        fp = self.fp
        _pairwise_pass[(self.programs,)](
            self.x1, self.x2, app, app_batch,
            v["s1"], v["t1"], v.get("mu1", dummy), v.get("r1", dummy), v.get("c10", dummy), v.get("c11", dummy),
            self.w1,
            v.get("s2", dummy), v.get("t2", dummy), v.get("mu2", dummy), v.get("r2", dummy), v.get("c20", dummy),
            v.get("c21", dummy), self.w2, self.b2,
            grad if grad is not None else dummy, out if out is not None else dummy,
            part if part is not None else dummy, mat if mat is not None else dummy,
            self.c, self.c1, self.cm, self.cw, self.h, self.w, self.w_out, self.length, self.blocks,
            max(self.bc1, self.bcm, self.bcw), fp.stride, fp.padding, fp.dilation,
            KS=fp.kernel_size, REFLECT=fp.reflect, MODE=mode, ACC=accumulator(self.x1.dtype), DOT=self.dot,
            DOT_DTYPE=_dot_dtype(self.x1.dtype), NATIVE=not interpreting(),
            PRECISION="ieee" if interpreting() else "tf32x3", BLOCK_L=self.block,
            BC1=self.bc1, BCM=self.bcm, BCW=self.bcw,
        )
        return out, part, mat

    def statistics(self, mode: int, channels: int) -> tuple[Tensor, Tensor]:
        """(mean, biased var) over N * K * L rows of z (STATS1) or of BN2's input (STATS2): Chan's combination of
        the programs' (mean, M2)."""
        _, part, _ = self.run(mode)
        means, m2s = part[:, 0, :channels], part[:, 1, :channels]
        counts = self.counts[:, None]
        mean = (counts * means).sum(0) / self.elements
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        return mean, m2 / self.elements


def _tiny(*channels: int) -> bool:
    return min(channels) < 16  # tl.dot needs 16 along every dimension


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


# --- the op ---------------------------------------------------------------------------------------------------------
def _affine(weight: Tensor | None, bias: Tensor | None, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """A BN with 1 / std ``rstd`` as ``(u - mean) * s + t``: (s, t)."""
    scale = rstd if weight is None else weight.to(rstd.dtype) * rstd
    return scale, torch.zeros_like(rstd) if bias is None else bias.to(rstd.dtype)


class _PairwiseLogits(torch.autograd.Function):
    """(x1, x2, append, BN1 weight, bias, W1, BN2 weight, bias, W2, b2) -> (logits, mean1, var1, mean2, var2)."""

    @staticmethod
    def forward(ctx, x1, x2, append, n1_weight, n1_bias, w1, n2_weight, n2_bias, w2, b2, fp, eps1, eps2,
                running1, running2):
        gamma = Gamma(x1, x2, append, w1, w2, b2, fp)
        zeros1, zeros2 = gamma.w1.new_zeros(gamma.c1), gamma.w1.new_zeros(gamma.cm)  # (not read by the passes)
        gamma.set(s1=zeros1, t1=zeros1, mu1=zeros1, mu2=zeros2)
        batch1, batch2 = running1 is None, running2 is None
        mean1, var1 = gamma.statistics(STATS1, gamma.c1) if batch1 else (r.to(gamma.acc) for r in running1)
        r1 = torch.rsqrt(var1 + eps1)
        gamma.set(mu1=mean1, r1=r1, **dict(zip(("s1", "t1"), _affine(n1_weight, n1_bias, r1))))
        mean2, var2 = gamma.statistics(STATS2, gamma.cm) if batch2 else (r.to(gamma.acc) for r in running2)
        r2 = torch.rsqrt(var2 + eps2)
        gamma.set(mu2=mean2, r2=r2, **dict(zip(("s2", "t2"), _affine(n2_weight, n2_bias, r2))))
        logits = gamma.run(LOGITS)[0]
        ctx.save_for_backward(x1, x2, append, n1_weight, n1_bias, w1, n2_weight, n2_bias, w2, b2,
                              mean1, r1, mean2, r2)
        ctx.fp, ctx.batch = fp, (batch1, batch2)
        ctx.norm_args = ((eps1, *(running1 or (None, None))), (eps2, *(running2 or (None, None))))
        stats = [s.to(x1.dtype) if batch else None for s, batch in ((mean1, batch1), (var1, batch1),
                                                                     (mean2, batch2), (var2, batch2))]
        for s in stats:
            if s is not None:
                ctx.mark_non_differentiable(s)
        return logits, *stats

    @staticmethod
    def backward(ctx, grad, *_):
        (x1, x2, append, n1_weight, n1_bias, w1, n2_weight, n2_bias, w2, b2, mean1, r1, mean2,
         r2) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: the gradient as a graph, through the reference composition
            from .. import reference
            from .._cpu._register import differentiable_backward

            def composition(x1, x2, append, n1_weight, n1_bias, w1, n2_weight, n2_bias, w2, b2):
                return reference.pairwise_logits(x1, x2, append, (n1_weight, n1_bias, *ctx.norm_args[0]), w1,
                                                 (n2_weight, n2_bias, *ctx.norm_args[1]), w2, b2, ctx.fp)[0]

            inputs = (x1, x2, append, n1_weight, n1_bias, w1, n2_weight, n2_bias, w2, b2)
            return (*differentiable_backward(composition, inputs, (grad,)), None, None, None, None, None)
        gamma = Gamma(x1, x2, append, w1, w2, b2, ctx.fp)
        s1, t1 = _affine(n1_weight, n1_bias, r1)
        s2, t2 = _affine(n2_weight, n2_bias, r2)
        gamma.set(s1=s1, t1=t1, mu1=mean1, r1=r1, s2=s2, t2=t2, mu2=mean2, r2=r2)
        grad = grad.contiguous()
        m = gamma.elements
        cm, cw, c1 = gamma.cm, gamma.cw, gamma.c1

        _, part, mat = gamma.run(GRAD2, grad)
        sum_m, sum_mh, sum_w = part[:, 0, :cm].sum(0), part[:, 1, :cm].sum(0), part[:, 2, :cw].sum(0)
        g_w2, g_b2 = mat.sum(0)[:cw, :cm], sum_w
        batch1, batch2 = ctx.batch
        zeros_m = torch.zeros_like(s2)
        gamma.set(c20=-s2 * sum_m / m if batch2 else zeros_m, c21=-s2 * sum_mh / m if batch2 else zeros_m)

        _, part, mat = gamma.run(GRAD1, grad)
        sum_1, sum_1h = part[:, 0, :c1].sum(0), part[:, 1, :c1].sum(0)
        g_w1 = mat.sum(0)[:cm, :c1]
        zeros_1 = torch.zeros_like(s1)
        gamma.set(c10=-s1 * sum_1 / m if batch1 else zeros_1, c11=-s1 * sum_1h / m if batch1 else zeros_1)

        g1 = g2 = g_append = None
        if needs[0] or needs[1] or needs[2]:
            from .gather_kernels import gather_backward

            gz = gamma.run(GRAD_Z, grad)[0]
            g1, g2 = gather_backward(gz, gamma.c, gamma.h, gamma.w, ctx.fp, unfold=False, need1=needs[0],
                                     need2=needs[1])
            if needs[2]:
                g_append = gz[:, gamma.c:]
                if append.shape[0] == 1 and gz.shape[0] != 1:
                    g_append = g_append.sum(0, keepdim=True)

        def cast(g: Tensor, like: Tensor | None, need: bool) -> Tensor | None:
            return g.to(like.dtype) if need and like is not None else None

        return (g1, g2, g_append, cast(sum_1h, n1_weight, needs[3]), cast(sum_1, n1_bias, needs[4]),
                cast(g_w1, w1, needs[5]), cast(sum_mh, n2_weight, needs[6]), cast(sum_m, n2_bias, needs[7]),
                cast(g_w2, w2, needs[8]), cast(g_b2, b2, needs[9]), None, None, None, None, None)


def pairwise_logits(x1: Tensor, x2: Tensor, append: Tensor | None, norm1: tuple, w1: Tensor, norm2: tuple,
                    w2: Tensor, b2: Tensor | None, fp: Footprint) -> tuple[Tensor, ...]:
    """See ``torchsan.ops.pairwise_logits``; ``norm`` = (weight, bias, eps, running_mean, running_var)."""
    (n1_weight, n1_bias, eps1, *running1), (n2_weight, n2_bias, eps2, *running2) = norm1, norm2
    running1 = None if running1[0] is None else tuple(running1)
    running2 = None if running2[0] is None else tuple(running2)
    return _PairwiseLogits.apply(x1, x2, append, n1_weight, n1_bias, w1, n2_weight, n2_bias, w2, b2, fp,
                                 float(eps1), float(eps2), running1, running2)
