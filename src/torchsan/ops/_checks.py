"""Argument checks and shape arithmetic shared by every backend.

Every public op validates here *before* dispatching, so all backends reject bad input the same
way and with the same message.
"""

from __future__ import annotations

import functools
import math
import os
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

    @property
    def reflect(self) -> bool:
        return self.pad_mode == "reflect"

    @property
    def extent(self) -> int:
        """dilation * (kernel_size - 1) + 1: the pixels the window spans along each axis."""
        return self.dilation * (self.kernel_size - 1) + 1

    def out_size(self, size: int) -> int:
        """Output length along one spatial axis of length ``size``: the one place this formula lives."""
        return (size + 2 * self.padding - self.extent) // self.stride + 1

    def out_hw(self, height: int, width: int) -> tuple[int, int]:
        """(H_out, W_out) for an (H, W) input."""
        return self.out_size(height), self.out_size(width)

    def kernel_args(self) -> tuple[int, int, int, int, bool]:
        """(kernel_size, stride, padding, dilation, reflect): how the kernels and custom ops take a footprint."""
        return self.kernel_size, self.stride, self.padding, self.dilation, self.reflect

    @classmethod
    def from_kernel_args(cls, kernel_size: int, stride: int, padding: int, dilation: int, reflect: bool) -> Footprint:
        return cls(kernel_size, stride, padding, dilation, "reflect" if reflect else "zeros")


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


def check_fits(fp: Footprint, height: int, width: int, name: str = "x",
               x: torch.Tensor | None = None) -> tuple[int, int]:
    """Check that the footprint fits an (H, W) map; return (H_out, W_out). Every op that takes a footprint calls this.

    With ``x`` (N, C, H, W), also check that an (N, C, K, L) tensor of its dtype fits in its device's memory: the
    op gathers one (or returns one), and zero padding admits any kernel_size, so an absurd one would otherwise
    attempt a terabyte allocation first.
    """
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
    if x is not None and not torch.compiler.is_compiling():  # (eager only: the shapes of a trace are symbolic)
        memory = device_memory(x.device)
        n, c = x.shape[:2]
        need = n * c * fp.area * h_out * w_out * x.element_size()
        if memory is not None and need > memory:
            raise ValueError(
                f"kernel_size={fp.kernel_size} on {name} of shape {tuple(x.shape)} gathers K = {fp.area} taps at each "
                f"of {h_out}x{w_out} positions: an (N, C, K, L) tensor of {_gib(need)}, more than the "
                f"{_gib(memory)} of {x.device.type} memory; use a smaller footprint, batch or map"
            )
    return h_out, w_out


@functools.cache
def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of ``device`` (RAM for the CPU, the GPU's own); None where unknown (meta, other systems)."""
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**40:.1f} TiB" if nbytes >= 2**40 else f"{nbytes / 2**30:.1f} GiB"


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
    h_out, w_out = check_fits(fp, h, w, x=x)
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
    return check_fits(fp, x1.shape[2], x1.shape[3], "x1", x=x1)


def check_channel_vectors(x: torch.Tensor, channels: int, **vectors: torch.Tensor | None) -> None:
    """Per-channel vectors (a BN's scale and shift, or weight and bias) must be (channels,), of x's dtype and device."""
    for name, t in vectors.items():
        if t is None:
            continue
        check_same_kind("x", x, name, t)
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) for x with {channels} channels, "
                             f"got {tuple(t.shape)}")


def check_batchnorm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    shape: tuple[int, ...] | None = None) -> None:
    """A training BN's parameters for input x (or, with ``shape``, an input of that shape and x's kind)."""
    shape = tuple(x.shape) if shape is None else shape
    check_channel_vectors(x, shape[1], weight=weight, bias=bias)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    if math.prod(shape) // max(1, shape[1]) < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")


def check_norm(name: str, x: torch.Tensor, norm: object, shape: tuple[int, ...]) -> tuple:
    """A BN as (weight, bias, eps, running_mean, running_var) for an input of ``shape``; returns it as a tuple.

    weight and bias may be None and need not share x's dtype (autocast runs BN in float32); running_mean and
    running_var are both None (batch statistics) or both (C,) tensors."""
    if not isinstance(norm, (tuple, list)) or len(norm) != 5:
        raise TypeError(f"{name} must be (weight, bias, eps, running_mean, running_var), got {norm!r}")
    weight, bias, eps, mean, var = norm
    channels = shape[1]
    for part, t in (("weight", weight), ("bias", bias), ("running_mean", mean), ("running_var", var)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != (channels,):
            raise ValueError(f"{name}'s {part} must be a floating ({channels},) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name}'s {part} is on {t.device} but x1 is on {x.device}")
    if (mean is None) != (var is None):
        raise ValueError(f"{name}: give both running_mean and running_var, or neither (batch statistics)")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{name}'s eps must be positive, got {eps!r}")
    if mean is None and math.prod(shape) // max(1, channels) < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")
    return weight, bias, float(eps), mean, var


def check_conv1x1(name: str, x: torch.Tensor, c_in: int, weight: torch.Tensor, bias: torch.Tensor | None,
                  weight_name: str = "conv_weight", bias_name: str = "conv_bias") -> None:
    """A 1x1 convolution's (Cout, c_in) weight and (Cout,) bias, of x's dtype and device."""
    check_same_kind(name, x, weight_name, weight)
    if weight.dim() != 2 or weight.shape[1] != c_in:
        raise ValueError(f"{weight_name} must have shape (Cout, {c_in}), got {tuple(weight.shape)}")
    if bias is not None:
        check_same_kind(name, x, bias_name, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def check_residual(residual: object, x: torch.Tensor, shape: tuple[int, ...]) -> None:
    """A residual added to an op's output: a tensor of the output's shape, of x's dtype and device."""
    check_tensor("residual", residual)
    check_same_kind("x", x, "residual", residual)
    if tuple(residual.shape) != tuple(shape):
        raise ValueError(f"residual must have the output's shape {tuple(shape)}, got {tuple(residual.shape)}")


def check_pool2x2(x: torch.Tensor) -> None:
    """A 2x2 max-pool needs at least 2x2 pixels."""
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"a 2x2 max-pool needs at least 2x2 pixels, got x of shape {tuple(x.shape)}")
