"""Running the ``torchsan`` command in tests: a tiny SAN's training arguments, in-process or in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_SAN

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY_ARGS = [f"--model-kwargs={k}={json.dumps(v)}" for k, v in TINY_SAN.items()]


def train_args(data, out, *extra: str) -> list[str]:
    """``torchsan train`` of the tiny SAN10 pairwise on ``data`` into ``out``: 2 epochs at 16 px, batch 6."""
    return ["train", "san10_pairwise", "--data", str(data), "--image-size", "16", "--batch-size", "6",
            "--epochs", "2", "--lr", "0.05", "--output", str(out), "--progress", "none", "--no-tensorboard",
            *TINY_ARGS, *extra]


def subprocess_env() -> dict[str, str]:
    """The environment of a child ``python -m torchsan``: this checkout's sources, one thread."""
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def run_torchsan(args: list[str], **kw) -> subprocess.CompletedProcess:
    """``python -m torchsan ARGS`` in a child process, its output captured."""
    return subprocess.run([sys.executable, "-m", "torchsan", *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=600, **kw)
