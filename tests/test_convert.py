"""The authors' checkpoints (github.com/hszhao/SAN ``model_best.pth``) load into our models.

The oracle is ``AuthorSAN`` below: an independent, compact re-implementation of the authors'
architecture written from the maths in DESIGN.md sections 1-2, with exactly the authors'
parameter names (``conv_in``, ``bn_in``, ``conv0..4``, ``bn0..4``, ``layer0..4``, ``fc``; block
``bn1``, ``sam``, ``bn2``, ``conv``; attention ``conv1`` (phi), ``conv2`` (psi), ``conv3`` (beta),
``conv_w`` (gamma), ``conv_p`` (position)). Its neighbour gather and position grid are
``oracle.neighbours`` and ``oracle.position`` (plain ``F.pad(reflect)`` + ``F.unfold``, not
``torchsan.ops``). A tiny randomised instance is saved the way the authors' training script saves it
(``{"epoch", "state_dict" with DDP's "module." prefix, "top1_val"}``) and loaded into our model three
ways: timm's ``pretrained_cfg_overlay=dict(file=...)``, our ``checkpoint_filter_fn`` +
``load_state_dict(strict=True)``, and ``torchsan.models.load_checkpoint``.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck as TVBottleneck
from torchvision.models.resnet import ResNet as TVResNet

import oracle
from oracle import neighbours, position
from torchsan.cli import main
from torchsan.models import load_checkpoint
from torchsan.models import resnet as our_resnet
from torchsan.models import san as our_san

# A small SAN: 5 stages of one block, default footprints (3, 7, 7, 7, 7), interleaved sharing
# (share 8 -> 2 or 4 weight channels). 128x160 px: five poolings leave 4x5 px, enough for the 7x7
# reflect-padded footprint, and H != W catches a transposed position grid.
TINY = dict(layers=(1, 1, 1, 1, 1), widths=(64, 64, 128, 128, 256), stem_width=32, num_classes=7)
TINY_INPUT = (2, 3, 128, 160)


# --------------------------------------------------------------------------------------------------
# The oracle: the authors' architecture and names, from the maths.
# --------------------------------------------------------------------------------------------------
class AuthorSAM(nn.Module):
    """Pairwise (subtraction + position) or patchwise (concatenation) self-attention, stride 1."""

    def __init__(self, sa_type: str, in_planes: int, rel_planes: int, mid_planes: int, share_planes: int,
                 kernel_size: int) -> None:
        super().__init__()
        self.sa_type, self.kernel_size = sa_type, kernel_size
        area, wc = kernel_size * kernel_size, mid_planes // share_planes
        self.conv1 = nn.Conv2d(in_planes, rel_planes, 1)
        self.conv2 = nn.Conv2d(in_planes, rel_planes, 1)
        self.conv3 = nn.Conv2d(in_planes, mid_planes, 1)
        if sa_type == "pairwise":
            d, hidden, out = rel_planes + 2, rel_planes, wc
            self.conv_p = nn.Conv2d(2, 2, 1)
        else:
            d, hidden, out = rel_planes * (area + 1), wc, area * wc
        self.conv_w = nn.Sequential(
            nn.BatchNorm2d(d), nn.ReLU(), nn.Conv2d(d, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        k, area, length = self.kernel_size, self.kernel_size**2, h * w
        phi, psi, beta = self.conv1(x), self.conv2(x), self.conv3(x)
        if self.sa_type == "pairwise":
            relation = phi.view(n, -1, 1, length) - neighbours(psi, k)  # phi(x_i) - psi(x_j)
            p = self.conv_p(position(h, w, x))
            pos = p.view(1, 2, 1, length) - neighbours(p, k)  # p_i - p_j
            z = torch.cat([relation, pos.expand(n, -1, -1, -1)], dim=1)  # (N, rel + 2, K, L)
            weight = torch.softmax(self.conv_w(z), dim=2)  # over K
        else:
            patch = neighbours(psi, k).reshape(n, -1, 1, length)  # channel c * K + k
            z = torch.cat([phi.view(n, -1, 1, length), patch], dim=1)  # (N, rel * (K + 1), 1, L)
            weight = self.conv_w(z).view(n, -1, area, length)  # channel g * K + k -> (g, k)
        mid, wc = beta.shape[1], weight.shape[1]
        # y[n, c, i] = sum_k w[n, c % wc, k, i] * beta[n, c, nbr_k(i)], c = s * wc + g
        values = neighbours(beta, k).view(n, mid // wc, wc, area, length)
        y = (values * weight.view(n, 1, wc, area, length)).sum(dim=3)
        return y.reshape(n, mid, h, w)


class AuthorBlock(nn.Module):
    """x + conv(ReLU(bn2(sam(ReLU(bn1(x))))))."""

    def __init__(self, sa_type: str, planes: int, kernel_size: int, share_planes: int = 8) -> None:
        super().__init__()
        mid = planes // 4
        self.bn1 = nn.BatchNorm2d(planes)
        self.sam = AuthorSAM(sa_type, planes, planes // 16, mid, share_planes, kernel_size)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv = nn.Conv2d(mid, planes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(F.relu(self.bn2(self.sam(F.relu(self.bn1(x))))))


class AuthorSAN(nn.Module):
    """Stem conv_in-bn_in-ReLU; stage t: maxpool 2x2 -> conv{t} -> layer{t} -> bn{t} -> ReLU; avg, fc."""

    def __init__(self, sa_type: str, layers=(2, 1, 2, 4, 1), kernels=(3, 7, 7, 7, 7),
                 widths=(64, 256, 512, 1024, 2048), stem_width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv_in, self.bn_in = nn.Conv2d(3, stem_width, 1, bias=False), nn.BatchNorm2d(stem_width)
        channels = stem_width
        for t, (depth, kernel, width) in enumerate(zip(layers, kernels, widths, strict=True)):
            setattr(self, f"conv{t}", nn.Conv2d(channels, width, 1, bias=False))
            setattr(self, f"bn{t}", nn.BatchNorm2d(width))
            setattr(self, f"layer{t}", nn.Sequential(*[AuthorBlock(sa_type, width, kernel) for _ in range(depth)]))
            channels = width
        self.num_stages = len(layers)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_in(self.conv_in(x)))
        for t in range(self.num_stages):
            x = getattr(self, f"conv{t}")(F.max_pool2d(x, 2, 2))
            x = F.relu(getattr(self, f"bn{t}")(getattr(self, f"layer{t}")(x)))
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and every BN running statistic random (nothing left at zero/one init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
                module.num_batches_tracked.fill_(int(torch.randint(1, 10**6, (1,), generator=gen)))
            elif isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model.eval()


def save_authors_checkpoint(model: nn.Module, path, training_state: bool = True) -> dict[str, torch.Tensor]:
    """As the authors' tool/train.py saves it under DistributedDataParallel: the state dict with
    "module." prefixes beside the epoch, the validation accuracy and (by default) the SGD and
    cosine-schedule states, which ``weights_only=True`` loading must accept."""
    state_dict = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = {"epoch": 3, "state_dict": state_dict, "top1_val": 0.5}
    if training_state:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        for param in model.parameters():
            optimizer.state[param]["momentum_buffer"] = torch.randn_like(param)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
        checkpoint.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), top5_val=0.75)
    torch.save(checkpoint, path)
    return state_dict


def assert_same_outputs(ours: nn.Module, reference: nn.Module, shape=TINY_INPUT, seed: int = 0) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours, reference = ours.double().eval(), reference.double().eval()
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert got.shape == expected.shape
    assert expected.std() > 1e-2, "degenerate outputs would make the comparison vacuous"
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def our_tiny(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, **TINY, **kwargs)


@pytest.fixture(scope="module", params=["pairwise", "patchwise"])
def authors_tiny(request, tmp_path_factory):
    """(sa_type, randomised tiny AuthorSAN, path of its model_best.pth)."""
    sa_type = request.param
    model = randomise(AuthorSAN(sa_type, kernels=(3, 7, 7, 7, 7), **TINY), seed=1 if sa_type == "pairwise" else 2)
    path = tmp_path_factory.mktemp(f"authors_{sa_type}") / "model_best.pth"
    save_authors_checkpoint(model, path)
    return sa_type, model, path


# --------------------------------------------------------------------------------------------------
# The oracle itself
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel_size,height,width", [(3, 5, 6), (5, 7, 4), (7, 8, 9)])
def test_oracle_neighbours_match_the_per_pixel_loop(kernel_size, height, width):
    # oracle.unfold reads each tap with explicit index arithmetic (a single reflection at the border).
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    expected = oracle.unfold(x, kernel_size, 1, kernel_size // 2, 1, "reflect")
    torch.testing.assert_close(neighbours(x, kernel_size), expected, rtol=0, atol=0)


def test_oracle_position_grid_orientation():
    p = position(3, 4, torch.empty(0))
    assert p.shape == (1, 2, 3, 4)
    torch.testing.assert_close(p[0, 0, 2], torch.linspace(-1, 1, 4))  # x along columns
    torch.testing.assert_close(p[0, 1, :, 3], torch.linspace(-1, 1, 3))  # y along rows
    for h in range(3):
        for w in range(4):  # pixel (h, w) at (x, y) = (-1 + 2w / 3, -1 + 2h / 2)
            torch.testing.assert_close(p[0, :, h, w], torch.tensor([-1 + 2 * w / 3, -1 + h]))


# --------------------------------------------------------------------------------------------------
# SAN: three ways in, same outputs as the authors' architecture
# --------------------------------------------------------------------------------------------------
def test_timm_pretrained_file_loads_authors_checkpoint(authors_tiny):
    sa_type, authors, path = authors_tiny
    # num_classes in the overlay too: timm drops the classifier (non-strict) when the model's
    # num_classes differs from the pretrained cfg's (1000).
    ours = our_tiny(f"san10_{sa_type}", pretrained=True,
                    pretrained_cfg_overlay=dict(file=str(path), num_classes=TINY["num_classes"]))
    assert_same_outputs(ours, authors)


def test_checkpoint_filter_fn_loads_strictly(authors_tiny):
    sa_type, authors, path = authors_tiny
    ours = our_tiny(f"san10_{sa_type}")
    converted = our_san.checkpoint_filter_fn(torch.load(path, weights_only=True))
    assert not any(k.startswith("module.") for k in converted)
    ours.load_state_dict(converted, strict=True)
    assert_same_outputs(ours, authors)
    # already-converted names pass through unchanged
    assert our_san.checkpoint_filter_fn(ours.state_dict()).keys() == ours.state_dict().keys()


def test_load_checkpoint_helper(authors_tiny):
    sa_type, authors, path = authors_tiny
    ours = load_checkpoint(our_tiny(f"san10_{sa_type}"), path)
    assert_same_outputs(ours, authors)


def test_comparison_is_sensitive_to_a_wrong_mapping(authors_tiny, tmp_path):
    """Swapping phi and psi (conv1 <-> conv2) in one block must change the outputs."""
    sa_type, authors, path = authors_tiny
    state_dict = torch.load(path, weights_only=True)["state_dict"]
    prefix = "module.layer1.0.sam."
    for suffix in ("weight", "bias"):
        a, b = prefix + "conv1." + suffix, prefix + "conv2." + suffix
        state_dict[a], state_dict[b] = state_dict[b], state_dict[a]
    swapped = tmp_path / "swapped.pth"
    torch.save({"state_dict": state_dict}, swapped)
    ours = load_checkpoint(our_tiny(f"san10_{sa_type}"), swapped)
    with pytest.raises(AssertionError):
        assert_same_outputs(ours, authors)


def test_pairwise_checkpoint_into_patchwise_model_is_a_clear_error(authors_tiny):
    sa_type, _, path = authors_tiny
    other = "patchwise" if sa_type == "pairwise" else "pairwise"
    with pytest.raises(ValueError) as info:
        load_checkpoint(our_tiny(f"san10_{other}"), path)
    message = str(info.value)
    assert "does not fit SAN" in message and "shape mismatches" in message and "\n" not in message
    assert "gamma" in message
    if sa_type == "pairwise":  # conv_p has no patchwise counterpart
        assert "unexpected keys" in message and "pos_proj" in message
    else:
        assert "missing keys" in message and "pos_proj" in message


def test_truncated_checkpoint_is_a_clear_error(authors_tiny, tmp_path):
    _, _, path = authors_tiny
    data = path.read_bytes()
    broken = tmp_path / "truncated.pth"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        load_checkpoint(our_tiny("san10_pairwise"), broken)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(our_tiny("san10_pairwise"), tmp_path / "missing.pth")


def test_checkpoint_of_another_family_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    save_authors_checkpoint(timm.create_model("san_resnet26", num_classes=7), path, training_state=False)
    with pytest.raises(ValueError, match=r"missing keys .*unexpected keys"):
        load_checkpoint(our_tiny("san10_pairwise"), path)


@pytest.mark.parametrize("sa_type", ["pairwise", "patchwise"])
def test_full_size_san10_key_set_and_shapes(sa_type):
    authors = AuthorSAN(sa_type)  # default SAN10 size
    converted = our_san.checkpoint_filter_fn({"module." + k: v for k, v in authors.state_dict().items()})
    expected = timm.create_model(f"san10_{sa_type}").state_dict()
    assert converted.keys() == expected.keys()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    n_params = sum(p.numel() for p in authors.parameters())
    assert round(n_params / 1e6, 1) == {"pairwise": 10.5, "patchwise": 11.8}[sa_type]


# --------------------------------------------------------------------------------------------------
# ResNet baselines: torchvision names, DDP prefix
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchvision_resnet26(tmp_path_factory):
    model = randomise(TVResNet(TVBottleneck, [1, 2, 4, 1], num_classes=7), seed=3)
    path = tmp_path_factory.mktemp("resnet") / "model_best.pth"
    save_authors_checkpoint(model, path)
    return model, path


def test_resnet26_three_ways(torchvision_resnet26):
    reference, path = torchvision_resnet26
    shape = (2, 3, 64, 64)
    via_timm = timm.create_model("san_resnet26", num_classes=7, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=7))
    assert_same_outputs(via_timm, reference, shape)
    via_filter = timm.create_model("san_resnet26", num_classes=7)
    via_filter.load_state_dict(our_resnet.checkpoint_filter_fn(torch.load(path, weights_only=True)), strict=True)
    assert_same_outputs(via_filter, reference, shape)
    via_helper = load_checkpoint(timm.create_model("san_resnet26", num_classes=7), path)
    assert_same_outputs(via_helper, reference, shape)


# --------------------------------------------------------------------------------------------------
# CLI: torchsan convert
# --------------------------------------------------------------------------------------------------
def test_cli_convert(tmp_path, capsys):
    authors = randomise(AuthorSAN("pairwise"), seed=4)  # full size: the CLI builds the default model
    src, dst = tmp_path / "model_best.pth", tmp_path / "san10_pairwise.pth"
    save_authors_checkpoint(authors, src)

    assert main(["convert", str(src), str(dst), "--model", "san10_pairwise"]) == 0
    assert "loads strictly into san10_pairwise" in capsys.readouterr().out
    saved = torch.load(dst, weights_only=True)
    assert saved["model"] == "san10_pairwise"
    expected = our_san.checkpoint_filter_fn({k: v for k, v in authors.state_dict().items()})
    assert saved["state_dict"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(saved["state_dict"][key], value), key
    # our own format loads back through the helper and through timm
    model = load_checkpoint(timm.create_model("san10_pairwise"), dst)
    assert torch.equal(model.stages[3].blocks[0].attn.gamma[2].weight, authors.layer3[0].sam.conv_w[2].weight)
    timm.create_model("san10_pairwise", pretrained=True, pretrained_cfg_overlay=dict(file=str(dst)))

    wrong = tmp_path / "wrong.pth"
    assert main(["convert", str(src), str(wrong), "--model", "san10_patchwise"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchsan: error:") and "\n" not in err and "does not fit SAN" in err
    assert not wrong.exists()
    assert main(["convert", str(src), str(wrong), "--model", "no_such_model"]) == 2
    assert "unknown model" in capsys.readouterr().err
