"""The paper's studies as commands: ``torchsan robustness rotate``."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from _cli import train_args
from torchsan.cli import main
from torchsan.studies import TRANSFORMS


@pytest.fixture(scope="module")
def tiny_checkpoint(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("rotate") / "run"
    assert main(train_args(image_folder, out)) == 0
    return out / "model_best.pth"


def test_transforms_are_the_named_rotations_and_flips():
    # Two marked pixels, A at (row 0, col 0) and B at (0, 1), on a 3x3 picture: where each transform puts them.
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 1.0, 2.0
    expected = {  # (row, col) of A, then of B
        "as given": ((0, 0), (0, 1)),
        "rotated 90 cw": ((0, 2), (1, 2)),  # the top edge becomes the right edge
        "rotated 180": ((2, 2), (2, 1)),
        "rotated 90 ccw": ((2, 0), (1, 0)),  # the top edge becomes the left edge
        "flipped up-down": ((2, 0), (2, 1)),
        "flipped left-right": ((0, 2), (0, 1)),
    }
    assert list(TRANSFORMS) == list(expected)
    for name, (a, b) in expected.items():
        y = TRANSFORMS[name](x)[0, 0]
        assert y[a] == 1.0 and y[b] == 2.0 and y.sum() == 3.0, name


def test_transforms_agree_with_pillow():
    # An independent oracle: PIL's transposes of a random, non-symmetric picture.
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, size=(5, 5), dtype=np.uint8)
    pil = Image.fromarray(picture)
    oracle = {
        "rotated 90 cw": pil.transpose(Image.Transpose.ROTATE_270),  # PIL's angles turn counter-clockwise
        "rotated 180": pil.transpose(Image.Transpose.ROTATE_180),
        "rotated 90 ccw": pil.transpose(Image.Transpose.ROTATE_90),
        "flipped up-down": pil.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        "flipped left-right": pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    }
    x = torch.from_numpy(picture).view(1, 1, 5, 5)
    for name, image in oracle.items():
        assert np.array_equal(TRANSFORMS[name](x)[0, 0].numpy(), np.asarray(image)), name


def test_rotate_command_end_to_end_and_resumes(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "robustness"
    assert main(["robustness", "rotate", str(tiny_checkpoint), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model |" in printed and "rotated 90 cw top-1 (drop)" in printed
    assert {p.name for p in out.iterdir()} >= {"rotate.json", "rotate.csv", "rotate.md", "rotate.png"}
    (row,) = json.loads((out / "rotate.json").read_text()).values()
    assert set(row["results"]) == set(TRANSFORMS) and row["images"] == 12
    # "as given" is the plain evaluation of the checkpoint
    assert main(["eval", str(tiny_checkpoint), "--json", str(tmp_path / "eval.json")]) == 0
    plain = json.loads((tmp_path / "eval.json").read_text())
    assert row["results"]["as given"]["top1"] == pytest.approx(plain["top1"])
    assert (out / "rotate.csv").read_text().count("\n") == 1 + len(TRANSFORMS)
    # a second call finds the checkpoint done and does not evaluate it again
    stamp = (out / "rotate.json").stat().st_mtime_ns
    assert main(["robustness", "rotate", str(tiny_checkpoint), "--output", str(out)]) == 0
    assert (out / "rotate.json").stat().st_mtime_ns == stamp
