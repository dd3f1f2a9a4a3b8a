"""Argument checks and shape arithmetic shared by every backend.

Every public op validates here *before* dispatching, so all backends reject bad input the same
way and with the same message.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_MODES = ("reflect", "zeros")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Footprint:
    """A resolved local footprint: k x k window, stride, symmetric padding, dilation."""

    kernel_size: int
    stride: int
    padding: int
    dilation: int
    pad_mode: str

    @property
    def area(self) -> int:
        """K = kernel_size ** 2, the number of neighbours."""
        return self.kernel_size * self.kernel_size

    def out_size(self, size: int) -> int:
        """Output length along one spatial axis of length ``size``."""
        span = self.dilation * (self.kernel_size - 1) + 1
        return (size + 2 * self.padding - span) // self.stride + 1


def default_padding(kernel_size: int, dilation: int) -> int:
    """The authors' padding: (dilation * (kernel_size - 1) + 1) // 2, which centres odd windows."""
    return (dilation * (kernel_size - 1) + 1) // 2


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def resolve_footprint(
    kernel_size: int,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    pad_mode: str = "reflect",
) -> Footprint:
    """Validate scalar arguments and fill in the default padding."""
    kernel_size = _positive_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be odd so that the footprint has a centre pixel, got {kernel_size}"
        )
    stride = _positive_int("stride", stride)
    dilation = _positive_int("dilation", dilation)
    if padding is None:
        padding = default_padding(kernel_size, dilation)
    padding = _positive_int("padding", padding, minimum=0)
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    return Footprint(kernel_size, stride, padding, dilation, pad_mode)


def check_tensor(name: str, x: object, min_dim: int = 1) -> torch.Tensor:
    """x must be a floating-point tensor with at least ``min_dim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_feature_map(name: str, x: object) -> torch.Tensor:
    """x must be a floating-point (N, C, H, W) tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_fits(fp: Footprint, height: int, width: int, name: str = "x") -> tuple[int, int]:
    """Check that the footprint fits the map; return (H_out, W_out)."""
    if fp.pad_mode == "reflect" and fp.padding >= min(height, width):
        raise ValueError(
            f"reflect padding {fp.padding} (kernel_size={fp.kernel_size}, "
            f"dilation={fp.dilation}) must be smaller than the spatial size of {name} "
            f"({height}x{width}); use a smaller footprint, pad_mode='zeros', or a larger map"
        )
    h_out, w_out = fp.out_size(height), fp.out_size(width)
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"footprint (kernel_size={fp.kernel_size}, dilation={fp.dilation}, "
            f"padding={fp.padding}) does not fit {name} of spatial size {height}x{width}"
        )
    return h_out, w_out


def check_same_kind(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two operands must share dtype and device."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} dtype {b.dtype} does not match {name_a} dtype {a.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}")


def check_append(append: object, x1: torch.Tensor, area: int, positions: int) -> None:
    """subtraction2's ``append`` must be (1 or N, E, K, L), of x1's dtype and device."""
    check_feature_map("append", append)
    check_same_kind("x1", x1, "append", append)
    b, _, taps, length = append.shape
    if b not in (1, x1.shape[0]) or taps != area or length != positions:
        raise ValueError(
            f"append must be (1 or {x1.shape[0]}, E, {area}, {positions}) for this input and footprint, "
            f"got {tuple(append.shape)}"
        )


def check_aggregation(x: torch.Tensor, weight: torch.Tensor, fp: Footprint) -> tuple[int, int]:
    """Validate aggregation operands; return (H_out, W_out)."""
    check_feature_map("x", x)
    check_feature_map("weight", weight)
    check_same_kind("x", x, "weight", weight)
    n, c, h, w = x.shape
    h_out, w_out = check_fits(fp, h, w)
    nw, cw, k, length = weight.shape
    if nw != n:
        raise ValueError(f"weight batch size {nw} does not match x batch size {n}")
    if cw < 1 or c % cw != 0:
        raise ValueError(
            f"x channels ({c}) must be divisible by weight channels ({cw}): "
            "channel c uses weight channel c % Cw"
        )
    if k != fp.area:
        raise ValueError(
            f"weight dim 2 must be kernel_size**2 = {fp.area}, got {k} (weight shape "
            f"{tuple(weight.shape)})"
        )
    if length != h_out * w_out:
        raise ValueError(
            f"weight dim 3 must be H_out*W_out = {h_out}*{w_out} = {h_out * w_out} for x of "
            f"size {h}x{w} with this footprint, got {length}"
        )
    return h_out, w_out


def check_subtraction2(x1: torch.Tensor, x2: torch.Tensor, fp: Footprint) -> tuple[int, int]:
    """Validate subtraction2 operands; return (H_out, W_out)."""
    check_feature_map("x1", x1)
    check_feature_map("x2", x2)
    check_same_kind("x1", x1, "x2", x2)
    if x1.shape != x2.shape:
        raise ValueError(
            f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}"
        )
    return check_fits(fp, x1.shape[2], x1.shape[3], "x1")
