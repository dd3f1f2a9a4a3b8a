"""The model layer as a timm user sees it: registration, the paper's sizes, the timm contract,
small inputs, the ablation options and gradients.

The paper's figures (Zhao, Jia, Koltun, CVPR 2020, Table 1) are written out here, not imported
from ``torchsan.profile``: they are the independent truth the models are checked against.
Everything except the parameter/MAC counts runs at small widths and 28-64 px, so the module is fast
on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import torchsan
from torchsan.layers import Aggregation, PairwiseSelfAttention
from torchsan.models import MODEL_NAMES
from torchsan.profile import profile_model

# Table 1 of the paper, 224 px: parameters (M, as printed) and GMACs (authors' counting rules).
PAPER_PARAMS_M = {
    "san10_pairwise": 10.5, "san10_patchwise": 11.8,
    "san15_pairwise": 14.1, "san15_patchwise": 16.2,
    "san19_pairwise": 17.6, "san19_patchwise": 20.5,
    "san_resnet26": 13.7, "san_resnet38": 19.6, "san_resnet50": 25.6,
}
PAPER_GMACS = {
    "san10_pairwise": 2.2, "san10_patchwise": 1.9,
    "san15_pairwise": 3.0, "san15_patchwise": 2.6,
    "san19_pairwise": 3.8, "san19_patchwise": 3.3,
    "san_resnet26": 2.4, "san_resnet38": 3.2, "san_resnet50": 4.1,
}
SLOW_PROFILES = {"san15_pairwise", "san15_patchwise", "san19_pairwise", "san19_patchwise"}

# Small SANs: one block per stage, widths 16..64 (mid = C/4 = 4..16 channels, so share_planes=4
# keeps C/4 divisible by the sharing), and the ResNet with one bottleneck per stage.
SMALL_SAN = dict(widths=(16, 32, 32, 64, 64), stem_width=16, layers=(1, 1, 1, 1, 1), share_planes=4)
SMALL_RESNET = dict(layers=(1, 1, 1, 1))
SAN_WIDTHS = list(SMALL_SAN["widths"])
RESNET_WIDTHS = [64, 256, 512, 1024, 2048]

# (name, kwargs) of the three models the timm contract is checked on. SANs use small_input so that
# 32-64 px inputs fit the 7x7 reflect-padded footprints.
CONTRACT_MODELS = [
    pytest.param("san10_pairwise", dict(SMALL_SAN, small_input=True), id="san_pairwise"),
    pytest.param("san10_patchwise", dict(SMALL_SAN, small_input=True), id="san_patchwise"),
    pytest.param("san_resnet26", dict(SMALL_RESNET), id="resnet"),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threading only costs here (and thrashes on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paper_model():
    """Build each full-size default model once per module: ``paper_model(name)``."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = timm.create_model(name).eval()
        return cache[name]

    yield get
    cache.clear()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def calibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BN's running stats to the batch stats of ``x``, then switch to eval mode, so that
    eval-mode outputs are well scaled (and depend on the running stats)."""
    momenta = {}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            momenta[m] = m.momentum
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in momenta.items():
        m.momentum = momentum
    return model.eval()


# --------------------------------------------------------------------------------------------------
# 1. Registration with timm
# --------------------------------------------------------------------------------------------------
def test_model_names_are_the_nine_paper_models():
    assert set(MODEL_NAMES) == set(PAPER_PARAMS_M)
    assert len(MODEL_NAMES) == 9


def test_registered_with_timm():
    listed = set(timm.list_models("san*"))
    assert set(MODEL_NAMES) <= listed
    for name in MODEL_NAMES:
        assert timm.is_model(name)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_create_model_works(name, paper_model):
    model = paper_model(name)
    expected = torchsan.models.ResNet if "resnet" in name else torchsan.models.SAN
    assert isinstance(model, expected)
    assert model.num_classes == 1000
    assert model.pretrained_cfg["architecture"] == name


def test_timm_resnet26_is_untouched(paper_model):
    theirs = timm.create_model("resnet26")
    assert not isinstance(theirs, torchsan.models.ResNet)
    # timm's resnet26 is a (2, 2, 2, 2) bottleneck net of 16.0M parameters; the paper's is 13.7M.
    assert round(n_params(theirs) / 1e6, 1) == 16.0
    assert n_params(theirs) != n_params(paper_model("san_resnet26"))


# --------------------------------------------------------------------------------------------------
# 2-3. The paper's parameter counts and MACs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_params_match_paper(name, paper_model):
    params = n_params(paper_model(name))
    assert round(params / 1e6, 1) == PAPER_PARAMS_M[name], f"{name}: {params / 1e6:.3f}M"


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PROFILES else n for n in MODEL_NAMES]
)
def test_gmacs_match_paper(name, paper_model):
    model = paper_model(name)
    prof = profile_model(model, (3, 224, 224))
    assert prof.params == n_params(model)
    assert prof.gmacs == pytest.approx(PAPER_GMACS[name], rel=0.05), f"{name}: {prof.gmacs:.3f} GMACs"
    assert not model.training  # profile_model restores the mode it found


def test_profile_counts_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, kernel_size=1, bias=True), nn.BatchNorm2d(4), nn.ReLU())
    prof = profile_model(model, (3, 5, 5))
    positions = 5 * 5
    conv = positions * (1 * 1 * 3) * 4 + 4 * positions  # 300 multiply-adds + 100 bias adds
    bn = 2 * 4 * positions  # scale and shift per element
    relu = 4 * positions
    assert (conv, bn, relu) == (400, 200, 100)
    assert prof.macs == conv + bn + relu == 700
    assert prof.macs_by_type == {"Conv2d": 400, "BatchNorm2d": 200, "ReLU": 100}
    assert prof.params == (3 * 4 + 4) + (4 + 4) == 24


def test_profile_restores_training_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    profile_model(model, (3, 4, 4))
    assert model.training


class _AggregateFixedWeights(nn.Module):
    """x (1, 8, 6, 6) -> Aggregation(x, fixed weights (1, 2, 9, 36)): the only counted op."""

    def __init__(self) -> None:
        super().__init__()
        self.aggregation = Aggregation(kernel_size=3)
        self.register_buffer("weight", torch.rand(1, 2, 9, 36))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregation(x, self.weight)


def test_profile_counts_aggregation_as_output_times_k():
    prof = profile_model(_AggregateFixedWeights(), (8, 6, 6))
    assert prof.params == 0
    assert prof.macs == (8 * 6 * 6) * 9 == 2592
    assert prof.macs_by_type == {"Aggregation": 2592}


# --------------------------------------------------------------------------------------------------
# 4. timm's model contract, at small widths
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs", CONTRACT_MODELS)
def test_num_classes_in_chans_and_heads(name, kwargs):
    model = timm.create_model(name, num_classes=7, in_chans=1, **kwargs).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        head = model.forward_head(features)
    assert logits.shape == (2, 7)
    assert model.num_classes == 7 and model.in_chans == 1
    assert features.dim() == 4 and features.shape[:2] == (2, model.num_features)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(head, logits)
    torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))
    assert model.num_features == (SAN_WIDTHS if "san1" in name else RESNET_WIDTHS)[-1]
    with pytest.raises(ValueError):
        model(torch.randn(2, 3, 32, 32))  # 3 channels into an in_chans=1 model


@pytest.mark.parametrize("name,kwargs", CONTRACT_MODELS)
def test_classifier_reset(name, kwargs):
    model = timm.create_model(name, num_classes=7, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear)
    assert (classifier.in_features, classifier.out_features) == (model.num_features, 7)

    model.reset_classifier(5)
    assert model.num_classes == 5
    assert model.get_classifier().out_features == 5
    with torch.no_grad():
        assert model(x).shape == (2, 5)

    model.reset_classifier(0)
    assert model.num_classes == 0
    with torch.no_grad():
        out = model(x)
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    assert out.shape == (2, model.num_features)
    torch.testing.assert_close(out, expected)

    model.reset_classifier(3, global_pool="catavgmax")  # timm's doubled-width pooling
    with torch.no_grad():
        assert model(x).shape == (2, 3)
    assert model.get_classifier().in_features == 2 * model.num_features


@pytest.mark.parametrize("name,kwargs", CONTRACT_MODELS)
def test_pretrained_cfg_names_existing_modules(name, kwargs):
    model = timm.create_model(name, **kwargs)
    cfg = model.pretrained_cfg
    assert model.default_cfg == cfg
    assert cfg["architecture"] == name
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["num_classes"] == 1000
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    first_conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    classifier = model.get_submodule(cfg["classifier"])
    assert classifier is model.get_classifier()
    assert isinstance(classifier, nn.Linear) and classifier.out_features == 1000
    # The first conv is the very first parameterised module: what timm adapts for in_chans != 3.
    assert next(n for n, p in model.named_parameters()).startswith(cfg["first_conv"] + ".")


@pytest.mark.parametrize("name,kwargs", CONTRACT_MODELS)
def test_grad_checkpointing_same_output_and_gradients(name, kwargs, monkeypatch):
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=5, **kwargs).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)

    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kw):
        calls.append(1)
        return real_checkpoint(*args, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    x = torch.randn(2, 3, 32, 32)
    target = torch.randn(2, 5)
    out_plain = plain(x)
    assert not calls
    out_ckpt = ckpt(x)
    assert calls, "set_grad_checkpointing(True) did not checkpoint anything"
    torch.testing.assert_close(out_ckpt, out_plain)

    (out_plain * target).sum().backward()
    (out_ckpt * target).sum().backward()
    grads_ckpt = dict(ckpt.named_parameters())
    for pname, p in plain.named_parameters():
        q = grads_ckpt[pname]
        assert p.grad is not None and q.grad is not None, pname
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, pname=pname: f"{pname}: {m}")

    ckpt.set_grad_checkpointing(False)
    calls.clear()
    with torch.no_grad():
        ckpt(x)
    assert not calls


def _feature_cases():
    # SAN, ImageNet pooling (stride 32): at 64 px the last stages are 4 and 2 px, so the 7x7
    # footprint needs zero padding; SAN small_input: pools only before stages 1 and 2.
    yield pytest.param("san10_pairwise", dict(SMALL_SAN, pad_mode="zeros"), SAN_WIDTHS, [2, 4, 8, 16, 32],
                       id="san_pairwise_zeros")
    yield pytest.param("san10_patchwise", dict(SMALL_SAN, small_input=True), SAN_WIDTHS, [1, 2, 4, 4, 4],
                       id="san_patchwise_small_input")
    yield pytest.param("san_resnet26", dict(SMALL_RESNET), RESNET_WIDTHS, [2, 4, 8, 16, 32], id="resnet")
    yield pytest.param("san_resnet26", dict(SMALL_RESNET, small_input=True), RESNET_WIDTHS, [1, 1, 2, 4, 8],
                       id="resnet_small_input")


@pytest.mark.parametrize("name,kwargs,channels,reductions", list(_feature_cases()))
def test_features_only(name, kwargs, channels, reductions):
    torch.manual_seed(0)
    plain = timm.create_model(name, **kwargs).eval()
    assert [f["num_chs"] for f in plain.feature_info] == channels
    assert [f["reduction"] for f in plain.feature_info] == reductions
    for info in plain.feature_info:
        plain.get_submodule(info["module"])  # names a module that exists

    torch.manual_seed(0)  # same initialisation as ``plain``
    backbone = timm.create_model(name, features_only=True, **kwargs).eval()
    assert backbone.feature_info.channels() == channels
    assert backbone.feature_info.reduction() == reductions
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = backbone(x)
        last = plain.forward_features(x)
    assert len(maps) == 5
    for fmap, c, r in zip(maps, channels, reductions, strict=True):
        assert fmap.shape == (2, c, 64 // r, 64 // r)
    torch.testing.assert_close(maps[-1], last)  # the last map is the classifier's forward_features


def test_features_only_out_indices():
    backbone = timm.create_model("san10_pairwise", features_only=True, out_indices=(1, 3),
                                 **dict(SMALL_SAN, small_input=True)).eval()
    assert backbone.feature_info.channels() == [32, 64]
    assert backbone.feature_info.reduction() == [2, 4]
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 16, 16), (1, 64, 8, 8)]


@pytest.mark.parametrize("name,kwargs", CONTRACT_MODELS)
def test_deepcopy_and_state_dict_round_trip(name, kwargs):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = calibrate_bn(timm.create_model(name, num_classes=5, **kwargs), x)
    with torch.no_grad():
        ref = model(x)
        clone = copy.deepcopy(model)
        assert all(p is not q for p, q in zip(clone.parameters(), model.parameters()))
        torch.testing.assert_close(clone(x), ref)

        torch.manual_seed(1)
        fresh = timm.create_model(name, num_classes=5, **kwargs).eval()
        assert not torch.allclose(fresh(x), ref)  # different init and running stats
        state = model.state_dict()
        result = fresh.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert fresh.state_dict().keys() == state.keys()
        torch.testing.assert_close(fresh(x), ref)


# --------------------------------------------------------------------------------------------------
# 5. Small inputs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("chans", [1, 3])
def test_small_input_san_trains(sa_type, size, chans):
    model = timm.create_model(f"san10_{sa_type}", small_input=True, in_chans=chans, num_classes=10,
                              **SMALL_SAN).train()
    x = torch.randn(2, chans, size, size)
    features = model.forward_features(x)
    assert features.shape == (2, 64, size // 4, size // 4)  # output stride 4
    logits = model.forward_head(features)
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 7])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_imagenet_configuration_rejects_small_input(sa_type):
    model = timm.create_model(f"san10_{sa_type}", **SMALL_SAN)
    with pytest.raises(ValueError, match="small_input"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="small_input"):
        model(torch.randn(1, 3, 64, 64))  # stage 4 at 2 px still too small for 7x7
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 128, 128)).shape == (1, 1000)  # stage 4 at 4 px fits


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_small_input_has_a_floor(sa_type):
    model = timm.create_model(f"san10_{sa_type}", small_input=True, **SMALL_SAN)
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 12, 12))  # stage 2 at 3 px < 4 px needed by the 7x7 footprint
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 1000)


def test_small_input_resnet():
    model = timm.create_model("san_resnet26", small_input=True, num_classes=10, **SMALL_RESNET).train()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 2048, 4, 4)
    model.forward_head(features).sum().backward()
    conv1 = model.get_submodule(model.pretrained_cfg["first_conv"])
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_zero_padding_accepts_small_input(sa_type):
    # ImageNet pooling (five 2x2 pools): at 32 px stage 4 runs at 1x1, fine with zero padding.
    model = timm.create_model(f"san10_{sa_type}", pad_mode="zeros", num_classes=4, **SMALL_SAN).train()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 64, 1, 1)
    model.forward_head(features).sum().backward()


def test_huge_zero_padded_footprint_is_refused_before_it_allocates():
    """Zero padding admits any kernel_size; 4001 at 64 px gathers K = 16 million taps per pixel (the position grid's
    alone is half a terabyte): a clear ValueError at the first forward instead of an allocation attempt."""
    model = timm.create_model("san10_pairwise", small_input=True, pad_mode="zeros", num_classes=4,
                              **dict(SMALL_SAN, kernels=(4001, 3, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"kernel_size=4001 .* gathers K = 16008001 taps .* more than the"):
        model(torch.randn(2, 3, 64, 64))


def test_zero_padding_too_small_raises_value_error():
    model = timm.create_model("san10_pairwise", pad_mode="zeros", **SMALL_SAN).eval()
    with pytest.raises(ValueError, match="too small"), torch.no_grad():
        model(torch.randn(2, 3, 16, 16))  # the fifth pool would make the 1x1 map 0x0


def _empty_batch_models():
    for relation in ("summation", "subtraction", "concatenation", "hadamard", "dot"):
        yield pytest.param("san10_pairwise", dict(SMALL_SAN, relation=relation), id=f"pairwise-{relation}")
    for relation in ("star", "clique", "concatenation"):
        yield pytest.param("san10_patchwise", dict(SMALL_SAN, relation=relation), id=f"patchwise-{relation}")
    yield pytest.param("san10_patchwise", {}, id="san10_patchwise-full-width")
    yield pytest.param("san_resnet26", dict(SMALL_RESNET), id="resnet")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,kwargs", list(_empty_batch_models()))
def test_empty_batch(name, kwargs, training):
    """A batch of 0 gives (0, num_classes) for every relation, forward and backward, in eval and training mode (where
    the fused routes step aside for torch's modules, which define it)."""
    model = timm.create_model(name, num_classes=10, in_chans=1, small_input=True, **kwargs).train(training)
    x = torch.randn(0, 1, 16, 16, requires_grad=True)
    y = model(x)
    assert y.shape == (0, 10)
    y.sum().backward()
    assert x.grad.shape == x.shape
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_on_meta_tensors(name):
    """Shape checking without allocating: each model built on the meta device maps a meta batch to (N, num_classes)
    meta logits, in training and eval mode, with backward, also inside a CPU autocast region."""
    with torch.device("meta"):
        model = timm.create_model(name, small_input=True, num_classes=10)
    assert all(p.device.type == "meta" for p in model.parameters())
    for training, autocast in ((True, False), (False, False), (True, True)):
        region = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with region:
            y = model.train(training)(torch.empty(2, 3, 32, 32, device="meta"))
        assert y.device.type == "meta" and y.shape == (2, 10) and y.dtype == torch.float32, (training, autocast)
        if training:
            y.sum().backward()
            assert model.fc.weight.grad.device.type == "meta"


# --------------------------------------------------------------------------------------------------
# 6. Ablation options through the constructor
# --------------------------------------------------------------------------------------------------
def _ablations():
    for relation in ("summation", "subtraction", "concatenation", "hadamard", "dot"):
        yield pytest.param("pairwise", dict(relation=relation), id=f"pairwise-{relation}")
    for relation in ("star", "clique", "concatenation"):
        yield pytest.param("patchwise", dict(relation=relation), id=f"patchwise-{relation}")
    yield pytest.param("pairwise", dict(position_encoding=False), id="pairwise-no-position")
    for sa_type in ("pairwise", "patchwise"):
        for mapping in ("L", "R-L", "L-R-L", "R-L-R-L"):
            yield pytest.param(sa_type, dict(mapping=mapping), id=f"{sa_type}-mapping-{mapping}")
        yield pytest.param(sa_type, dict(transform="separate"), id=f"{sa_type}-separate")
        yield pytest.param(sa_type, dict(transform="shared_phi_psi"), id=f"{sa_type}-shared_phi_psi")
        yield pytest.param(sa_type, dict(transform="shared_all", rel_reduction=4, mid_reduction=4),
                           id=f"{sa_type}-shared_all")
        yield pytest.param(sa_type, dict(kernels=(5, 5, 5, 5, 5)), id=f"{sa_type}-kernel5")
        yield pytest.param(sa_type, dict(kernels=(3, 9, 9, 9, 9)), id=f"{sa_type}-kernel9")


@pytest.mark.parametrize("sa_type,options", list(_ablations()))
def test_ablation_builds_and_trains(sa_type, options):
    model = timm.create_model(f"san10_{sa_type}", small_input=True, num_classes=3,
                              **dict(SMALL_SAN, **options)).train()
    attn = model.stages[1].blocks[0].attn
    for key, value in options.items():
        if key == "kernels":
            assert attn.kernel_size == value[1]
        elif key in ("relation", "transform", "position_encoding"):
            assert getattr(attn, key) == value
    if options.get("transform") == "shared_phi_psi":
        assert attn.psi is None and attn.beta is not None
    if options.get("transform") == "shared_all":
        assert attn.psi is None and attn.beta is None
    if "mapping" in options:
        n_linear = sum(isinstance(m, nn.Conv2d) for m in attn.gamma)
        assert n_linear == options["mapping"].count("L")
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 2])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize(
    "sa_type,options,match",
    [
        pytest.param("pairwise", dict(relation="star"), "relation", id="pairwise-patchwise-relation"),
        pytest.param("pairwise", dict(relation="cosine"), "relation", id="pairwise-unknown-relation"),
        pytest.param("patchwise", dict(relation="subtraction"), "relation", id="patchwise-pairwise-relation"),
        pytest.param("pairwise", dict(mapping="X-L"), "mapping", id="mapping-X-L"),
        pytest.param("pairwise", dict(mapping="L-R"), "mapping", id="mapping-not-ending-in-L"),
        pytest.param("patchwise", dict(mapping=""), "mapping", id="mapping-empty"),
        pytest.param("pairwise", dict(transform="shared_all"), "shared_all", id="shared_all-r1-ne-r2"),
        pytest.param("patchwise", dict(transform="shared_all", rel_reduction=8), "shared_all",
                     id="patchwise-shared_all-r1-ne-r2"),
        pytest.param("pairwise", dict(transform="tied"), "transform", id="unknown-transform"),
        pytest.param("patchwise", dict(position_encoding=False), "position_encoding",
                     id="patchwise-position_encoding"),
        pytest.param("pairwise", dict(kernels=(3, 7, 7)), "one entry per stage", id="kernels-length"),
        pytest.param("pairwise", dict(kernels=(3, 6, 7, 7, 7)), "odd", id="even-kernel"),
        pytest.param("pairwise", dict(stage_pools=(True, True)), "stage_pools", id="stage_pools-length"),
        pytest.param("pairwise", dict(share_planes=8), "share_planes", id="share_planes-indivisible"),
        pytest.param("cosine", {}, "sa_type", id="unknown-sa_type"),
    ],
)
def test_bad_options_raise_value_error(sa_type, options, match):
    kwargs = dict(SMALL_SAN, small_input=True)
    kwargs.update(options)
    with pytest.raises(ValueError, match=match):
        torchsan.models.SAN(sa_type=sa_type, **kwargs)


# --------------------------------------------------------------------------------------------------
# 7. Every parameter gets a gradient
# --------------------------------------------------------------------------------------------------
GRAD_MODELS = [
    pytest.param("san10_pairwise", dict(SMALL_SAN, small_input=True), id="san_pairwise"),
    pytest.param("san10_pairwise", dict(SMALL_SAN, small_input=True, pad_mode="zeros"), id="san_pairwise_zeros"),
    pytest.param("san10_pairwise", dict(SMALL_SAN, small_input=True, relation="concatenation", mapping="L-R-L",
                                        transform="shared_phi_psi", position_encoding=False),
                 id="san_pairwise_ablated"),
    pytest.param("san10_patchwise", dict(SMALL_SAN, small_input=True), id="san_patchwise"),
    pytest.param("san_resnet26", dict(SMALL_RESNET, small_input=True), id="resnet"),
]


def structurally_dead(model: nn.Module) -> set[str]:
    """Parameters whose gradient is exactly zero by construction (the authors' design, kept for
    their checkpoints and parameter counts):

    * pairwise ``gamma``'s last bias: one constant per weight channel over the K neighbours, which
      the softmax over K removes;
    * ``pos_proj.bias`` with reflect padding: p_i - p_j cancels it (every neighbour, reflected or
      not, is some pixel's projection); zero padding does not cancel it at the border.
    """
    dead = set()
    for prefix, m in model.named_modules():
        if isinstance(m, PairwiseSelfAttention):
            dead.add(f"{prefix}.gamma.{len(m.gamma) - 1}.bias")
            if m.position_encoding and m.aggregation.pad_mode == "reflect":
                dead.add(f"{prefix}.pos_proj.bias")
    return dead


@pytest.mark.parametrize("name,kwargs", GRAD_MODELS)
def test_every_parameter_gets_a_gradient(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, **kwargs).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)  # small_input: stages at 16, 8, 4, 4, 4 px
    y = torch.tensor([0, 1, 2, 3])

    # Training mode: every tensor gets a finite gradient, every weight a non-zero one. (Biases in
    # front of a BN, e.g. phi/psi/proj, legitimately get ~0 here: batch statistics cancel them.)
    F.cross_entropy(model.train()(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} is not used"
        assert torch.isfinite(p.grad).all(), pname
        if pname.endswith(".weight"):
            assert p.grad.abs().max() > 0, f"{pname} gets an all-zero gradient"

    # Eval mode with calibrated running stats: BN no longer cancels biases, so every parameter but
    # the structurally dead ones must matter.
    model.zero_grad(set_to_none=True)
    calibrate_bn(model, x)
    F.cross_entropy(model(x), y).backward()
    grads = {pname: p.grad.abs().max().item() for pname, p in model.named_parameters()}
    scale = max(grads.values())
    dead = structurally_dead(model)
    assert dead <= grads.keys()
    for pname, g in grads.items():
        if pname in dead:
            assert g <= 1e-9 * scale, f"{pname}: expected no gradient by construction, got {g:.3g}"
        else:
            assert g > 1e-6 * scale, f"{pname}: gradient {g:.3g} vs largest {scale:.3g}: unused?"


def test_zero_init_last_makes_blocks_identity():
    import timm

    tiny = dict(small_input=True, num_classes=3, layers=[1, 1, 1, 1, 1], widths=[16, 16, 32, 32, 32], stem_width=8,
                share_planes=4)
    san = timm.create_model("san10_pairwise", zero_init_last=True, **tiny)
    block = san.stages[1].blocks[0].eval()
    x = torch.randn(2, 16, 9, 9)
    assert torch.equal(block(x), x)  # residual branch is exactly zero at init
    plain = timm.create_model("san10_pairwise", **tiny)
    assert not torch.equal(plain.stages[1].blocks[0].eval()(x), x)
    resnet = timm.create_model("san_resnet26", zero_init_last=True)
    assert all(not m.bn3.weight.detach().any() for m in resnet.modules() if hasattr(m, "bn3"))


# --------------------------------------------------------------------------------------------------
# 8. Intermediate features: forward_intermediates, prune_intermediate_layers, features_only
# --------------------------------------------------------------------------------------------------
def _stages_one_by_one(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The stage outputs at their own resolutions and the final features, from the modules run one by one: the
    stem (conv, BN, ReLU, its pool), then each stage's transition, blocks, BN and ReLU (the intermediate), then
    its pool (the next stage's downsampling)."""
    stem = model.stem
    with torchsan.ops.fusion(False):
        x = stem.pool(stem.act(stem.bn(stem.conv(x))))
        outs = []
        for stage in model.stages:
            outs.append(stage.act(stage.norm(stage.blocks(stage.transition(x)))))
            x = stage.pool(outs[-1])
    return x, outs


def _random_eval_san(sa_type: str, **kwargs) -> nn.Module:
    model = timm.create_model(f"san10_{sa_type}", **dict(SMALL_SAN, **kwargs)).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # random running statistics and affine maps
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.5)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                m.bias.copy_(torch.randn_like(m.bias) * 0.5)
    return model.eval()


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
@pytest.mark.parametrize("kwargs,size,reductions", [
    (dict(small_input=True), (32, 30), [1, 2, 4, 4, 4]),
    (dict(pad_mode="zeros"), (64, 66), [2, 4, 8, 16, 32]),
    (dict(stage_pools=(False, True, False, True, False), small_input=True), (33, 35), [1, 2, 2, 4, 4]),
], ids=["small_input", "imagenet_zeros", "odd"])
def test_forward_intermediates_are_the_stage_outputs(sa_type, kwargs, size, reductions):
    model = _random_eval_san(sa_type, **kwargs)
    assert [f["reduction"] for f in model.feature_info] == reductions
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        expected_final, expected = _stages_one_by_one(model, x)
        features = model.forward_features(x)
    assert len(intermediates) == 5
    for t, (got, want, r) in enumerate(zip(intermediates, expected, reductions, strict=True)):
        assert got.shape == (2, SAN_WIDTHS[t], size[0] // r, size[1] // r), t
        torch.testing.assert_close(got, want, msg=f"stage {t}")
    torch.testing.assert_close(final, expected_final)
    torch.testing.assert_close(features, expected_final)


def test_forward_intermediates_indices_and_options():
    model = _random_eval_san("pairwise", small_input=True)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        final, every = model.forward_intermediates(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        some = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        early_final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
        late_final, late = model.forward_intermediates(x, indices=[1], norm=True)  # (norm: nothing to apply)
    assert len(last_two) == 2 and len(some) == 2 and len(early) == len(late) == 1
    for got, t in [(last_two[0], 3), (last_two[1], 4), (some[0], 0), (some[1], 2), (early[0], 1), (late[0], 1)]:
        torch.testing.assert_close(got, every[t])
    torch.testing.assert_close(late_final, final)  # every stage ran
    torch.testing.assert_close(early_final, model.stages[1].pool(every[1]))  # stopped after stage 1 (and its pool)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("indices,kept", [((1, 3), [1, 3]), (2, [3, 4]), ([0], [0])], ids=str)
def test_prune_intermediate_layers(indices, kept):
    model = _random_eval_san("patchwise", small_input=True)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        _, every = model.forward_intermediates(x)
    assert model.prune_intermediate_layers(indices) == kept
    assert len(model.stages) == kept[-1] + 1
    assert isinstance(model.stages[-1].pool, nn.Identity)  # it pooled for a stage that is gone
    assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), every[kept[-1]])
        pruned = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    for got, t in zip(pruned, kept, strict=True):
        torch.testing.assert_close(got, every[t])


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_features_only_maps_are_the_stage_outputs(sa_type):
    kwargs = dict(SMALL_SAN, small_input=True)
    torch.manual_seed(0)
    plain = timm.create_model(f"san10_{sa_type}", **kwargs).eval()
    torch.manual_seed(0)  # same initialisation as ``plain``
    backbone = timm.create_model(f"san10_{sa_type}", features_only=True, out_indices=(1, 3), **kwargs).eval()
    x = torch.randn(2, 3, 32, 30)
    with torch.no_grad():
        maps = backbone(x)
        _, expected = _stages_one_by_one(plain, x)
    assert len(maps) == 2
    for got, t in zip(maps, (1, 3)):
        torch.testing.assert_close(got, expected[t], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# 9. torch.compile: one graph (no break at the fused ops or their backward), eager's results
# --------------------------------------------------------------------------------------------------
COMPILE_SAN = dict(num_classes=5, widths=(16, 32, 32, 64, 64), stem_width=16, share_planes=4, layers=(1, 1, 1, 1, 1))


def _compile(model: nn.Module, graphs: list) -> nn.Module:
    """torch.compile(model, fullgraph=True) (a graph break fails) through aot_eager, keeping dynamo's graphs."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, backend=backend)


def _torchsan_ops(graphs: list) -> set[str]:
    """The torch.ops.torchsan ops in the traced graphs."""
    names = (str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function")
    return {name.split(".")[1] for name in names if name.startswith("torchsan.")}


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_torch_compile_fullgraph_matches_eager(sa_type, monkeypatch):
    from torchsan.ops._cpu import _build

    # As in a fresh process: the extension is (re)loaded while the graph is traced.
    monkeypatch.setattr(_build, "_ext", None)
    monkeypatch.setattr(_build, "_error", None)
    model = timm.create_model(f"san10_{sa_type}", small_input=True, **COMPILE_SAN).eval()
    x = torch.randn(2, 3, 16, 16)
    graphs = []
    compiled = _compile(model, graphs)
    with torchsan.ops.use_backend("cpu"), torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    traced = _torchsan_ops(graphs)
    assert "affine_relu_maxpool2x2" in traced  # the stage boundaries, fused in the graph too
    # pairwise: the relation gathered, the softmax not written; patchwise: its whole mapping as the inference op
    # (eval, no gradient)
    assert {"softmax_aggregation_inference", "subtraction2"} <= traced if sa_type == "pairwise" else {
        "aggregation", "patchwise_weights_inference"} <= traced


def _check_compiled_training_step(model: nn.Module, eager: nn.Module, x: torch.Tensor) -> set[str]:
    """One training step of torch.compile(model) against eager's on a copy: outputs, gradients and BN running
    statistics. Returns the torchsan ops in the compiled graph."""
    graphs = []
    compiled = _compile(model, graphs)
    with torchsan.ops.use_backend("cpu"):
        y = compiled(x)
        y.square().sum().backward()
        y_eager = eager(x)
        y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-4)
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)
    for a, b in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)
    return _torchsan_ops(graphs)


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_torch_compile_training_step_matches_eager(sa_type):
    # Training mode: the fused BN-with-batch-statistics ops (gamma, stage boundaries) inside one graph, BN running
    # statistics updated in it, gradients equal to eager's.
    kwargs = dict(COMPILE_SAN, stage_pools=(True, True, True, False, False))
    model = timm.create_model(f"san10_{sa_type}", **kwargs).train()
    eager = timm.create_model(f"san10_{sa_type}", **kwargs).train()
    eager.load_state_dict(model.state_dict())
    traced = _check_compiled_training_step(model, eager, torch.randn(2, 3, 36, 34))
    assert {"batchnorm_relu_maxpool2x2", "batchnorm_relu_conv1x1"} <= traced
    if sa_type == "pairwise":  # stage 0 runs at 18 x 17 px: its relation is gathered straight into gamma
        assert "subtraction2_batchnorm_relu_conv1x1" in traced


def test_torch_compile_pairwise_layer_with_fused_relation_matches_eager():
    # A training step of a pairwise layer whose relation is fused into gamma, traced into one graph.
    from torchsan.ops import _cpu

    assert 28 * 28 >= _cpu.SUBTRACTION2_CONV1X1_MIN_POSITIONS
    layer = PairwiseSelfAttention(8, 2, 8, share_planes=2, kernel_size=3).train()
    eager = PairwiseSelfAttention(8, 2, 8, share_planes=2, kernel_size=3).train()
    eager.load_state_dict(layer.state_dict())
    traced = _check_compiled_training_step(layer, eager, torch.randn(2, 8, 28, 28))
    assert "subtraction2_batchnorm_relu_conv1x1" in traced


@pytest.mark.parametrize("width", [0.5, 0.25])
def test_width_keeps_the_parameter_ratio(width):
    """One width option for both families: SAN10 pairwise over ResNet26 keeps its parameter ratio (params grow with
    the square of the width), and the narrow models run, with feature_info that matches their stages."""

    def params(model):
        return sum(p.numel() for p in model.parameters())

    san, resnet = (timm.create_model(name, num_classes=10, small_input=True) for name in ("san10_pairwise",
                                                                                          "san_resnet26"))
    narrow_san, narrow_resnet = (timm.create_model(name, num_classes=10, small_input=True, width=width)
                                 for name in ("san10_pairwise", "san_resnet26"))
    assert params(narrow_san) < params(san) * width * 1.5 and params(narrow_resnet) < params(resnet) * width * 1.5
    assert params(narrow_san) / params(narrow_resnet) == pytest.approx(params(san) / params(resnet), rel=0.03)
    x = torch.randn(2, 3, 16, 16)
    for model in (narrow_san, narrow_resnet):
        assert model(x).shape == (2, 10)
        features = timm.create_model(model.default_cfg["architecture"], small_input=True, width=width,
                                     features_only=True)(x)
        assert [f.shape[1] for f in features] == [info["num_chs"] for info in model.feature_info]
    with pytest.raises(ValueError, match="width must be > 0"):
        timm.create_model("san_resnet26", width=0)
