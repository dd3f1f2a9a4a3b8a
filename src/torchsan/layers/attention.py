"""Pairwise and patchwise self-attention (Zhao, Jia, Koltun, CVPR 2020, sections 3.1-3.2).

Both compute y_i = sum_{j in R(i)} alpha(.)_j ⊙ beta(x_j) over a local k x k footprint R(i),
with one attention weight channel shared by ``share_planes`` interleaved value channels
(value channel c uses weight channel c % (out_channels / share_planes)).

Names follow the paper: ``phi``/``psi`` (relation transforms, in -> rel), ``beta`` (value
transform, in -> out), ``gamma`` (the mapping), ``pos_proj`` (the position encoding's linear map).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..ops._fusion import has_hooks
from .cache import reuse
from .fused import (
    conv1x1_matmul,
    fuses_patchwise_concat_attention,
    fuses_subtraction2_attention,
    is_conv1x1,
    patchwise_concat_attention,
    patchwise_concat_mapping,
    run_mapping,
    softmax_aggregation,
    subtraction2_attention,
    subtraction2_mapping,
)
from .mapping import build_mapping
from .primitives import Aggregation, Centre, Subtraction, Subtraction2, Unfold

PAIRWISE_RELATIONS = ("summation", "subtraction", "concatenation", "hadamard", "dot")
PATCHWISE_RELATIONS = ("star", "clique", "concatenation")
TRANSFORMS = ("separate", "shared_phi_psi", "shared_all")


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Restore BN running statistics on exit, so a recomputation does not update them a second time."""
    saved = [(b, b.detach().clone()) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def position_grid(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Normalised coordinates, (1, 2, H, W): channel 0 = linspace(-1, 1, W) along columns,
    channel 1 = linspace(-1, 1, H) along rows (the authors' ``position``)."""
    kw = dict(device=like.device, dtype=like.dtype)
    loc_w = torch.linspace(-1.0, 1.0, width, **kw).view(1, width).expand(height, width)
    loc_h = torch.linspace(-1.0, 1.0, height, **kw).view(height, 1).expand(height, width)
    return torch.stack([loc_w, loc_h]).unsqueeze(0)


class _SelfAttention(nn.Module):
    """Shared construction: transforms phi/psi/beta, footprint ops, argument checks."""

    def __init__(
        self,
        in_channels: int,
        rel_channels: int,
        out_channels: int,
        share_planes: int,
        kernel_size: int,
        stride: int,
        dilation: int,
        pad_mode: str,
        transform: str,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        self.memory_efficient = memory_efficient
        for name, value in (("in_channels", in_channels), ("rel_channels", rel_channels),
                            ("out_channels", out_channels), ("share_planes", share_planes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if out_channels % share_planes != 0:
            raise ValueError(
                f"out_channels ({out_channels}) must be divisible by share_planes ({share_planes})"
            )
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        if transform == "shared_all" and rel_channels != out_channels:
            raise ValueError(
                "transform='shared_all' (phi = psi = beta) needs rel_channels == out_channels "
                f"(r1 == r2), got {rel_channels} and {out_channels}"
            )
        self.in_channels, self.rel_channels, self.out_channels = in_channels, rel_channels, out_channels
        self.share_planes, self.weight_channels = share_planes, out_channels // share_planes
        self.transform = transform
        footprint = dict(kernel_size=kernel_size, stride=stride, dilation=dilation, pad_mode=pad_mode)
        self.aggregation = Aggregation(**footprint)
        self.kernel_size, self.stride = self.aggregation.kernel_size, self.aggregation.stride
        self.footprint_kwargs = footprint

        # phi = psi = beta shares one map; phi = psi shares the relation map.
        self.phi = nn.Conv2d(in_channels, rel_channels, kernel_size=1)
        self.psi = nn.Conv2d(in_channels, rel_channels, kernel_size=1) if transform == "separate" else None
        self.beta = nn.Conv2d(in_channels, out_channels, kernel_size=1) if transform != "shared_all" else None

    def stacks_transforms(self, x: torch.Tensor) -> bool:
        """Whether phi, psi and beta run on x as one 1x1 convolution with stacked weights (not with shared
        transforms, other modules, or where ``ops.should_fuse`` says no)."""
        convs = (self.phi, self.psi, self.beta)
        if self.psi is None or self.beta is None or not all(is_conv1x1(c) for c in convs):
            return False
        if len({c.bias is None for c in convs}) > 1:
            return False
        return ops.should_fuse("stacked_conv1x1", x, *convs)

    def stacked_transform(self) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """phi, psi and beta as one 1x1 convolution: (weight (out, in, 1, 1), bias, split sizes). Kept between calls
        where no gradient is wanted (see :func:`torchsan.layers.cache.reuse`)."""
        convs = (self.phi, self.psi, self.beta)

        def stack() -> tuple[torch.Tensor, torch.Tensor | None]:
            bias = torch.cat([c.bias for c in convs]) if self.phi.bias is not None else None
            return torch.cat([c.weight for c in convs]), bias

        sources = [t for c in convs for t in (c.weight, c.bias)]
        return *reuse(self, "stacked_transform", sources, stack), [c.out_channels for c in convs]

    def _transforms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """phi(x), psi(x), beta(x)."""
        if self.stacks_transforms(x):
            # x is read once forward and once backward, and grad x comes out of one GEMM instead of three.
            weight, bias, splits = self.stacked_transform()
            if ops.should_fuse("conv1x1_matmul", x, in_channels=weight.shape[1], out_channels=weight.shape[0]):
                qkv = conv1x1_matmul(x, weight, bias)
            else:
                qkv = F.conv2d(x, weight, bias)
            q, k, v = qkv.split(splits, dim=1)
            return q, k, v
        q = self.phi(x)
        k = self.psi(x) if self.psi is not None else q
        v = self.beta(x) if self.beta is not None else q
        return q, k, v

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )

    @contextlib.contextmanager
    def _recompute_context(self, backend: str, fused: bool) -> Iterator[None]:
        with ops.use_backend(backend), ops.fusion(fused), _frozen_batchnorm_stats(self.gamma):
            yield

    def _weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """What :meth:`_aggregate` takes, (N, out / share_planes, K, L), from phi(x), psi(x): (N, rel, H, W):
        the attention weights, or (pairwise) their logits before the softmax over K."""
        raise NotImplementedError

    def _aggregate(self, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_j w_j * v_j over the footprint: (N, out, H, W), (N, out / share_planes, K, L) -> (N, out, Ho, Wo)."""
        return self.aggregation(v, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in, H, W) -> (N, out, H_out, W_out)."""
        self._check_input(x)
        return self.attend(*self._transforms(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The layer after its transforms: phi(x), psi(x) (N, rel, H, W) and beta(x) (N, out, H, W) ->
        (N, out, H_out, W_out). (The block calls it directly when it fuses its BN-ReLU into the transforms.)"""
        if self.memory_efficient and torch.is_grad_enabled():
            # Keep only q, k and the weights for backward; recompute the relation and gamma's activations over the
            # (K, L) grid (the largest activation memory of a SAN) during the backward pass, with the same
            # ops backend and fusion setting as this forward and without updating BN statistics a second time.
            backend, fused = ops.get_backend(), ops.fusion_enabled()
            w = checkpoint(self._weights, q, k, use_reentrant=False,
                           context_fn=lambda: (contextlib.nullcontext(), self._recompute_context(backend, fused)))
        else:
            w = self._weights(q, k)
        return self._aggregate(v, w)


class PairwiseSelfAttention(_SelfAttention):
    """Pairwise self-attention, eq. (1)-(2): alpha(x_i, x_j) = gamma(delta(x_i, x_j)).

    Shapes: x (N, in, H, W) -> y (N, out, H_out, W_out). Internally z = [delta, p_i - p_j] is
    (N, D, K, L) and the weights w = softmax_K(gamma(z)) are (N, out / share_planes, K, L).

    Args:
        relation: delta, the paper's eq. (2) options: ``"summation"`` phi(x_i) + psi(x_j),
            ``"subtraction"`` phi(x_i) - psi(x_j) (the authors' model), ``"concatenation"``
            [phi(x_i), psi(x_j)], ``"hadamard"`` phi(x_i) ⊙ psi(x_j), ``"dot"`` phi(x_i)^T psi(x_j).
        position_encoding: concatenate p_i - p_j, the difference of linearly mapped normalised
            coordinates (section 3.1, "Position encoding"), to delta.
        mapping: gamma as an R/L spec (see :mod:`torchsan.layers.mapping`), hidden width rel.
        transform: ``"separate"`` (phi, psi, beta distinct), ``"shared_phi_psi"`` (phi = psi),
            ``"shared_all"`` (phi = psi = beta; needs rel_channels == out_channels), Table 5.
        memory_efficient: in training, recompute the relation and gamma over the (K, L) grid in the
            backward pass instead of storing their activations (same function, less memory, ~20% more
            time); BN running statistics are updated once.
        rel_channels / out_channels: C / r1 and C / r2 of the paper.
    """

    def __init__(
        self,
        in_channels: int,
        rel_channels: int,
        out_channels: int,
        share_planes: int = 8,
        kernel_size: int = 7,
        stride: int = 1,
        dilation: int = 1,
        relation: str = "subtraction",
        position_encoding: bool = True,
        mapping: str = "R-L-R-L",
        transform: str = "separate",
        pad_mode: str = "reflect",
        memory_efficient: bool = False,
    ) -> None:
        super().__init__(in_channels, rel_channels, out_channels, share_planes, kernel_size,
                         stride, dilation, pad_mode, transform, memory_efficient)
        if relation not in PAIRWISE_RELATIONS:
            raise ValueError(f"relation must be one of {PAIRWISE_RELATIONS}, got {relation!r}")
        self.relation, self.position_encoding = relation, position_encoding
        if relation == "subtraction":
            self.subtraction2 = Subtraction2(**self.footprint_kwargs)
        else:
            self.centre, self.unfold = Centre(**self.footprint_kwargs), Unfold(**self.footprint_kwargs)
        rel_out = {"concatenation": 2 * rel_channels, "dot": 1}.get(relation, rel_channels)
        if position_encoding:
            self.pos_proj = nn.Conv2d(2, 2, kernel_size=1)
            self.subtraction = Subtraction(**self.footprint_kwargs)
        self.gamma = build_mapping(mapping, rel_out + 2 * position_encoding, rel_channels,
                                   self.weight_channels)
        self.softmax = nn.Softmax(dim=2)

    def _relation(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """delta(x_i, x_j) for every pair: (N, rel, H, W) x 2 -> (N, D, K, L)."""
        if self.relation == "subtraction":
            return self.subtraction2(q, k)
        qi, kj = self.centre(q), self.unfold(k)
        if self.relation == "summation":
            return qi + kj
        if self.relation == "hadamard":
            return qi * kj
        if self.relation == "dot":
            return (qi * kj).sum(dim=1, keepdim=True)
        return torch.cat([qi.expand_as(kj), kj], dim=1)  # concatenation

    def _position_difference(self, like: torch.Tensor) -> torch.Tensor:
        """p_i - p_j over the footprint, p the linearly mapped normalised coordinates: (1, 2, K, L). It depends on the
        map's size and pos_proj alone, so it is kept between calls where no gradient is wanted (unless a hook, a
        MAC counter say, must see the modules run)."""
        height, width = like.shape[2], like.shape[3]

        def build() -> torch.Tensor:
            return self.subtraction(self.pos_proj(position_grid(height, width, like)))

        if has_hooks(self.pos_proj, self.subtraction):
            return build()
        return reuse(self, "position_difference", [self.pos_proj.weight, self.pos_proj.bias], build,
                     extra=(height, width, like.dtype, like.device))

    def _weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """gamma(delta(x_i, x_j)) for every j in R(i), eq. (2), with p_i - p_j appended to delta when position
        encoding is on: the attention logits, (N, out / share_planes, K, L)."""
        p = self._position_difference(q) if self.position_encoding else None
        if self.relation == "subtraction":  # z gathered straight into gamma where fused (never written)
            return subtraction2_mapping(self.subtraction2, self.gamma, q, k, p)
        delta = self._relation(q, k)
        z = delta if p is None else torch.cat([delta, p.expand(q.shape[0], -1, -1, -1)], dim=1)
        return run_mapping(self.gamma, z)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # In inference the subtraction relation, gamma, the softmax and the aggregation run as one op where allowed:
        # the logits are never written.
        if (self.relation == "subtraction" and not (self.memory_efficient and torch.is_grad_enabled())
                and fuses_subtraction2_attention(self.subtraction2, self.gamma, self.softmax, self.aggregation, q)):
            p = self._position_difference(q) if self.position_encoding else None
            return subtraction2_attention(self.subtraction2, self.gamma, q, k, v, p)
        return super().attend(q, k, v)

    def _aggregate(self, v: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """y_i = sum_j softmax_j(logits) ⊙ beta(x_j), eq. (1), the softmax over the K footprint taps."""
        return softmax_aggregation(self.softmax, self.aggregation, v, logits)


class PatchwiseSelfAttention(_SelfAttention):
    """Patchwise self-attention, eq. (3)-(4): alpha(x_R(i)) = gamma(delta(x_R(i))).

    The weights for all K positions of a footprint come from the whole patch at once.
    Shapes: x (N, in, H, W) -> y (N, out, H_out, W_out); delta is (N, D, 1, L), gamma maps it to
    (N, K * out / share_planes, 1, L), read as weights (N, out / share_planes, K, L)
    (output channel g*K + k is weight channel g, neighbour k).

    Args:
        relation: ``"star"`` [phi(x_i)^T psi(x_j)]_j (D = K), ``"clique"``
            [phi(x_j)^T psi(x_k)]_{j,k} (D = K*K), ``"concatenation"`` [phi(x_i), psi(x_j)]_j
            (D = rel * (K + 1), ordered phi then psi channel-major c*K + k; the authors' model).
        mapping: gamma as an R/L spec, hidden width out / share_planes.
        transform, memory_efficient: as for :class:`PairwiseSelfAttention`.
    """

    def __init__(
        self,
        in_channels: int,
        rel_channels: int,
        out_channels: int,
        share_planes: int = 8,
        kernel_size: int = 7,
        stride: int = 1,
        dilation: int = 1,
        relation: str = "concatenation",
        mapping: str = "R-L-R-L",
        transform: str = "separate",
        pad_mode: str = "reflect",
        memory_efficient: bool = False,
    ) -> None:
        super().__init__(in_channels, rel_channels, out_channels, share_planes, kernel_size,
                         stride, dilation, pad_mode, transform, memory_efficient)
        if relation not in PATCHWISE_RELATIONS:
            raise ValueError(f"relation must be one of {PATCHWISE_RELATIONS}, got {relation!r}")
        self.relation = relation
        self.centre, self.unfold = Centre(**self.footprint_kwargs), Unfold(**self.footprint_kwargs)
        area = self.aggregation.kernel_size**2
        rel_out = {"star": area, "clique": area * area}.get(relation, rel_channels * (area + 1))
        self.gamma = build_mapping(mapping, rel_out, self.weight_channels, area * self.weight_channels)

    def _relation(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """delta(x_R(i)) for the star and clique relations: (N, rel, H, W) x 2 -> (N, D, 1, L). (Concatenation is
        gathered into gamma: :func:`torchsan.layers.fused.patchwise_concat_mapping`.)"""
        # Every reshape here spells out its sizes: with N = 0 a -1 is ambiguous and torch refuses it.
        kj = self.unfold(k)  # (N, rel, K, L)
        n, area, positions = kj.shape[0], kj.shape[2], kj.shape[3]
        if self.relation == "star":
            return (self.centre(q) * kj).sum(dim=1).unsqueeze(2)
        clique = ops.clique_products(self.unfold(q), kj)  # (N, K, K, L)
        return clique.view(n, area * area, 1, positions)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # In inference the concatenation relation, gamma and the aggregation run as one op where allowed: the
        # weights are never written.
        if (self.relation == "concatenation" and not (self.memory_efficient and torch.is_grad_enabled())
                and fuses_patchwise_concat_attention(self.centre, self.unfold, self.gamma, self.aggregation, q)):
            return patchwise_concat_attention(self.unfold, self.gamma, q, k, v)
        return super().attend(q, k, v)

    def _weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """gamma(delta(x_R(i))), eq. (4): (N, K * out / share_planes, 1, L) read as (N, out / share_planes, K, L)."""
        if self.relation == "concatenation":  # delta gathered straight into gamma where fused (never written)
            w = patchwise_concat_mapping(self.centre, self.unfold, self.gamma, q, k)
        else:
            w = run_mapping(self.gamma, self._relation(q, k))
        return w.view(q.shape[0], self.weight_channels, self.kernel_size**2, w.shape[-1])  # no -1: N may be 0
