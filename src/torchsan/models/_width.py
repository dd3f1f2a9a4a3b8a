"""One width option for both families: channel counts scaled by a factor, rounded to what the layers need."""

from __future__ import annotations

__all__ = ["scale_channels"]


def scale_channels(channels: int, width: float, multiple: int) -> int:
    """``channels * width`` rounded to the nearest multiple of ``multiple`` (at least one multiple).

    Parameters grow with the square of the width, in SAN and ResNet alike, so the two families keep their
    parameter ratio at any width (up to this rounding).
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(multiple, multiple * round(channels * width / multiple))
