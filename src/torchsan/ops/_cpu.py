"""The ``cpu`` backend: fused C++/OpenMP kernels registered as PyTorch custom ops.

The C++ source (``torchsan/csrc/san_cpu.cpp``) is compiled on first use with
``torch.utils.cpp_extension.load`` and cached in torch's extensions folder (about a minute, once per
machine and torch version). If that fails (no compiler, no ninja), :func:`available` returns False and
the dispatcher falls back to the reference ops with a warning. Set ``TORCHSAN_DISABLE_CPU_KERNELS=1``
to skip the build.

The ops live in the ``torchsan`` namespace (``torch.ops.torchsan.aggregation`` ...), with fake
(meta) implementations for shape inference and ``torch.compile``, and autograd formulas whose
backward passes are fused kernels too. The backward ops are differentiable as well (they are linear in
the incoming gradient and bilinear overall, so their derivatives are again these ops): double backward
works, as ``gradgradcheck`` verifies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ._checks import Footprint
from .reference import batchnorm_scale_shift

DTYPES = (torch.float32, torch.float64)
_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "san_cpu.cpp"
_lock = threading.Lock()
_ext: ModuleType | None = None
_error: str | None = None


def _cpu_tag() -> str:
    """Distinguishes builds for different CPUs (we compile with -march=native), torch versions and sources."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line
    except OSError:
        flags = platform.processor()
    # The source's path too: two checkouts on one machine must not rebuild each other's extension.
    digest = hashlib.sha1((flags + torch.__version__ + str(_SOURCE) + _SOURCE.read_text()).encode()).hexdigest()
    return digest[:12]


def _load() -> ModuleType:
    # torch logs a warning about CUDA_HOME on machines without CUDA (at import): irrelevant for a CPU build.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return _build()
    finally:
        log.setLevel(level)


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    name = f"torchsan_cpu_{_cpu_tag()}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not any(build_dir.glob(f"{name}*.so")):
        print("torchsan: compiling the fused CPU kernels (first use only, about a minute)...", file=sys.stderr)
    return cpp_extension.load(
        name=name,
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def extension() -> ModuleType | None:
    """The compiled extension, building it on first call; None if it cannot be built."""
    global _ext, _error
    if _ext is not None or _error is not None:
        return _ext
    with _lock:
        if _ext is None and _error is None:
            if os.environ.get("TORCHSAN_DISABLE_CPU_KERNELS", "") not in ("", "0"):
                _error = "disabled by TORCHSAN_DISABLE_CPU_KERNELS"
            else:
                try:
                    _ext = _load()
                except Exception as err:  # no compiler, no ninja, a build error: fall back, never crash
                    _error = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                    warnings.warn(
                        f"torchsan: the fused CPU kernels could not be built ({_error}); "
                        "falling back to the reference ops (correct but slow and memory-hungry)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return _ext


def _kernels() -> ModuleType:
    """The extension, or a clear error if it could not be built (for direct torch.ops.torchsan calls)."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"torchsan's fused CPU kernels are unavailable: {_error}")
    return ext


@torch.compiler.assume_constant_result  # torch.compile calls it eagerly and folds the answer into the graph
def available() -> bool:
    """Whether the fused CPU kernels are usable (builds them on first call)."""
    return extension() is not None


def unavailable_reason() -> str | None:
    return _error


def _out_hw(h, w, k: int, s: int, p: int, d: int):
    span = d * (k - 1) + 1
    return (h + 2 * p - span) // s + 1, (w + 2 * p - span) // s + 1


# --- custom ops --------------------------------------------------------------------------------
@torch.library.custom_op("torchsan::aggregation", mutates_args=(), device_types="cpu")
def aggregation_op(x: Tensor, weight: Tensor, kernel_size: int, stride: int, padding: int, dilation: int,
                   reflect: bool) -> Tensor:
    """(N, C, H, W), (N, Cw, K, L) -> (N, C, H_out, W_out)."""
    return _kernels().aggregation_forward(x, weight, kernel_size, stride, padding, dilation, reflect, False)[0]


@aggregation_op.register_fake
def _(x, weight, kernel_size, stride, padding, dilation, reflect):
    ho, wo = _out_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    return x.new_empty((x.shape[0], x.shape[1], ho, wo))


@torch.library.custom_op("torchsan::aggregation_backward", mutates_args=(), device_types="cpu")
def aggregation_backward_op(grad: Tensor, x: Tensor, weight: Tensor, kernel_size: int, stride: int, padding: int,
                            dilation: int, reflect: bool) -> tuple[Tensor, Tensor]:
    """Gradients of the aggregation w.r.t. x and weight, in one pass."""
    gx, gw = _kernels().aggregation_backward(grad, x, weight, kernel_size, stride, padding, dilation, reflect,
                                              True, True, False)
    return gx, gw


@aggregation_backward_op.register_fake
def _(grad, x, weight, kernel_size, stride, padding, dilation, reflect):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        weight, memory_format=torch.contiguous_format)


def _aggregation_setup(ctx, inputs, output):
    x, weight, *args = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = args


def _aggregation_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    gx, gw = aggregation_backward_op(grad, x, weight, *ctx.args)
    return gx, gw, None, None, None, None, None


aggregation_op.register_autograd(_aggregation_grad, setup_context=_aggregation_setup)


def _aggregation_backward_setup(ctx, inputs, output):
    grad, x, weight, *args = inputs
    ctx.save_for_backward(grad, x, weight)
    ctx.args = args


def _aggregation_backward_grad(ctx, ggx, ggw):
    # <ggx, gx> + <ggw, gw> is the derivative of <grad, agg(x, w)> along (ggx, ggw), so:
    #   d/dgrad = agg(ggx, w) + agg(x, ggw);  d/dx = gx of agg(., ggw);  d/dw = gw of agg(ggx, .).
    grad, x, weight = ctx.saved_tensors
    d_grad = d_x = d_w = None
    if ggx is not None:
        d_grad = aggregation_op(ggx, weight, *ctx.args)
        d_w = aggregation_backward_op(grad, ggx, weight, *ctx.args)[1]
    if ggw is not None:
        extra = aggregation_op(x, ggw, *ctx.args)
        d_grad = extra if d_grad is None else d_grad + extra
        d_x = aggregation_backward_op(grad, x, ggw, *ctx.args)[0]
    return d_grad, d_x, d_w, None, None, None, None, None


aggregation_backward_op.register_autograd(_aggregation_backward_grad, setup_context=_aggregation_backward_setup)


# The pairwise attention's softmax over K and the aggregation as one op: each (n, weight channel) task normalises its
# (K, L) plane of logits and aggregates with it while it is in cache (forward), and turns its plane of the weight
# gradient into the logits' gradient in place (backward). The softmax output is returned too (for the backward).
@torch.library.custom_op("torchsan::softmax_aggregation", mutates_args=(), device_types="cpu")
def softmax_aggregation_op(x: Tensor, logits: Tensor, kernel_size: int, stride: int, padding: int, dilation: int,
                           reflect: bool) -> tuple[Tensor, Tensor]:
    """(N, C, H, W), (N, Cw, K, L) -> (aggregation(x, softmax(logits, 2)), softmax(logits, 2))."""
    y, w = _kernels().aggregation_forward(x, logits, kernel_size, stride, padding, dilation, reflect, True)
    return y, w


@softmax_aggregation_op.register_fake
def _(x, logits, kernel_size, stride, padding, dilation, reflect):
    ho, wo = _out_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    w = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return x.new_empty((x.shape[0], x.shape[1], ho, wo)), w


@torch.library.custom_op("torchsan::softmax_aggregation_backward", mutates_args=(), device_types="cpu")
def softmax_aggregation_backward_op(grad: Tensor, x: Tensor, weight: Tensor, kernel_size: int, stride: int,
                                    padding: int, dilation: int, reflect: bool) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. x and the logits, given weight = softmax(logits, 2)."""
    gx, gl = _kernels().aggregation_backward(grad, x, weight, kernel_size, stride, padding, dilation, reflect,
                                              True, True, True)
    return gx, gl


softmax_aggregation_backward_op.register_fake(
    lambda grad, x, weight, *a: (torch.empty_like(x, memory_format=torch.contiguous_format),
                                 torch.empty_like(weight, memory_format=torch.contiguous_format)))


def _softmax_aggregation_setup(ctx, inputs, output):
    x, _, *args = inputs
    # The softmax output is saved as an output of this node, so that a double backward reaches the logits through it.
    ctx.save_for_backward(x, output[1])
    ctx.args = args
    ctx.set_materialize_grads(False)  # the returned softmax is usually unused: no zero gradient to allocate and add


def _softmax_aggregation_grad(ctx, grad, grad_weight):
    x, weight = ctx.saved_tensors
    if grad is None:
        grad = x.new_zeros((x.shape[0], x.shape[1], *_out_hw(x.shape[2], x.shape[3], *ctx.args[:4])))
    gx, gl = softmax_aggregation_backward_op(grad, x, weight, *ctx.args)
    if grad_weight is not None:  # the returned softmax was used too
        gl = gl + tap_softmax_backward_op(grad_weight, weight)
    return gx, gl, None, None, None, None, None


softmax_aggregation_op.register_autograd(_softmax_aggregation_grad, setup_context=_softmax_aggregation_setup)


def _softmax_aggregation_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.args = inputs[3:]


def _softmax_aggregation_backward_grad(ctx, ggx, ggl):
    # create_graph=True: differentiate the same backward written with the unfused ops, which have double backwards.
    inputs = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
    with torch.enable_grad():
        grad, x, weight = inputs
        gx, gw = aggregation_backward_op(grad, x, weight, *ctx.args)
        gl = tap_softmax_backward_op(gw, weight)
        outs = [(o, g) for o, g in ((gx, ggx), (gl, ggl)) if g is not None]
        grads = torch.autograd.grad([o for o, _ in outs], inputs, [g for _, g in outs], allow_unused=True)
    return (*grads, None, None, None, None, None)


softmax_aggregation_backward_op.register_autograd(_softmax_aggregation_backward_grad,
                                                  setup_context=_softmax_aggregation_backward_setup)


@torch.library.custom_op("torchsan::subtraction2", mutates_args=(), device_types="cpu")
def subtraction2_op(x1: Tensor, x2: Tensor, kernel_size: int, stride: int, padding: int, dilation: int,
                    reflect: bool) -> Tensor:
    """(N, C, H, W) x 2 -> (N, C, K, L): x1 at the centre minus x2 at each neighbour."""
    return _kernels().gather_forward(x1, x2, kernel_size, stride, padding, dilation, reflect, None)


@torch.library.custom_op("torchsan::unfold", mutates_args=(), device_types="cpu")
def unfold_op(x: Tensor, kernel_size: int, stride: int, padding: int, dilation: int, reflect: bool) -> Tensor:
    """(N, C, H, W) -> (N, C, K, L): the neighbours."""
    return _kernels().gather_forward(None, x, kernel_size, stride, padding, dilation, reflect, None)


def _gather_fake(x, kernel_size, stride, padding, dilation):
    ho, wo = _out_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    return x.new_empty((x.shape[0], x.shape[1], kernel_size * kernel_size, ho * wo))


subtraction2_op.register_fake(lambda x1, x2, k, s, p, d, r: _gather_fake(x2, k, s, p, d))
unfold_op.register_fake(lambda x, k, s, p, d, r: _gather_fake(x, k, s, p, d))


@torch.library.custom_op("torchsan::subtraction2_backward", mutates_args=(), device_types="cpu")
def subtraction2_backward_op(grad: Tensor, height: int, width: int, kernel_size: int, stride: int, padding: int,
                             dilation: int, reflect: bool) -> tuple[Tensor, Tensor]:
    g1, g2 = _kernels().gather_backward(grad, height, width, kernel_size, stride, padding, dilation, reflect,
                                         True, True, True, grad.shape[1])
    return g1, g2


@torch.library.custom_op("torchsan::unfold_backward", mutates_args=(), device_types="cpu")
def unfold_backward_op(grad: Tensor, height: int, width: int, kernel_size: int, stride: int, padding: int,
                       dilation: int, reflect: bool) -> Tensor:
    return _kernels().gather_backward(grad, height, width, kernel_size, stride, padding, dilation, reflect,
                                       False, False, True, grad.shape[1])[1]


def _input_fake(grad, height, width):
    return grad.new_empty((grad.shape[0], grad.shape[1], height, width))


subtraction2_backward_op.register_fake(lambda g, h, w, *a: (_input_fake(g, h, w), _input_fake(g, h, w)))
unfold_backward_op.register_fake(lambda g, h, w, *a: _input_fake(g, h, w))


def _gather_setup(ctx, inputs, output):
    x = inputs[0]
    ctx.hw = (x.shape[2], x.shape[3])
    ctx.args = inputs[-5:]


def _subtraction2_grad(ctx, grad):
    g1, g2 = subtraction2_backward_op(grad, *ctx.hw, *ctx.args)
    return g1, g2, None, None, None, None, None


def _unfold_grad(ctx, grad):
    return unfold_backward_op(grad, *ctx.hw, *ctx.args), None, None, None, None, None


subtraction2_op.register_autograd(_subtraction2_grad, setup_context=_gather_setup)
unfold_op.register_autograd(_unfold_grad, setup_context=_gather_setup)


# The gather backwards are linear in the gradient: their adjoints are the forward gathers.
def _gather_backward_setup(ctx, inputs, output):
    ctx.args = inputs[3:]


def _subtraction2_backward_grad(ctx, gg1, gg2):
    gg1 = torch.zeros_like(gg2) if gg1 is None else gg1
    gg2 = torch.zeros_like(gg1) if gg2 is None else gg2
    return subtraction2_op(gg1, gg2, *ctx.args), None, None, None, None, None, None, None


def _unfold_backward_grad(ctx, gg):
    return unfold_op(gg, *ctx.args), None, None, None, None, None, None, None


subtraction2_backward_op.register_autograd(_subtraction2_backward_grad, setup_context=_gather_backward_setup)
unfold_backward_op.register_autograd(_unfold_backward_grad, setup_context=_gather_backward_setup)


# subtraction2 with extra channels (the pairwise position encoding) concatenated after its output, written in one
# pass: torch.cat would write the (N, C, K, L) difference a second time, and its backward would copy the gradient's
# slice back out before the gather's backward could read it.
@torch.library.custom_op("torchsan::subtraction2_append", mutates_args=(), device_types="cpu")
def subtraction2_append_op(x1: Tensor, x2: Tensor, append: Tensor, kernel_size: int, stride: int, padding: int,
                           dilation: int, reflect: bool) -> Tensor:
    """(N, C, H, W) x 2, (B, E, K, L) with B = 1 or N -> (N, C + E, K, L): cat([subtraction2(x1, x2), append])."""
    return _kernels().gather_forward(x1, x2, kernel_size, stride, padding, dilation, reflect, append)


@subtraction2_append_op.register_fake
def _(x1, x2, append, kernel_size, stride, padding, dilation, reflect):
    out = _gather_fake(x2, kernel_size, stride, padding, dilation)
    return out.new_empty((out.shape[0], out.shape[1] + append.shape[1], *out.shape[2:]))


@torch.library.custom_op("torchsan::subtraction2_append_backward", mutates_args=(), device_types="cpu")
def subtraction2_append_backward_op(grad: Tensor, channels: int, height: int, width: int, kernel_size: int,
                                    stride: int, padding: int, dilation: int, reflect: bool) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. x1 and x2 from the first ``channels`` channels of grad (N, C + E, K, L)."""
    g1, g2 = _kernels().gather_backward(grad, height, width, kernel_size, stride, padding, dilation, reflect,
                                         True, True, True, channels)
    return g1, g2


subtraction2_append_backward_op.register_fake(
    lambda g, c, h, w, *a: (g.new_empty((g.shape[0], c, h, w)), g.new_empty((g.shape[0], c, h, w))))


def _sub2_append_setup(ctx, inputs, output):
    x1, _, append, *args = inputs
    ctx.hw, ctx.channels, ctx.args = (x1.shape[2], x1.shape[3]), x1.shape[1], args
    ctx.broadcast = append.shape[0] == 1 and x1.shape[0] != 1


def _sub2_append_grad(ctx, grad):
    g1, g2 = subtraction2_append_backward_op(grad, ctx.channels, *ctx.hw, *ctx.args)
    g_append = grad[:, ctx.channels:]
    g_append = g_append.sum(0, keepdim=True) if ctx.broadcast else g_append
    return g1, g2, g_append, None, None, None, None, None


subtraction2_append_op.register_autograd(_sub2_append_grad, setup_context=_sub2_append_setup)


def _sub2_append_backward_setup(ctx, inputs, output):
    grad, channels, *_ = inputs
    ctx.args, ctx.extra = inputs[4:], grad.shape[1] - channels


def _sub2_append_backward_grad(ctx, gg1, gg2):
    # Linear in grad: its adjoint is the forward gather on the first channels; the appended channels get none.
    gg1 = torch.zeros_like(gg2) if gg1 is None else gg1
    gg2 = torch.zeros_like(gg1) if gg2 is None else gg2
    d = subtraction2_op(gg1, gg2, *ctx.args)
    d = torch.cat([d, d.new_zeros((d.shape[0], ctx.extra, *d.shape[2:]))], 1)
    return d, None, None, None, None, None, None, None, None


subtraction2_append_backward_op.register_autograd(_sub2_append_backward_grad, setup_context=_sub2_append_backward_setup)


# --- the gathers' eager fast path ---------------------------------------------------------------------------------
# A call through a Python custom op with registered autograd costs 250-400 us here, against 16-111 us of kernel work
# for the position grid's subtraction and about 10% of unfold's time on 7 px maps (benchmarks/call_overhead.py). In
# plain eager mode the gathers therefore call the compiled kernels from a torch.autograd.Function instead; anything
# that traces or transforms (torch.compile, export, a dispatch mode, vmap, tensor subclasses) gets the custom ops,
# and so does double backward (the Function's backward dispatches the differentiable backward op when grad mode is
# on). Both paths run the same kernels: the tests check they agree bit for bit.
def _eager(*tensors: Tensor) -> bool:
    """Whether a call on these tensors may skip the dispatcher (see above)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.utils._python_dispatch._get_current_dispatch_mode() is not None):
        return False
    return all(type(t) is Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


class _GatherFunction(torch.autograd.Function):
    """subtraction2 (x1 given; subtraction is x1 = x2) or unfold (x1 None) on the compiled kernels; see _eager."""

    @staticmethod
    def forward(ctx, x1: Tensor | None, x2: Tensor, k: int, s: int, p: int, d: int, reflect: bool) -> Tensor:
        ctx.subtraction = x1 is not None
        ctx.hw = (x2.shape[2], x2.shape[3])
        ctx.args = (k, s, p, d, reflect)
        return _kernels().gather_forward(x1, x2, k, s, p, d, reflect, None)

    @staticmethod
    def backward(ctx, grad: Tensor):
        need1, need2 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph: through the differentiable custom ops
            if ctx.subtraction:
                g1, g2 = subtraction2_backward_op(grad, *ctx.hw, *ctx.args)
            else:
                g1, g2 = None, unfold_backward_op(grad, *ctx.hw, *ctx.args)
        else:
            g1, g2 = _kernels().gather_backward(grad, *ctx.hw, *ctx.args, ctx.subtraction, need1, need2, grad.shape[1])
        return (g1 if need1 else None), (g2 if need2 else None), None, None, None, None, None


# --- backend interface (see _dispatch.py) ------------------------------------------------------
def _fp_args(fp: Footprint) -> tuple[int, int, int, int, bool]:
    return fp.kernel_size, fp.stride, fp.padding, fp.dilation, fp.pad_mode == "reflect"


def aggregation(x: Tensor, weight: Tensor, fp: Footprint, h_out: int, w_out: int) -> Tensor:
    return aggregation_op(x, weight, *_fp_args(fp))


def softmax_aggregation(x: Tensor, logits: Tensor, fp: Footprint, h_out: int, w_out: int) -> Tensor:
    return softmax_aggregation_op(x, logits, *_fp_args(fp))[0]


def subtraction2(x1: Tensor, x2: Tensor, fp: Footprint, h_out: int, w_out: int, append: Tensor | None = None) -> Tensor:
    if append is not None:
        return subtraction2_append_op(x1, x2, append, *_fp_args(fp))
    if _eager(x1, x2):
        return _GatherFunction.apply(x1, x2, *_fp_args(fp))
    return subtraction2_op(x1, x2, *_fp_args(fp))


def subtraction(x: Tensor, fp: Footprint, h_out: int, w_out: int) -> Tensor:
    if _eager(x):
        return _GatherFunction.apply(x, x, *_fp_args(fp))  # autograd adds the two inputs' gradients
    return subtraction2_op(x, x, *_fp_args(fp))


def unfold(x: Tensor, fp: Footprint) -> Tensor:
    if _eager(x):
        return _GatherFunction.apply(None, x, *_fp_args(fp))
    return unfold_op(x, *_fp_args(fp))


def centre(x: Tensor, fp: Footprint, h_out: int, w_out: int) -> Tensor:
    from .reference import centre as reference_centre  # a strided slice: already cheap

    return reference_centre(x, fp, h_out, w_out)


# --- BN (as an affine map) + ReLU + 1x1 conv ---------------------------------------------------
@torch.library.custom_op("torchsan::bn_relu_conv", mutates_args=(), device_types="cpu")
def bn_relu_conv_op(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(N, Cin, ...) -> (N, Cout, ...): weight @ relu(scale * x + shift) + bias, per position."""
    return _kernels().bn_relu_conv_forward(x, scale, shift, weight, bias)


@bn_relu_conv_op.register_fake
def _(x, scale, shift, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:]))


@torch.library.custom_op("torchsan::bn_relu_conv_backward", mutates_args=(), device_types="cpu")
def bn_relu_conv_backward_op(grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor,
                             weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    gx, gscale, gshift, gw, gbias = _kernels().bn_relu_conv_backward(grad, x, scale, shift, weight)
    return gx, gscale, gshift, gw, gbias


@bn_relu_conv_backward_op.register_fake
def _(grad, x, scale, shift, weight):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(scale),
            torch.empty_like(shift), torch.empty_like(weight), weight.new_empty(weight.shape[0]))


def _brc_setup(ctx, inputs, output):
    x, scale, shift, weight, bias = inputs
    ctx.save_for_backward(x, scale, shift, weight)
    ctx.has_bias = bias is not None


def _brc_grad(ctx, grad):
    x, scale, shift, weight = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the same formulas in differentiable PyTorch ops.
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        pre = x * scale.view(shape) + shift.view(shape)
        gpre = torch.einsum("oc,no...->nc...", weight, grad) * (pre > 0)
        gx = gpre * scale.view(shape)
        gscale, gshift = (gpre * x).sum(dims), gpre.sum(dims)
        gw = torch.einsum("no...,nc...->oc", grad, torch.relu(pre))
        gbias = grad.sum(dims)
    else:
        gx, gscale, gshift, gw, gbias = bn_relu_conv_backward_op(grad, x, scale, shift, weight)
    return gx, gscale, gshift, gw, gbias if ctx.has_bias else None


bn_relu_conv_op.register_autograd(_brc_grad, setup_context=_brc_setup)


def bn_relu_conv(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return bn_relu_conv_op(x, scale, shift, weight, bias)


# --- per-channel batch statistics (BatchNorm's var_mean) ----------------------------------------
@torch.library.custom_op("torchsan::channel_var_mean", mutates_args=(), device_types="cpu")
def channel_var_mean_op(x: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C, ...) -> (var, mean), each (C,): biased, over every dimension but 1."""
    var, mean = _kernels().channel_var_mean(x)
    return var, mean


@channel_var_mean_op.register_fake
def _(x):
    return x.new_empty(x.shape[1]), x.new_empty(x.shape[1])


@torch.library.custom_op("torchsan::channel_var_mean_backward", mutates_args=(), device_types="cpu")
def channel_var_mean_backward_op(x: Tensor, mean: Tensor, grad_var: Tensor, grad_mean: Tensor,
                                 base: Tensor | None = None) -> Tensor:
    """base + grad_mean / n + (2 grad_var / n) * (x - mean), per channel; one pass over x."""
    return _kernels().channel_var_mean_backward(x, mean, grad_var, grad_mean, base, False)


@torch.library.custom_op("torchsan::channel_var_mean_backward_", mutates_args=("base",), device_types="cpu")
def channel_var_mean_backward_inplace_op(x: Tensor, mean: Tensor, grad_var: Tensor, grad_mean: Tensor,
                                         base: Tensor) -> None:
    """base += grad_mean / n + (2 grad_var / n) * (x - mean), in place (base: contiguous, x's shape)."""
    _kernels().channel_var_mean_backward(x, mean, grad_var, grad_mean, base, True)


channel_var_mean_backward_op.register_fake(
    lambda x, mean, gv, gm, base=None: torch.empty_like(x, memory_format=torch.contiguous_format))


def _cvm_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])


def _cvm_grad(ctx, grad_var, grad_mean):
    x, mean = ctx.saved_tensors
    grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
    if torch.is_grad_enabled():  # create_graph=True (double backward): the same formula in differentiable ops
        shape = (1, -1) + (1,) * (x.dim() - 2)
        n = x.numel() // x.shape[1]
        return torch.addcmul((grad_mean / n).view(shape), (grad_var * (2.0 / n)).view(shape), x - mean.view(shape))
    return channel_var_mean_backward_op(x, mean, grad_var, grad_mean)


channel_var_mean_op.register_autograd(_cvm_grad, setup_context=_cvm_setup)


def channel_var_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    return channel_var_mean_op(x)


# --- softmax over the footprint taps -----------------------------------------------------------
@torch.library.custom_op("torchsan::tap_softmax", mutates_args=(), device_types="cpu")
def tap_softmax_op(x: Tensor) -> Tensor:
    """(N, C, K, L) -> softmax over dim 2."""
    return _kernels().tap_softmax(x)


tap_softmax_op.register_fake(lambda x: torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.custom_op("torchsan::tap_softmax_backward", mutates_args=(), device_types="cpu")
def tap_softmax_backward_op(grad: Tensor, out: Tensor) -> Tensor:
    """out * (grad - sum_k out * grad): the gradient of the softmax w.r.t. its input, from its output."""
    return _kernels().tap_softmax_backward(grad, out)


tap_softmax_backward_op.register_fake(lambda grad, out: torch.empty_like(out, memory_format=torch.contiguous_format))


def _tap_softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _tap_softmax_grad(ctx, grad):
    return tap_softmax_backward_op(grad, *ctx.saved_tensors)


tap_softmax_op.register_autograd(_tap_softmax_grad, setup_context=_tap_softmax_setup)


def _tap_softmax_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _tap_softmax_backward_grad(ctx, gg):
    # gx = y * (g - s), s = sum_k y g. Linear in g (adjoint: the same map); w.r.t. y: gg * (g - s) - g * sum_k gg y.
    grad, out = ctx.saved_tensors
    d_grad = tap_softmax_backward_op(gg, out)
    d_out = gg * (grad - (out * grad).sum(2, keepdim=True)) - grad * (gg * out).sum(2, keepdim=True)
    return d_grad, d_out


tap_softmax_backward_op.register_autograd(_tap_softmax_backward_grad, setup_context=_tap_softmax_backward_setup)


def tap_softmax(x: Tensor) -> Tensor:
    return tap_softmax_op(x)


# --- BN (as an affine map) + ReLU + 2x2 max-pool -------------------------------------------------
@torch.library.custom_op("torchsan::bn_relu_maxpool", mutates_args=(), device_types="cpu")
def bn_relu_maxpool_op(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, H // 2, W // 2): max_pool2d(relu(scale * x + shift), 2, 2)."""
    return _kernels().bn_relu_maxpool_forward(x, scale, shift)


@bn_relu_maxpool_op.register_fake
def _(x, scale, shift):
    return x.new_empty((x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2))


@torch.library.custom_op("torchsan::bn_relu_maxpool_backward", mutates_args=(), device_types="cpu")
def bn_relu_maxpool_backward_op(grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    gx, gscale, gshift = _kernels().bn_relu_maxpool_backward(grad, x, scale, shift)
    return gx, gscale, gshift


@bn_relu_maxpool_backward_op.register_fake
def _(grad, x, scale, shift):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(scale), torch.empty_like(shift)


def _brp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _brp_grad(ctx, grad):
    x, scale, shift = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the same formulas in differentiable PyTorch ops.
        shape = (1, -1, 1, 1)
        pre = x * scale.view(shape) + shift.view(shape)
        _, idx = torch.nn.functional.max_pool2d_with_indices(torch.relu(pre).detach(), 2, 2)
        gr = grad.new_zeros(pre.shape).flatten(2).scatter(2, idx.flatten(2), grad.flatten(2)).view(pre.shape)
        gpre = gr * (pre > 0)
        return gpre * scale.view(shape), (gpre * x).sum((0, 2, 3)), gpre.sum((0, 2, 3))
    return bn_relu_maxpool_backward_op(grad, x, scale, shift)


bn_relu_maxpool_op.register_autograd(_brp_grad, setup_context=_brp_setup)


def bn_relu_maxpool(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return bn_relu_maxpool_op(x, scale, shift)


# --- training-mode BatchNorm (batch statistics) fused with what follows it ------------------------
# y, mean, var = f(x, scale, shift) with var, mean = var_mean(x), scale = weight * rsqrt(var + eps) and
# shift = bias - mean * scale. One autograd node for all of it: its backward runs f's fused backward, then
# adds the statistics' share of grad x to that buffer in place (channel_var_mean_backward_), instead of a
# separate statistics gradient that autograd would allocate and add.
def _bn_stats_grads(weight, mean, var, eps, gscale, gshift, gmean_out, gvar_out):
    """From f's gradients w.r.t. scale and shift (and the returned mean and var): grad weight, mean and var."""
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else weight * rstd
    gscale = gscale - gshift * mean  # shift = bias - mean * scale depends on scale too
    g_weight = gscale * rstd
    g_mean = -gshift * scale
    g_var = (gscale if weight is None else gscale * weight) * (-0.5 * rstd**3)
    if gmean_out is not None:
        g_mean = g_mean + gmean_out
    if gvar_out is not None:
        g_var = g_var + gvar_out
    return (None if weight is None else g_weight), g_mean, g_var


def _bn_train_backward(x, weight, mean, var, eps, gx0, gscale, gshift, gmean_out, gvar_out):
    """grad x, weight, bias from f's gradients w.r.t. x (holding scale, shift fixed), scale and shift."""
    g_weight, g_mean, g_var = _bn_stats_grads(weight, mean, var, eps, gscale, gshift, gmean_out, gvar_out)
    channel_var_mean_backward_inplace_op(x, mean, g_var, g_mean, gx0)  # gx0: a fresh buffer of f's backward
    return gx0, g_weight, gshift


def _bn_train_double_backward(fn, saved, grads):
    """create_graph=True: differentiate the same function written in differentiable PyTorch ops."""
    from . import reference

    inputs = [t for t in saved if t is not None and t.requires_grad]
    with torch.enable_grad():
        outs = fn(reference, *saved)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        found = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], create_graph=True,
                                    allow_unused=True)
    result, it = [], iter(found)
    for t in saved:
        result.append(next(it) if t is not None and t.requires_grad else None)
    return result


@torch.library.custom_op("torchsan::batchnorm_relu_conv", mutates_args=(), device_types="cpu")
def batchnorm_relu_conv_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, conv_weight: Tensor,
                           conv_bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN (batch statistics), ReLU, 1x1 conv: (N, Cin, ...) -> (y (N, Cout, ...), mean, var)."""
    var, mean = _kernels().channel_var_mean(x)
    scale, shift = batchnorm_scale_shift(weight, bias, mean, var, eps)
    return _kernels().bn_relu_conv_forward(x, scale, shift, conv_weight, conv_bias), mean, var


@batchnorm_relu_conv_op.register_fake
def _(x, weight, bias, eps, conv_weight, conv_bias):
    c = x.shape[1]
    return x.new_empty((x.shape[0], conv_weight.shape[0], *x.shape[2:])), x.new_empty(c), x.new_empty(c)


def _bnrc_setup(ctx, inputs, output):
    x, weight, bias, eps, conv_weight, conv_bias = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, bias, conv_weight, conv_bias, mean, var)
    ctx.eps = eps


def _bnrc_reference(impl, x, weight, bias, conv_weight, conv_bias, eps):
    return impl.batchnorm_relu_conv(x, weight, bias, eps, conv_weight, conv_bias)


def _bnrc_grad(ctx, grad, gmean_out, gvar_out):
    x, weight, bias, conv_weight, conv_bias, mean, var = ctx.saved_tensors
    if torch.is_grad_enabled():
        gx, gw, gb, gcw, gcb = _bn_train_double_backward(
            lambda impl, *t: _bnrc_reference(impl, *t, ctx.eps), (x, weight, bias, conv_weight, conv_bias),
            (grad, gmean_out, gvar_out))
        return gx, gw, gb, None, gcw, gcb
    scale, shift = batchnorm_scale_shift(weight, bias, mean, var, ctx.eps)
    gx0, gscale, gshift, gcw, gcb = bn_relu_conv_backward_op(grad, x, scale, shift, conv_weight)
    gx, gw, gb = _bn_train_backward(x, weight, mean, var, ctx.eps, gx0, gscale, gshift, gmean_out, gvar_out)
    return gx, gw, gb if bias is not None else None, None, gcw, gcb if conv_bias is not None else None


batchnorm_relu_conv_op.register_autograd(_bnrc_grad, setup_context=_bnrc_setup)


@torch.library.custom_op("torchsan::batchnorm_relu_maxpool", mutates_args=(), device_types="cpu")
def batchnorm_relu_maxpool_op(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                              eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN (batch statistics), ReLU, 2x2 max-pool: (N, C, H, W) -> (y, mean, var)."""
    var, mean = _kernels().channel_var_mean(x)
    scale, shift = batchnorm_scale_shift(weight, bias, mean, var, eps)
    return _kernels().bn_relu_maxpool_forward(x, scale, shift), mean, var


@batchnorm_relu_maxpool_op.register_fake
def _(x, weight, bias, eps):
    c = x.shape[1]
    return x.new_empty((x.shape[0], c, x.shape[2] // 2, x.shape[3] // 2)), x.new_empty(c), x.new_empty(c)


def _bnrp_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.eps = eps


def _bnrp_reference(impl, x, weight, bias, eps):
    return impl.batchnorm_relu_maxpool(x, weight, bias, eps)


def _bnrp_grad(ctx, grad, gmean_out, gvar_out):
    x, weight, bias, mean, var = ctx.saved_tensors
    if torch.is_grad_enabled():
        gx, gw, gb = _bn_train_double_backward(
            lambda impl, *t: _bnrp_reference(impl, *t, ctx.eps), (x, weight, bias), (grad, gmean_out, gvar_out))
        return gx, gw, gb, None
    scale, shift = batchnorm_scale_shift(weight, bias, mean, var, ctx.eps)
    gx0, gscale, gshift = bn_relu_maxpool_backward_op(grad, x, scale, shift)
    gx, gw, gb = _bn_train_backward(x, weight, mean, var, ctx.eps, gx0, gscale, gshift, gmean_out, gvar_out)
    return gx, gw, gb if bias is not None else None, None


batchnorm_relu_maxpool_op.register_autograd(_bnrp_grad, setup_context=_bnrp_setup)


def batchnorm_relu_conv(x, weight, bias, eps, conv_weight, conv_bias):
    return batchnorm_relu_conv_op(x, weight, bias, eps, conv_weight, conv_bias)


def batchnorm_relu_maxpool(x, weight, bias, eps):
    return batchnorm_relu_maxpool_op(x, weight, bias, eps)


# --- subtraction2 (with append) + training-mode BN + ReLU + 1x1 conv, without writing z --------
# The first triple of the pairwise mapping gamma reads z = [phi(x_i) - psi(x_j), p_i - p_j] (N, C + E, K, L), K times
# the size of phi(x) and psi(x). Here its statistics, the fused BN-ReLU-conv and their backward gather z's rows from
# x1, x2 and append as they go, so z is neither written nor kept for backward; the statistics' share of grad z is
# added inside the scatter back onto x1 and x2.
@torch.library.custom_op("torchsan::subtraction2_batchnorm_relu_conv", mutates_args=(), device_types="cpu")
def subtraction2_batchnorm_relu_conv_op(x1: Tensor, x2: Tensor, append: Tensor | None, weight: Tensor | None,
                                        bias: Tensor | None, eps: float, conv_weight: Tensor, conv_bias: Tensor | None,
                                        kernel_size: int, stride: int, padding: int, dilation: int,
                                        reflect: bool) -> tuple[Tensor, Tensor, Tensor]:
    """batchnorm_relu_conv(subtraction2(x1, x2, append=append), ...): (y (N, Cout, K, L), mean, var (C + E))."""
    geometry = (kernel_size, stride, padding, dilation, reflect)
    var, mean = _kernels().relation_var_mean(x1, x2, append, *geometry)
    scale, shift = batchnorm_scale_shift(weight, bias, mean, var, eps)
    y = _kernels().relation_bn_relu_conv_forward(x1, x2, append, scale, shift, conv_weight, conv_bias, *geometry)
    return y, mean, var


@subtraction2_batchnorm_relu_conv_op.register_fake
def _(x1, x2, append, weight, bias, eps, conv_weight, conv_bias, kernel_size, stride, padding, dilation, reflect):
    ho, wo = _out_hw(x1.shape[2], x1.shape[3], kernel_size, stride, padding, dilation)
    c = x1.shape[1] + (0 if append is None else append.shape[1])
    y = x1.new_empty((x1.shape[0], conv_weight.shape[0], kernel_size * kernel_size, ho * wo))
    return y, x1.new_empty(c), x1.new_empty(c)


@torch.library.custom_op("torchsan::subtraction2_bn_relu_conv_backward", mutates_args=(), device_types="cpu")
def subtraction2_bn_relu_conv_backward_op(grad: Tensor, x1: Tensor, x2: Tensor, append: Tensor | None, scale: Tensor,
                                          shift: Tensor, conv_weight: Tensor, kernel_size: int, stride: int,
                                          padding: int, dilation: int,
                                          reflect: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """bn_relu_conv's backward on z = [subtraction2(x1, x2), append] (holding scale and shift fixed), z gathered:
    (grad z (N, C + E, K, L), grad scale, grad shift, grad conv_weight, grad conv_bias)."""
    return tuple(_kernels().relation_bn_relu_conv_backward(grad, x1, x2, append, scale, shift, conv_weight,
                                                           kernel_size, stride, padding, dilation, reflect))


@subtraction2_bn_relu_conv_backward_op.register_fake
def _(grad, x1, x2, append, scale, shift, conv_weight, kernel_size, stride, padding, dilation, reflect):
    z = grad.new_empty((grad.shape[0], scale.shape[0], *grad.shape[2:]))
    return z, torch.empty_like(scale), torch.empty_like(shift), torch.empty_like(conv_weight), grad.new_empty(
        grad.shape[1])


@torch.library.custom_op("torchsan::subtraction2_stats_backward", mutates_args=(), device_types="cpu")
def subtraction2_stats_backward_op(grad: Tensor, x1: Tensor, x2: Tensor, append: Tensor | None, grad_mean: Tensor,
                                   grad_var: Tensor, mean: Tensor, kernel_size: int, stride: int, padding: int,
                                   dilation: int, reflect: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of z = [subtraction2(x1, x2), append] (N, C + E, K, L) from grad z plus the share of z's batch mean
    and variance (grad_mean, grad_var (C + E)): grad z + grad_mean / n + 2 grad_var / n * (z - mean), n = N K L, with
    z recomputed. Returns (grad x1, grad x2, grad append (empty if append is None))."""
    inv = 1.0 / (grad.numel() // grad.shape[1])
    a, b = grad_mean * inv, grad_var * (2 * inv)
    g1, g2 = _kernels().relation_stats_backward(grad, x1, x2, a, b, mean, kernel_size, stride, padding, dilation,
                                                reflect)
    if append is None:
        return g1, g2, grad.new_empty(0)
    c, view = x1.shape[1], (1, -1, 1, 1)
    g_append = grad[:, c:] + a[c:].view(view) + b[c:].view(view) * (append - mean[c:].view(view))
    if append.shape[0] == 1 and x1.shape[0] != 1:
        g_append = g_append.sum(0, keepdim=True)
    return g1, g2, g_append


@subtraction2_stats_backward_op.register_fake
def _(grad, x1, x2, append, grad_mean, grad_var, mean, kernel_size, stride, padding, dilation, reflect):
    return torch.empty_like(x1), torch.empty_like(x1), grad.new_empty(0) if append is None else torch.empty_like(append)


def _s2brc_setup(ctx, inputs, output):
    x1, x2, append, weight, bias, eps, conv_weight, conv_bias, *geometry = inputs
    _, mean, var = output
    ctx.save_for_backward(x1, x2, append, weight, bias, conv_weight, conv_bias, mean, var)
    ctx.eps, ctx.geometry = eps, tuple(geometry)


def _s2brc_reference(impl, x1, x2, append, weight, bias, conv_weight, conv_bias, eps, geometry):
    k, s, p, d, reflect = geometry
    fp = Footprint(k, s, p, d, "reflect" if reflect else "zeros")
    z = impl.subtraction2(x1, x2, fp, fp.out_size(x1.shape[2]), fp.out_size(x1.shape[3]), append=append)
    return impl.batchnorm_relu_conv(z, weight, bias, eps, conv_weight, conv_bias)


def _s2brc_grad(ctx, grad, gmean_out, gvar_out):
    x1, x2, append, weight, bias, conv_weight, conv_bias, mean, var = ctx.saved_tensors
    if torch.is_grad_enabled():
        g = _bn_train_double_backward(
            lambda impl, *t: _s2brc_reference(impl, *t, ctx.eps, ctx.geometry),
            (x1, x2, append, weight, bias, conv_weight, conv_bias), (grad, gmean_out, gvar_out))
        return (*g[:5], None, *g[5:], None, None, None, None, None)
    scale, shift = batchnorm_scale_shift(weight, bias, mean, var, ctx.eps)
    gz0, gscale, gshift, gcw, gcb = subtraction2_bn_relu_conv_backward_op(grad, x1, x2, append, scale, shift,
                                                                          conv_weight, *ctx.geometry)
    g_weight, g_mean, g_var = _bn_stats_grads(weight, mean, var, ctx.eps, gscale, gshift, gmean_out, gvar_out)
    g1, g2, g_append = subtraction2_stats_backward_op(gz0, x1, x2, append, g_mean, g_var, mean, *ctx.geometry)
    g_append = None if append is None else g_append
    return (g1, g2, g_append, g_weight, gshift if bias is not None else None, None, gcw,
            gcb if conv_bias is not None else None, None, None, None, None, None)


subtraction2_batchnorm_relu_conv_op.register_autograd(_s2brc_grad, setup_context=_s2brc_setup)


def subtraction2_batchnorm_relu_conv(x1, x2, append, weight, bias, eps, conv_weight, conv_bias, fp: Footprint):
    return subtraction2_batchnorm_relu_conv_op(x1, x2, append, weight, bias, eps, conv_weight, conv_bias,
                                               *_fp_args(fp))
