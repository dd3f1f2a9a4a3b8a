"""``nn.Module`` layers: the SAN primitives, the two self-attention layers, and the block."""

from .attention import (
    PAIRWISE_RELATIONS,
    PATCHWISE_RELATIONS,
    TRANSFORMS,
    PairwiseSelfAttention,
    PatchwiseSelfAttention,
    position_grid,
)
from .block import ATTENTION_TYPES, SelfAttentionBlock
from .mapping import build_mapping, parse_mapping
from .primitives import Aggregation, Centre, Subtraction, Subtraction2, Unfold

__all__ = [
    "ATTENTION_TYPES",
    "PAIRWISE_RELATIONS",
    "PATCHWISE_RELATIONS",
    "TRANSFORMS",
    "Aggregation",
    "Centre",
    "PairwiseSelfAttention",
    "PatchwiseSelfAttention",
    "SelfAttentionBlock",
    "Subtraction",
    "Subtraction2",
    "Unfold",
    "build_mapping",
    "parse_mapping",
    "position_grid",
]
