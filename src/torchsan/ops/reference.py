"""Plain PyTorch reference backend (unfold), differentiable through autograd on any device.

This is the ground truth the fast kernels are tested against; it is itself tested against a
per-pixel loop in ``tests/test_ops_reference.py``. It materialises the (N, C, K, L) unfolded
tensor, so it is memory-hungry by design: clarity over speed. The fused ops are the compositions
of their parts, so the layers gain nothing by calling them here: :func:`fuses` says so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import Footprint


def _planes(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W), or for C == 0 its (0, 1, H, W) view: F.pad, F.unfold and F.max_pool2d refuse a zero channel
    count but take a zero batch (the cpu kernels take both)."""
    return x if x.shape[1] else x.reshape(0, 1, *x.shape[2:])


def _padded(x: torch.Tensor, fp: Footprint) -> torch.Tensor:
    p = fp.padding
    if p == 0:
        return x
    mode = "reflect" if fp.pad_mode == "reflect" else "constant"
    return F.pad(x, (p, p, p, p), mode=mode)


def unfold(x: torch.Tensor, fp: Footprint) -> torch.Tensor:
    """Neighbours of every output pixel: (N, C, H, W) -> (N, C, K, L), k = kh * ks + kw."""
    n, c = x.shape[:2]
    cols = F.unfold(_padded(_planes(x), fp), fp.kernel_size, dilation=fp.dilation, stride=fp.stride)
    return cols.view(n, c, fp.area, cols.shape[-1])


def centre(x: torch.Tensor, fp: Footprint, h_out: int, w_out: int) -> torch.Tensor:
    """The centre tap of every output pixel's window: (N, C, H, W) -> (N, C, 1, L)."""
    off = (fp.kernel_size // 2) * fp.dilation
    xp = _padded(_planes(x), fp)
    s = fp.stride
    mid = xp[:, :, off : off + (h_out - 1) * s + 1 : s, off : off + (w_out - 1) * s + 1 : s]
    return mid.reshape(x.shape[0], x.shape[1], 1, h_out * w_out)


def aggregation(x: torch.Tensor, weight: torch.Tensor, fp: Footprint, h_out: int, w_out: int) -> torch.Tensor:
    n, c = x.shape[:2]
    cw = weight.shape[1]
    cols = unfold(x, fp).view(n, c // cw, cw, fp.area, h_out * w_out)
    out = (cols * weight.unsqueeze(1)).sum(dim=3)
    return out.view(n, c, h_out, w_out)


def subtraction(x: torch.Tensor, fp: Footprint, h_out: int, w_out: int) -> torch.Tensor:
    return centre(x, fp, h_out, w_out) - unfold(x, fp)


def subtraction2(x1: torch.Tensor, x2: torch.Tensor, fp: Footprint, h_out: int, w_out: int,
                 append: torch.Tensor | None = None) -> torch.Tensor:
    out = centre(x1, fp, h_out, w_out) - unfold(x2, fp)
    if append is None:
        return out
    return torch.cat([out, append.expand(out.shape[0], -1, -1, -1)], dim=1)


def clique_products(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Products of every pair of taps: (N, C, K, L) x 2 -> (N, K, K, L), out[n, j, k, l] = sum_c q[n, c, j, l]
    k[n, c, k, l]. (einsum returns a permuted view; contiguous, as every backend returns it.)"""
    return torch.einsum("ncjl,nckl->njkl", q, k).contiguous()


def affine_relu_conv1x1(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    r = torch.relu(x * scale.view(shape) + shift.view(shape))
    y = torch.einsum("oc,nc...->no...", weight, r)
    y = y if bias is None else y + bias.view(shape)
    return y if residual is None else y + residual


def channel_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)


def tap_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=2)


def tap_softmax_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The softmax's gradient w.r.t. its input, from its output ``out``: out * (grad - sum_k out * grad)."""
    return out * (grad - (out * grad).sum(dim=2, keepdim=True))


def softmax_aggregation(x: torch.Tensor, logits: torch.Tensor, fp: Footprint, h_out: int, w_out: int) -> torch.Tensor:
    return aggregation(x, tap_softmax(logits), fp, h_out, w_out)


def affine_relu_maxpool2x2(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    y = F.max_pool2d(_planes(torch.relu(x * scale.view(shape) + shift.view(shape))), 2, 2)
    return y.view(*x.shape[:2], *y.shape[2:])


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.reshape(*x.shape[:2], math.prod(x.shape[2:]))  # (N, Cin, P), P = 1 for a 2-D x (F.conv2d: not Cin = 0)
    y = torch.matmul(weight, rows).view(x.shape[0], weight.shape[0], *x.shape[2:])
    return y if bias is None else y + bias.view(1, -1, *[1] * (x.dim() - 2))


def conv1x1_affine_relu_maxpool2x2(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                   shift: torch.Tensor) -> torch.Tensor:
    return affine_relu_maxpool2x2(conv1x1(x, weight), scale, shift)


def batchnorm_scale_shift(weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
                          var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm as a per-channel affine map: scale = weight / sqrt(var + eps), shift = bias - mean * scale.
    The one place this formula lives (the fused ops, their backward and the layers all use it)."""
    scale = torch.rsqrt(var + eps)
    scale = scale if weight is None else weight * scale
    return scale, (-mean * scale if bias is None else bias - mean * scale)


def batchnorm_relu_conv1x1(x, weight, bias, eps, conv_weight, conv_bias):
    var, mean = channel_var_mean(x)
    scale, shift = batchnorm_scale_shift(weight, bias, mean, var, eps)
    return affine_relu_conv1x1(x, scale, shift, conv_weight, conv_bias), mean, var


def batchnorm_relu_maxpool2x2(x, weight, bias, eps):
    var, mean = channel_var_mean(x)
    scale, shift = batchnorm_scale_shift(weight, bias, mean, var, eps)
    return affine_relu_maxpool2x2(x, scale, shift), mean, var


def conv1x1_batchnorm_relu_maxpool2x2(x, conv_weight, weight, bias, eps):
    y = torch.matmul(conv_weight, x.flatten(2)).view(x.shape[0], conv_weight.shape[0], *x.shape[2:])
    return batchnorm_relu_maxpool2x2(y, weight, bias, eps)


def subtraction2_batchnorm_relu_conv1x1(x1, x2, append, weight, bias, eps, conv_weight, conv_bias, fp: Footprint):
    z = subtraction2(x1, x2, fp, *fp.out_hw(x1.shape[2], x1.shape[3]), append=append)
    return batchnorm_relu_conv1x1(z, weight, bias, eps, conv_weight, conv_bias)


def _batchnorm(x: torch.Tensor, weight, bias, eps: float, running_mean, running_var):
    """BN of (N, C, K, L) x with batch statistics (running_mean None: also returns them, var biased) or running ones."""
    if x.shape[1] == 0:  # torch's batch_norm refuses a tensor without channels: its affine map, on nothing
        for t, op in ((weight, torch.mul), (bias, torch.add)):
            x = x if t is None else op(x, t.view(1, 0, 1, 1))
        return x, *((None, None) if running_mean is not None else (x.new_empty(0), x.new_empty(0)))
    if running_mean is not None:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps), None, None
    with torch.no_grad():
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps), mean, var


def pairwise_logits(x1, x2, append, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp: Footprint):
    """gamma(z) = conv2(relu(bn2(conv1(relu(bn1(z)))))) of z = subtraction2(x1, x2, append=append), each norm a
    (weight, bias, eps, running_mean, running_var) tuple (running_mean None: batch statistics, returned).
    Returns (logits, mean1, var1, mean2, var2)."""
    z = subtraction2(x1, x2, fp, *fp.out_hw(x1.shape[2], x1.shape[3]), append=append)
    z, mean1, var1 = _batchnorm(z, *norm1)
    y = F.conv2d(F.relu(z), conv1_weight[:, :, None, None])
    y, mean2, var2 = _batchnorm(y, *norm2)
    return F.conv2d(F.relu(y), conv2_weight[:, :, None, None], conv2_bias), mean1, var1, mean2, var2


def pairwise_attention(x1, x2, values, append, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp: Footprint):
    """softmax_aggregation(values, pairwise_logits(...)): the pairwise layer after its transforms (running
    statistics)."""
    logits = pairwise_logits(x1, x2, append, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp)[0]
    return softmax_aggregation(values, logits, fp, *fp.out_hw(x1.shape[2], x1.shape[3]))


def patchwise_weights(x1, x2, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp: Footprint):
    """gamma(z) = conv2(relu(bn2(conv1(relu(bn1(z)))))) of the patchwise concatenation relation
    z = [centre(x1), unfold(x2) as C * K channels (c * K + k)] (N, C (K + 1), 1, L), each norm as in
    :func:`pairwise_logits`. Returns (weights (N, Cout, 1, L), mean1, var1, mean2, var2)."""
    n, c = x1.shape[:2]
    h_out, w_out = fp.out_hw(x1.shape[2], x1.shape[3])
    kj = unfold(x2, fp)
    z = torch.cat([centre(x1, fp, h_out, w_out), kj.reshape(n, c * fp.area, 1, h_out * w_out)], dim=1)
    z, mean1, var1 = _batchnorm(z, *norm1)
    y = torch.einsum("oc,nc...->no...", conv1_weight, F.relu(z))  # (F.conv2d mishandles C = 0)
    y, mean2, var2 = _batchnorm(y, *norm2)
    return F.conv2d(F.relu(y), conv2_weight[:, :, None, None], conv2_bias), mean1, var1, mean2, var2


def patchwise_attention(x1, x2, values, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp: Footprint):
    """aggregation(values, patchwise_weights(...) as (N, Cout / K, K, L)): the patchwise layer after its transforms
    (running statistics)."""
    w = patchwise_weights(x1, x2, norm1, conv1_weight, norm2, conv2_weight, conv2_bias, fp)[0]
    h_out, w_out = fp.out_hw(x1.shape[2], x1.shape[3])
    return aggregation(values, w.view(w.shape[0], w.shape[1] // fp.area, fp.area, w.shape[3]), fp, h_out, w_out)


# The ops the layers run in place of their modules (torchsan.ops._fusion): stacking phi, psi and beta into one
# convolution is plain PyTorch and pays on any backend; every other fused op is, here, just its parts.
_FUSES = frozenset({"stacked_conv1x1"})


def fuses(op: str, x: torch.Tensor, **shape: int) -> bool:
    """Whether the layers should run fused ``op`` instead of its modules (see torchsan.ops._fusion)."""
    return op in _FUSES
