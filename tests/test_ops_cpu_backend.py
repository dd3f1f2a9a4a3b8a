"""The cpu backend as a whole: building and falling back, dispatch, ``kernel_constants()``, every custom op in
``torch.ops.torchsan`` through ``opcheck`` and on meta tensors, bad input rejected identically by every backend, the
same bits with 1 and 2 threads, and the deprecated names of the public ops."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from _helpers import assert_identical, needs_cpu_kernels, per_thread_count, run
from torchsan import ops
from torchsan.ops import _cpu
from torchsan.ops._cpu import _build

pytestmark = needs_cpu_kernels
F64 = dict(dtype=torch.float64)


# --- building, falling back, dispatch --------------------------------------------------------------------------------
def _forget_the_extension(monkeypatch):
    monkeypatch.setattr(_build, "_ext", None)
    monkeypatch.setattr(_build, "_error", None)


def test_build_failure_falls_back_with_a_warning(monkeypatch):
    _forget_the_extension(monkeypatch)

    def broken():
        raise OSError("no compiler found")

    monkeypatch.setattr(_build, "_load", broken)
    with pytest.warns(RuntimeWarning, match="falling back to the reference"):
        assert not _cpu.available()
    assert "no compiler found" in _cpu.unavailable_reason()
    x = torch.randn(1, 2, 5, 5)
    with ops.use_backend("auto"):
        assert ops.backend_for(x) == "reference"
        assert ops.unfold(x, 3).shape == (1, 2, 9, 25)  # still works
    with ops.use_backend("cpu"), pytest.raises(RuntimeError, match="no compiler found"):
        ops.unfold(x, 3)
    with pytest.raises(RuntimeError, match="no compiler found"):
        _cpu.kernel_constants()


def test_kernels_can_be_switched_off(monkeypatch):
    _forget_the_extension(monkeypatch)
    monkeypatch.setenv("TORCHSAN_DISABLE_CPU_KERNELS", "1")
    assert not _cpu.available()  # (no warning: asked for)
    assert _cpu.unavailable_reason() == "disabled by TORCHSAN_DISABLE_CPU_KERNELS"
    with ops.use_backend("auto"):
        assert ops.backend_for(torch.randn(1, 2, 5, 5)) == "reference"


def test_dispatch_rules():
    x = torch.randn(1, 4, 6, 6)
    with ops.use_backend("auto"):
        assert ops.backend_for(x) == "cpu" and ops.backend_for(x.double()) == "cpu"
        assert ops.backend_for(x.bfloat16()) == "reference"  # reference serves other dtypes
        assert ops.backend_for(torch.empty(1, device="meta")) == "reference"
    with ops.use_backend("reference"):
        assert ops.backend_for(x) == "reference"
    with ops.use_backend("cpu"), pytest.raises(TypeError, match="float32 and float64"):
        ops.unfold(x.bfloat16(), 3)
    with ops.use_backend("cpu"), pytest.raises(ValueError, match="needs CPU tensors"):
        ops.unfold(torch.empty(1, 4, 6, 6, device="meta"), 3)


def test_kernel_constants_name_the_thresholds():
    constants = _cpu.kernel_constants()
    expected = {"stream_bytes", "stream_run_bytes", "small_plane_bytes", "staged_stream_bytes", "staged_run_bytes",
                "shifted_max_width", "softmax_plane_bytes"}
    assert expected <= constants.keys()
    flags = {"stream_stores", "fused_multiply_add"}  # 0 or 1: what the build's target has
    assert all(isinstance(v, int) and not isinstance(v, bool) and (v in (0, 1) if k in flags else v > 0)
               for k, v in constants.items()), constants
    assert constants["vector_bytes"] in (16, 32, 64)
    constants["stream_bytes"] = -1  # a copy: the caller cannot change the kernels' view
    assert _cpu.kernel_constants()["stream_bytes"] > 0


def test_the_build_targets_the_widest_vector_unit_the_machine_has(monkeypatch):
    """-march=native targets the machine's instruction set (read here from /proc/cpuinfo): 512-bit vectors on a CPU
    with AVX-512, else 256-bit ones where it has AVX; TORCHSAN_CPU_ARCH is checked."""
    import platform
    from pathlib import Path

    from torchsan.ops._cpu import _build

    isa, width, arch = _cpu.vector_isa(), _cpu.kernel_constants()["vector_bytes"], _build.requested_arch()
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    wide = arch == "avx512" or (arch == "native" and "avx512f" in flags)
    assert width == (64 if wide else 32 if isa in ("avx512", "avx2", "avx") else 16)
    assert f"built for {isa} ({8 * width}-bit vectors" in _cpu.describe()
    if arch == "native" and platform.machine() == "x86_64":
        assert isa == ("avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else isa)
    if arch == "avx2":
        assert isa == "avx2" and width == 32
    if arch == "generic" and platform.machine() == "x86_64":
        assert isa == "sse2" and width == 16
    monkeypatch.setenv("TORCHSAN_CPU_ARCH", "pentium4")
    with pytest.raises(ValueError, match="TORCHSAN_CPU_ARCH='pentium4' is not one of native, avx512, avx2, generic"):
        _build.requested_arch()


# /proc/cpuinfo as each kind of machine writes it (abridged); "vmx flags" must not be read as "flags"
_CPUINFO = {
    "intel_avx512": "processor\t: 0\nvendor_id\t: GenuineIntel\nvmx flags\t: vnmi ept\n"
                    "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n",
    "amd_avx512": "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n",
    "intel_avx2": "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx avx2 fma\n",
    "arm": "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes\nCPU implementer\t: 0x41\n",
    "unreadable": "",
}


def _pretend_to_be(monkeypatch, machine: str) -> None:
    """_build reads /proc/cpuinfo and the architecture of the ``_CPUINFO`` machine named."""
    read = _build._cpuinfo
    monkeypatch.setattr(_build, "_cpuinfo", lambda field, text=_CPUINFO[machine]: read(field, text))
    monkeypatch.setattr(_build.platform, "machine", lambda: "aarch64" if machine == "arm" else "x86_64")


@pytest.mark.parametrize("machine, bits", [("intel_avx512", 512), ("amd_avx512", 512), ("intel_avx2", None),
                                           ("arm", None), ("unreadable", None)])
def test_native_builds_512_bit_vectors_only_on_cpus_with_avx512(monkeypatch, machine, bits):
    text = _CPUINFO[machine]
    read = _build._cpuinfo
    _pretend_to_be(monkeypatch, machine)
    assert _build.native_vector_bits() == bits
    flags = _build._arch_flags("native")
    assert ("-DTORCHSAN_VECTOR_BITS=512" in flags) == ("-mprefer-vector-width=512" in flags) == (bits == 512)
    if machine != "arm":  # (avx2 is an error on Arm)
        assert "-DTORCHSAN_VECTOR_BITS=512" not in _build._arch_flags("avx2")
    assert read("flags", text) == ("" if machine in ("arm", "unreadable") else text.split("flags\t\t: ")[1].strip())
    assert read("vendor_id", "") == "" and read("Features", _CPUINFO["arm"]) == "fp asimd evtstrm aes"


@pytest.mark.parametrize("machine, arches", [("intel_avx512", ["generic", "avx2"]),
                                             ("amd_avx512", ["generic", "avx2"]),
                                             ("intel_avx2", ["generic"]), ("arm", ["generic"]),
                                             ("unreadable", ["generic"])])
def test_portable_arches_are_the_widths_native_does_not_build(monkeypatch, machine, arches):
    _pretend_to_be(monkeypatch, machine)
    assert _build.portable_arches() == arches


# --- every custom op: opcheck, and shapes on meta tensors ------------------------------------------------------------
def _t(*shape, grad=False):
    return torch.randn(*shape, **F64).requires_grad_(grad)


def _opcheck_cases():
    """(op name, args) for every op in torch.ops.torchsan, with several argument forms each. Forward ops take inputs
    that require grad (their autograd formula is part of the check). The backward ops have no autograd formula: they
    run with grad mode off, and double backward differentiates the reference composition instead
    (ops/_cpu/_register.py), so they are checked with inputs that do not require grad (schema, fake tensors and AOT
    dispatch, forward only)."""
    x, x2 = _t(2, 6, 7, 8, grad=True), _t(2, 6, 7, 8, grad=True)
    weight = _t(2, 3, 9, 56, grad=True)
    cases = []
    for reflect in (True, False):
        fp = (3, 1, 1, 1, reflect)
        cases += [("aggregation", (x, weight, *fp)), ("softmax_aggregation", (x, weight, *fp)),
                  ("softmax_aggregation_inference", (x.detach(), weight.detach(), *fp)),
                  ("unfold", (x, *fp)), ("subtraction2", (x, x2, None, *fp))]
        cases += [("subtraction2", (x, x2, _t(batch, 2, 9, 56, grad=True), *fp)) for batch in (1, 2)]
        grad, gcols = _t(2, 6, 7, 8), _t(2, 8, 9, 56)
        probs = torch.softmax(weight.detach(), 2)
        cases += [("aggregation_backward", (grad, x.detach(), weight.detach(), *fp, False)),
                  ("aggregation_backward", (grad, x.detach(), probs, *fp, True)),
                  ("subtraction2_backward", (gcols, 6, 7, 8, *fp)),
                  ("unfold_backward", (gcols[:, :6], 7, 8, *fp))]
    strided = (5, 2, 4, 2, True)  # kernel, stride, padding, dilation, reflect
    cases += [("aggregation", (x, _t(2, 2, 25, 16, grad=True), *strided)), ("unfold", (x, *strided))]
    cases += [("tap_softmax", (_t(2, 3, 4, 9, grad=True),)),
              ("tap_softmax_backward", (_t(2, 3, 4, 9), torch.softmax(_t(2, 3, 4, 9), 2)))]
    # BN-ReLU-conv1x1 and BN-ReLU-pool
    xs, s, b = _t(2, 3, 4, 5, grad=True), _t(3, grad=True), _t(3, grad=True)
    cw, cb = _t(2, 3, grad=True), _t(2, grad=True)
    cases += [("conv1x1_inference", (xs.detach(), cw.detach(), cb.detach())),
              ("conv1x1_inference", (_t(2, 3, 70, 3), cw.detach(), None)),
              ("affine_relu_conv1x1", (xs, s, b, cw, cb)), ("affine_relu_conv1x1", (xs, s, b, cw, None)),
              ("affine_relu_conv1x1_add", (xs.detach(), s.detach(), b.detach(), cw.detach(), None, _t(2, 2, 4, 5))),
              ("affine_relu_conv1x1_backward", (_t(2, 2, 4, 5), xs.detach(), s.detach(), b.detach(), cw.detach())),
              ("batchnorm_relu_conv1x1", (xs, s, b, 1e-5, cw, cb)),
              ("batchnorm_relu_conv1x1", (xs, None, None, 1e-5, cw, None)),
              ("affine_relu_maxpool2x2", (xs, s, b)),
              ("affine_relu_maxpool2x2_backward", (_t(2, 3, 2, 2), xs.detach(), s.detach(), b.detach())),
              ("batchnorm_relu_maxpool2x2", (xs, s, b, 1e-5)), ("batchnorm_relu_maxpool2x2", (xs, None, None, 1e-5))]
    # the stem: odd sizes (the last row and column no window covers), x with and without a gradient
    cases += [("conv1x1_affine_relu_maxpool2x2", (_t(2, 3, 7, 5, grad=True), _t(4, 3, grad=True), _t(4, grad=True),
                                                  _t(4, grad=True)))]
    cases += [("conv1x1_affine_relu_maxpool2x2_backward", (_t(2, 4, 3, 2), _t(2, 3, 7, 5), _t(4, 3), _t(4), _t(4),
                                                           input_grad)) for input_grad in (True, False)]
    # statistics
    mean = xs.detach().mean((0, 2, 3))
    cases += [("channel_var_mean", (xs,)), ("channel_var_mean", (_t(3, 2, 50, grad=True),)),
              ("channel_var_mean_backward", (xs.detach(), mean, _t(3), _t(3))),
              ("add_channel_var_mean_backward", (xs.detach(), mean, _t(3), _t(3), _t(2, 3, 4, 5)))]
    # subtraction2 + BN-ReLU-conv1x1
    w5, b5, cw5, cb5 = _t(5, grad=True), _t(5, grad=True), _t(4, 5, grad=True), _t(4, grad=True)
    x1, x2 = _t(2, 3, 7, 8, grad=True), _t(2, 3, 7, 8, grad=True)
    for batch in (1, 2):
        append = _t(batch, 2, 9, 56, grad=True)
        for reflect in (True, False):
            cases.append(("subtraction2_batchnorm_relu_conv1x1",
                          (x1, x2, append, w5, b5, 1e-5, cw5, cb5, 3, 1, 1, 1, reflect)))
    cases.append(("subtraction2_batchnorm_relu_conv1x1",
                  (x1, x2, None, None, None, 1e-5, cw5[:, :3], None, 5, 2, 2, 1, True)))
    det = [t.detach() for t in (x1, x2)]
    for append in (None, _t(1, 2, 9, 56)):
        c = 3 + (0 if append is None else 2)
        fp = (3, 1, 1, 1, True)
        cases += [("subtraction2_affine_relu_conv1x1_backward", (_t(2, 4, 9, 56), *det, append, _t(c), _t(c),
                                                                  _t(4, c), *fp)),
                  ("subtraction2_var_mean_backward", (_t(2, c, 9, 56), *det, append, _t(c), _t(c), _t(c), *fp)),
                  ("conv1x1_affine_relu_maxpool2x2", (_t(2, 3, 6, 7), _t(4, 3), _t(4), _t(4))),
                  ("pairwise_logits_inference", (*det, append, _t(c), _t(c), _t(4, c), _t(4), _t(4), _t(3, 4),
                                                 _t(3), *fp)),
                  ("pairwise_attention_inference", (*det, append, _t(2, 6, 7, 8), _t(c), _t(c), _t(4, c), _t(4),
                                                    _t(4), _t(3, 4), _t(3), *fp))]
    # the clique relation
    q, k = _t(2, 3, 9, 13, grad=True), _t(2, 3, 9, 13, grad=True)
    cases += [("clique_products", (q, k)), ("clique_products", (_t(1, 2, 4, 9, grad=True), _t(1, 2, 4, 9))),
              ("clique_products_backward", (_t(2, 9, 9, 13), q.detach(), k.detach()))]
    cases.append(("patchwise_weights_inference", (*det, _t(30), _t(30), _t(4, 30), _t(4), _t(4), _t(18, 4), None,
                                                  3, 1, 1, 1, True)))
    cases.append(("patchwise_attention_inference", (*det, _t(2, 4, 7, 8), _t(30), _t(30), _t(4, 30), _t(4), _t(4),
                                                    _t(18, 4), _t(18), 3, 1, 1, 1, True)))
    return cases


OPCHECK_CASES = _opcheck_cases() if _cpu.available() else []


def _registered_ops():
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("torchsan::"))


def test_opcheck_cases_cover_every_custom_op():
    assert _registered_ops() == sorted({name for name, _ in OPCHECK_CASES})


@pytest.mark.parametrize("i", range(len(OPCHECK_CASES)), ids=lambda i: f"{OPCHECK_CASES[i][0]}-{i}")
def test_opcheck(i):
    name, args = OPCHECK_CASES[i]
    opcheck(getattr(torch.ops.torchsan, name).default, args)


@pytest.mark.parametrize("i", range(len(OPCHECK_CASES)), ids=lambda i: f"{OPCHECK_CASES[i][0]}-{i}")
def test_meta_tensors_infer_the_real_shapes(i):
    # The fake implementations (shape inference for meta tensors and torch.compile) against the kernels.
    name, args = OPCHECK_CASES[i]
    op = getattr(torch.ops.torchsan, name).default
    clone = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    real = op(*clone)
    meta = op(*[a.detach().to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    real, meta = (real, meta) if isinstance(real, (tuple, list)) else ((real,), (meta,))
    assert len(real) == len(meta)
    for r, m in zip(real, meta):
        assert (r is None) == (m is None)
        if r is not None:
            assert m.device.type == "meta" and m.shape == r.shape and m.dtype == r.dtype, (name, m.shape, r.shape)


def test_meta_tensors_through_the_raw_ops():
    x = torch.empty(2, 16, 30, 22, device="meta")
    w = torch.empty(2, 4, 49, 15 * 11, device="meta")
    y = torch.ops.torchsan.aggregation(x, w, 7, 2, 3, 1, True)
    assert y.shape == (2, 16, 15, 11) and y.device.type == "meta"
    assert torch.ops.torchsan.unfold(x, 3, 1, 1, 1, False).shape == (2, 16, 9, 660)


# --- bad input: rejected before dispatch, so identically by every backend --------------------------------------------
BAD = [
    (lambda: ops.aggregation(torch.randn(2, 8, 6, 6), torch.randn(2, 3, 9, 36), 3), ValueError, "divisible"),
    (lambda: ops.aggregation(torch.randn(2, 8, 6, 6), torch.randn(2, 4, 9, 35), 3), ValueError, "weight dim 3"),
    (lambda: ops.aggregation(torch.randn(2, 8, 6, 6), torch.randn(2, 4, 9, 36).double(), 3), TypeError, "dtype"),
    (lambda: ops.aggregation(torch.randn(8, 6, 6), torch.randn(2, 4, 9, 36), 3), ValueError, "4-D"),
    (lambda: ops.softmax_aggregation(torch.randn(2, 8, 6, 6), torch.randn(2, 4, 25, 36), 3), ValueError,
     r"kernel_size\*\*2"),
    (lambda: ops.subtraction2(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), 7), ValueError, "reflect padding"),
    (lambda: ops.unfold(torch.randn(1, 2, 5, 5), 4), ValueError, "odd"),
    (lambda: ops.subtraction2(torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 5), 3, append=torch.randn(2, 1, 9, 24)),
     ValueError, "append must be"),
    (lambda: ops.tap_softmax(torch.randn(9, 7)), ValueError, "4-D"),
    (lambda: ops.channel_var_mean(torch.randn(0, 3)), ValueError, "at least one value per channel"),
    (lambda: ops.affine_relu_conv1x1(torch.randn(2, 3, 4), torch.ones(3), torch.zeros(3), torch.randn(2, 4)),
     ValueError, r"weight must have shape \(Cout, 3\)"),
    (lambda: ops.affine_relu_conv1x1(torch.randn(2, 3, 4), torch.ones(3), torch.zeros(2), torch.randn(2, 3)),
     ValueError, r"shift must have shape \(3,\)"),
    (lambda: ops.conv1x1(torch.randn(2, 3, 4), torch.randn(2, 4)), ValueError, r"weight must have shape \(Cout, 3\)"),
    (lambda: ops.conv1x1(torch.randn(2, 3, 4), torch.randn(2, 3), torch.randn(3)), ValueError,
     r"bias must have shape \(2,\)"),
    (lambda: ops.batchnorm_relu_conv1x1(torch.randn(1, 3, 1), None, None, 1e-5, torch.randn(2, 3)), ValueError,
     "more than 1 value per channel"),
    (lambda: ops.affine_relu_maxpool2x2(torch.randn(2, 3, 1, 4), torch.ones(3), torch.zeros(3)), ValueError,
     "at least 2x2"),
    (lambda: ops.batchnorm_relu_maxpool2x2(torch.randn(2, 3, 4, 4), torch.ones(3), None, 0.0), ValueError,
     "eps must be positive"),
    (lambda: ops.subtraction2_batchnorm_relu_conv1x1(torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 5), None, None,
                                                     1e-5, torch.randn(3, 3), kernel_size=3,
                                                     append=torch.randn(1, 2, 9, 25)),
     ValueError, r"conv_weight must have shape \(Cout, 4\)"),
    (lambda: ops.subtraction2_batchnorm_relu_conv1x1(torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 5),
                                                     torch.randn(3), None, 1e-5, torch.randn(3, 2), kernel_size=3),
     ValueError, r"weight must have shape \(2,\)"),
    (lambda: ops.subtraction2_batchnorm_relu_conv1x1(torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 4), None, None,
                                                     1e-5, torch.randn(3, 2), kernel_size=3),
     ValueError, "same shape"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
@pytest.mark.parametrize("i", range(len(BAD)))
def test_every_backend_rejects_bad_input_the_same_way(backend, i):
    call, exc, match = BAD[i]
    with ops.use_backend(backend), pytest.raises(exc, match=match):
        call()


# --- deterministic: the same bits with 1 and 2 threads ---------------------------------------------------------------
def _threads_cases():
    x, weight = torch.randn(3, 16, 17, 15), torch.randn(3, 8, 49, 17 * 15)
    z = torch.randn(2, 9, 3, 5000, **F64)  # several pixel chunks per image
    brc = (torch.randn(9, **F64), torch.randn(9, **F64), torch.randn(6, 9, **F64), torch.randn(6, **F64))
    q, k = torch.randn(3, 6, 17, 15), torch.randn(3, 6, 17, 15)
    append, cw = torch.randn(1, 2, 49, 255), torch.randn(7, 8)
    # (Without the statistics terms in the BN ops' outputs: their gradient would come from torch's sum over y's
    # gradient, which depends on the thread count.)
    return {
        "aggregation": (lambda a, b: ops.aggregation(a, b, 7), (x, weight)),
        "softmax_aggregation": (lambda a, b: ops.softmax_aggregation(a, b, 7), (x, weight)),
        "subtraction2": (lambda a, b, e: ops.subtraction2(a, b, 7, append=e), (x, x.flip(3), weight[:1, :2])),
        "unfold": (lambda a: ops.unfold(a, 5, stride=2), (x,)),
        "tap_softmax": (ops.tap_softmax, (torch.randn(3, 5, 49, 300),)),
        "affine_relu_conv1x1": (ops.affine_relu_conv1x1, (z, *brc)),
        # one image: the forward's pixel chunks shrink with the thread count, to give every thread work
        "affine_relu_conv1x1, one image": (ops.affine_relu_conv1x1, (z[:1, :, :, :1000].contiguous(), *brc)),
        "batchnorm_relu_conv1x1": (lambda *t: ops.batchnorm_relu_conv1x1(t[0], t[1], t[2], 1e-5, *t[3:])[0],
                                   (z, *brc)),
        "affine_relu_maxpool2x2": (ops.affine_relu_maxpool2x2, (torch.randn(4, 6, 50, 52), torch.randn(6),
                                                               torch.randn(6))),
        "batchnorm_relu_maxpool2x2": (lambda *t: ops.batchnorm_relu_maxpool2x2(*t, 1e-5)[0],
                                      (torch.randn(4, 6, 50, 52), torch.rand(6) + 0.5, torch.randn(6))),
        "channel_var_mean": (lambda t: torch.cat(ops.channel_var_mean(t)), (torch.randn(4, 6, 10000),)),
        "subtraction2_batchnorm_relu_conv1x1": (
            lambda a, b, e, w: ops.subtraction2_batchnorm_relu_conv1x1(a, b, None, None, 1e-5, w, w[:, 0],
                                                                       kernel_size=7, append=e)[0],
            (q, k, append, cw)),
    }


THREADS_CASES = list(_threads_cases()) if _cpu.available() else []


@pytest.mark.parametrize("name", THREADS_CASES)
def test_same_bits_with_1_and_2_threads(name):
    fn, inputs = _threads_cases()[name]
    one, two = per_thread_count(lambda: run(fn, *inputs, backend="cpu"))
    assert_identical(one, two)


# --- the deprecated names ---------------------------------------------------------------------------------------------
def _deprecated_cases():
    x, s, b = torch.randn(2, 3, 6, 8, **F64), torch.rand(3, **F64) + 0.5, torch.randn(3, **F64)
    cw = torch.randn(4, 3, **F64)
    q = torch.randn(2, 3, 6, 8, **F64)
    cw5 = torch.randn(4, 5, **F64)
    append = torch.randn(1, 2, 9, 48, **F64)
    return [("bn_relu_conv", "affine_relu_conv1x1", (x, s, b, cw), {}),
            ("batchnorm_relu_conv", "batchnorm_relu_conv1x1", (x, s, b, 1e-5, cw), {}),
            ("bn_relu_maxpool", "affine_relu_maxpool2x2", (x, s, b), {}),
            ("batchnorm_relu_maxpool", "batchnorm_relu_maxpool2x2", (x, None, b, 1e-3), {}),
            ("subtraction2_batchnorm_relu_conv", "subtraction2_batchnorm_relu_conv1x1",
             (q, x, None, None, 1e-5, cw5), dict(kernel_size=3, append=append))]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("old,new,args,kwargs", _deprecated_cases(), ids=[c[0] for c in _deprecated_cases()])
def test_deprecated_names_warn_and_return_the_same(old, new, args, kwargs, backend):
    assert old not in ops.__all__ and new in ops.__all__
    with ops.use_backend(backend):
        with pytest.warns(DeprecationWarning, match=rf"torchsan\.ops\.{old} is deprecated; use torchsan\.ops\.{new}$"
                          ) as record:
            got = getattr(ops, old)(*args, **kwargs)
        expected = getattr(ops, new)(*args, **kwargs)
    assert record[0].filename == __file__  # the warning points at the caller
    assert getattr(ops, old).__name__ == old
    assert_identical(got, expected)
