"""The main command on the embedded sample images."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from torchsan.cli import main
from torchsan.data import sample_batch


def test_sample_batch_is_real_images():
    images, names = sample_batch(64)
    assert images.shape == (4, 3, 64, 64) and len(names) == 4
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert images.std() > 0.3  # natural images, normalised: far from constant
    torch.testing.assert_close(images[1], images[0].flip(2))  # the mirrored copy
    assert not torch.allclose(images[0], images[2])


def test_summary_runs(tmp_path, capsys):
    out = tmp_path / "summary.json"
    rc = main(["summary", "--models", "san10_pairwise", "san_resnet26", "--image-size", "128",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "san10_pairwise" in text and "-> ok" in text
    assert "CPU kernels: built for " in text or "CPU kernels: unavailable" in text
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["models"]] == ["san10_pairwise", "san_resnet26"]
    assert data["models"][0]["params"] == 10531848
    assert data["step"]["grad_norm"] > 0


def test_summary_too_small_image_is_a_clear_error(capsys):
    rc = main(["summary", "--models", "san10_pairwise", "--image-size", "32"])
    assert rc == 2
    assert "small_input" in capsys.readouterr().err


def test_python_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "torchsan", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("torchsan ")
