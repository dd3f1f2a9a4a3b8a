"""ONNX export: ``torch.onnx.export(model, (x,), path, dynamo=True)`` as it is, standard operators only, and ONNX
Runtime's logits equal eager torchsan's (the fused CPU kernels)."""

import json

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import timm  # noqa: E402

import torchsan.models  # noqa: E402, F401
from torchsan.ops import _cpu  # noqa: E402

MODELS = ["san10_pairwise", "san10_patchwise", "san15_pairwise", "san15_patchwise", "san19_pairwise",
          "san19_patchwise", "san_resnet26", "san_resnet38", "san_resnet50"]


def _model(name: str) -> torch.nn.Module:
    """A small-input, quarter-width model in eval mode whose BNs hold random statistics (not the identity)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, small_input=True, width=0.25).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def _domains(proto) -> set[str]:
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    return {n.domain for n in nodes}


@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow) if m[3:5] in ("15", "19") else m
                                  for m in MODELS])
def test_every_model_exports_to_standard_onnx_and_onnx_runtime_agrees(name, tmp_path):
    model = _model(name)
    path = tmp_path / f"{name}.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(path), dynamo=True, verbose=False,
                      dynamic_shapes=({0: batch},))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert _domains(proto) <= {"", "ai.onnx"}, _domains(proto)  # no torchsan (or any custom) operator
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):  # batches the export did not trace
        x = torch.rand(n, 3, 32, 32) * 2 - 1
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = model(x)  # eager, on the default backend (the fused CPU kernels where they built)
        assert expected.abs().max() > 0.1  # logits that say something
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not _cpu.available(), reason="the C++ kernels did not build here")
def test_a_named_backend_stays_in_the_exported_graph():
    """``auto`` exports the reference composition; a backend asked for by name keeps its custom ops."""
    from torchsan.ops import use_backend

    model = _model("san10_pairwise")
    x = torch.randn(1, 3, 32, 32)
    plain = torch.export.export(model, (x,))
    assert not any("torchsan" in str(n.target) for n in plain.graph.nodes)
    with use_backend("cpu"):
        kept = torch.export.export(model, (x,))
    assert any("torchsan" in str(n.target) for n in kept.graph.nodes)


def test_export_command_writes_a_checked_file_that_takes_pixels(image_folder, tmp_path, capsys):
    from _cli import train_args
    from torchsan.cli import main
    from torchsan.export import load_trained_model

    run = tmp_path / "run"
    assert main(train_args(image_folder, run, "--epochs", "1")) == 0
    out = tmp_path / "deploy" / "model.onnx"
    assert main(["export", str(run / "model_best.pth"), str(out), "--pixels"]) == 0
    printed = capsys.readouterr().out
    assert "pixels in [0, 1], any batch size" in printed and "checked in ONNX Runtime at batch 1, 3" in printed
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    model, info = load_trained_model(run / "model_best.pth")
    assert meta["model"] == "san10_pairwise" and meta["image_size"] == "16" and meta["classes"] == json.dumps(
        info["classes"])
    # ONNX Runtime on pixels equals the eager model on the normalised pixels, at a batch the export never saw
    pixels = torch.rand(5, info["in_chans"], 16, 16)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": pixels.numpy()})
    mean, std = (torch.tensor(info[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        expected = model((pixels - mean) / std)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert list(out.parent.iterdir()) == [out]  # no temporary file left
    # not a checkpoint: one line, nothing written
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad), str(tmp_path / "bad.onnx")]) == 2
    assert "torchsan: error:" in capsys.readouterr().err and not (tmp_path / "bad.onnx").exists()
