"""The mapping gamma of the paper (eq. 2 and 4), built from a short spec string.

A spec is a '-'-separated sequence of ``R`` (BatchNorm + ReLU) and ``L`` (a linear map, i.e. a
1x1 convolution over the (K, L) grid). The authors' model uses ``"R-L-R-L"``:
BN-ReLU-conv(in -> hidden, no bias)-BN-ReLU-conv(hidden -> out, bias). The paper's mapping
ablation (Table 4) compares ``"L"``, ``"R-L"``, ``"L-R-L"`` and ``"R-L-R-L"``-style stacks.
A linear map directly followed by ``R`` has no bias (the BN absorbs it), as in the authors' code.
:func:`torchsan.layers.fused.run_mapping` applies the result, with its BN-ReLU-conv triples fused where allowed.
"""

from __future__ import annotations

from torch import nn


def parse_mapping(spec: str) -> list[str]:
    """Split and validate a mapping spec; returns its tokens."""
    tokens = [t.strip().upper() for t in spec.split("-")] if isinstance(spec, str) else []
    if not tokens or any(t not in ("R", "L") for t in tokens) or tokens[-1] != "L":
        raise ValueError(
            f"mapping must be a '-'-separated sequence of 'R' and 'L' ending in 'L' "
            f"(e.g. 'R-L-R-L'), got {spec!r}"
        )
    return tokens


def build_mapping(spec: str, in_channels: int, hidden_channels: int, out_channels: int) -> nn.Sequential:
    """gamma as an ``nn.Sequential`` of BN/ReLU/1x1-conv, applied to a (N, in, K, L) grid.

    Every linear map but the last outputs ``hidden_channels``; the last outputs ``out_channels``.
    """
    tokens = parse_mapping(spec)
    n_linear = tokens.count("L")
    modules: list[nn.Module] = []
    channels, seen_linear = in_channels, 0
    for i, token in enumerate(tokens):
        if token == "R":
            modules += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        else:
            seen_linear += 1
            out = out_channels if seen_linear == n_linear else hidden_channels
            bias = not (i + 1 < len(tokens) and tokens[i + 1] == "R")
            modules.append(nn.Conv2d(channels, out, kernel_size=1, bias=bias))
            channels = out
    return nn.Sequential(*modules)
