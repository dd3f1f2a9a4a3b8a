"""The training pipeline: config, loss, schedule, the train/eval commands, checkpoints, resume, torchrun."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from _cli import run_torchsan, subprocess_env, train_args
from conftest import TINY_SAN
from torchsan.cli import main
from torchsan.train import TrainConfig, load_config, lr_factor, smooth_targets, soft_cross_entropy
from torchsan.train.checkpoint import list_checkpoints, read_checkpoint

# --- config, loss, schedule ------------------------------------------------------------------------

def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: san10_pairwise\nbase_lrate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config key .base_lrate.*did you mean .base_lr."):
        load_config(bad)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        load_config(None, epochs=0)
    with pytest.raises(ValueError, match="base_lr must be a number"):
        load_config(None, base_lr="fast")
    with pytest.raises(FileNotFoundError, match="imagenet/san10_pairwise"):
        load_config("no_such_config")
    assert load_config(None, weight_decay="1e-4").weight_decay == 1e-4  # YAML 1.1 reads 1e-4 as a string
    with pytest.raises(ValueError, match="epochs must be an integer"):
        load_config(None, epochs=2.5)
    with pytest.raises(ValueError, match="lr must be a number"):
        load_config(None, lr="high")
    cfg = load_config("imagenet/san10_pairwise", batch_size=512)
    assert cfg.model == "san10_pairwise" and cfg.learning_rate == pytest.approx(0.2)  # linear scaling


def test_packaged_configs_load():
    from torchsan.train.config import CONFIG_ROOT

    names = sorted(p.relative_to(CONFIG_ROOT).with_suffix("").as_posix() for p in CONFIG_ROOT.rglob("*.yaml"))
    assert len([n for n in names if n.startswith("imagenet/")]) == 9
    for name in names:
        cfg = load_config(name)
        import timm

        import torchsan  # noqa: F401

        assert timm.is_model(cfg.model), name


def test_smooth_targets_authors_formula():
    q = smooth_targets(torch.tensor([2, 0]), 5, 0.1)
    expected = torch.tensor([[0.025, 0.025, 0.9, 0.025, 0.025], [0.9, 0.025, 0.025, 0.025, 0.025]])
    assert torch.allclose(q, expected)
    logits = torch.randn(2, 5)
    manual = -(expected * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(soft_cross_entropy(logits, q), manual)


def test_lr_schedule():
    cfg = TrainConfig(epochs=4, schedule="cosine", schedule_unit="epoch")
    f = lr_factor(cfg, steps_per_epoch=10)
    assert [f(i) for i in (0, 9, 10, 25, 39)] == pytest.approx(
        [1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    g = lr_factor(TrainConfig(epochs=4, schedule_unit="step", warmup_epochs=1), steps_per_epoch=10)
    assert g(0) == pytest.approx(0.1) and g(9) == pytest.approx(1.0)
    assert g(20) == pytest.approx(0.5)
    h = lr_factor(TrainConfig(epochs=10, schedule="step", step_milestones=[3, 6]), steps_per_epoch=2)
    assert [h(i) for i in (5, 6, 12)] == pytest.approx([1.0, 0.1, 0.01])


# --- train / eval commands ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(train_args(image_folder, out, "--epochs", "8", "--lr", "0.1", "--keep-checkpoints", "2",
                          "--tensorboard", "--json", str(out.parent / "s.json"))) == 0
    return out


def test_train_writes_run_folder(trained_run):
    files = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "metrics.csv", "metrics.json", "curves.png", "model_best.pth", "summary.json",
            "tensorboard"} <= files
    assert [p.name for p in list_checkpoints(trained_run)] == ["checkpoint-e0007-s000000.pth",
                                                               "checkpoint-e0008-s000000.pth"]  # keep 2
    history = json.loads((trained_run / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == list(range(1, 9))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 100 for r in history)
    assert (trained_run / "metrics.csv").read_text().count("\n") == 9
    assert any(p.name.startswith("events.") for p in (trained_run / "tensorboard").iterdir())
    ckpt = read_checkpoint(trained_run / "checkpoint-e0008-s000000.pth")
    assert ckpt["epoch"] == 8 and ckpt["step"] == 0 and ckpt["model"] == "san10_pairwise"
    assert {"optimizer", "scheduler", "scaler", "rng", "config", "history"} <= set(ckpt)


def test_eval_matches_training_metrics(trained_run, capsys):
    summary = json.loads((trained_run / "summary.json").read_text())
    out_json = trained_run.parent / "eval.json"
    assert main(["eval", str(list_checkpoints(trained_run)[-1]), "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["top1"] == pytest.approx(summary["final"]["val_top1"])
    assert result["top5"] == pytest.approx(summary["final"]["val_top5"])
    assert result["count"] == 12
    assert "top-1" in capsys.readouterr().out
    assert main(["results", str(trained_run)]) == 0
    table = capsys.readouterr().out
    assert "san10_pairwise" in table and f"{summary['final']['val_top1']:.2f}%" in table
    best = read_checkpoint(trained_run / "model_best.pth")
    assert main(["eval", str(trained_run / "model_best.pth"), "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["top1"] == pytest.approx(best["metrics"]["val_top1"])
    # model_best.pth also loads with the generic loader
    import timm

    from torchsan.models import load_checkpoint

    load_checkpoint(timm.create_model("san10_pairwise", num_classes=3, **TINY_SAN), trained_run / "model_best.pth")


def test_learns_above_chance(trained_run):
    # 3 classes whose bar position differs: 8 epochs of 36 images must beat chance (33%) on the val split
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["best_val_top1"] > 50


def test_bad_inputs_give_one_line_errors(trained_run, image_folder, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in trained_run.iterdir() if p.suffix == ".pth"}
    # truncated checkpoint
    good = list_checkpoints(trained_run)[-1]
    broken = tmp_path / "broken.pth"
    broken.write_bytes(good.read_bytes()[:5000])
    assert main(["eval", str(broken)]) == 2
    assert main(["train", "--resume", str(broken)]) == 2
    # a checkpoint of another model
    assert main(["train", "san10_patchwise", "--resume", str(good)]) == 2
    # changed schedule on resume
    assert main(["train", "--resume", str(good), "--epochs", "7"]) == 2
    # missing data folder, unknown config key, unknown model
    assert main(train_args(tmp_path / "nowhere", tmp_path / "r")) == 2
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: san10_pairwise\nepoch: 3\n")
    assert main(["train", str(cfg)]) == 2
    assert main(["train", "--model", "san11_pairwise", "--data", str(image_folder), "--output", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("torchsan: error:")]
    assert len(errors) == 7
    for needle in ("cannot read checkpoint", "is of model 'san10_pairwise', not 'san10_patchwise'",
                   "different settings (epochs: 8 in the checkpoint, 7 now)", "does not exist",
                   "unknown config key 'epoch'", "unknown model 'san11_pairwise'"):
        assert any(needle in e for e in errors), needle
    after = {p.name: p.stat().st_mtime_ns for p in trained_run.iterdir() if p.suffix == ".pth"}
    assert after == before  # earlier checkpoints untouched


def test_corrupt_image_cli(tmp_path):
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=6, val_per_class=2)
    victim = root / "train" / "class_0" / "img_001.png"
    victim.write_bytes(victim.read_bytes()[:80])
    proc = run_torchsan(train_args(root, tmp_path / "r1", "--epochs", "1"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("torchsan: error: corrupt or truncated image")
    proc = run_torchsan(train_args(root, tmp_path / "r2", "--epochs", "1", "--skip-corrupt"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["final"]["train_skipped"] == 1


# --- reliability: SIGKILL + resume, torchrun ------------------------------------------------------

def _state(path):
    return read_checkpoint(path)["state_dict"]


TIMINGS = {"train_seconds", "train_images_per_s", "val_seconds"}  # the only fields a resumed run may change


def _logs(run):
    """A run's metrics.json rows and metrics.csv lines without their timings, and summary.json's numbers."""
    import csv

    rows = [{k: v for k, v in r.items() if k not in TIMINGS} for r in json.loads((run / "metrics.json").read_text())]
    with open(run / "metrics.csv", newline="") as f:
        table = [{k: v for k, v in r.items() if k not in TIMINGS} for r in csv.DictReader(f)]
    summary = json.loads((run / "summary.json").read_text())
    summary["final"] = {k: v for k, v in summary["final"].items() if k not in TIMINGS}
    for key in ("seconds", "run_dir"):
        summary.pop(key)
    return rows, table, summary


def test_sigkill_then_resume_is_bit_exact(image_folder, tmp_path):
    # A per-iteration schedule with warm-up: the learning rate changes inside the epoch the kill lands in.
    common = ["--epochs", "3", "--deterministic", "--checkpoint-every-steps", "2", "--keep-checkpoints", "50",
              "--schedule-unit", "step", "--warmup-epochs", "1"]
    ref = run_torchsan(train_args(image_folder, tmp_path / "ref", *common))
    assert ref.returncode == 0, ref.stderr
    victim_dir = tmp_path / "victim"
    proc = subprocess.Popen([sys.executable, "-m", "torchsan", *train_args(image_folder, victim_dir, *common)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # Kill as soon as the first checkpoint inside epoch 2 appears: the run is then mid-epoch.
    while time.time() < deadline and not any(p.name == "checkpoint-e0001-s000002.pth" for p in
                                             (victim_dir.iterdir() if victim_dir.exists() else [])):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (victim_dir / "summary.json").exists()  # it really died before the end
    stale = victim_dir / ".checkpoint-e0001-s000004.pth.tmp4242"  # what a kill during a checkpoint write leaves
    stale.write_bytes(b"half a checkpoint" * 1000)
    resumed = run_torchsan(["train", "--resume", str(victim_dir), "--progress", "none"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "removed 1 temporary file" in resumed.stdout
    assert not [p.name for p in victim_dir.iterdir() if ".tmp" in p.name]
    last = "checkpoint-e0003-s000000.pth"
    a, b = _state(tmp_path / "ref" / last), _state(victim_dir / last)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    # The logs, learning rates included, equal the uninterrupted run's (timings aside).
    ref_rows, ref_table, ref_summary = _logs(tmp_path / "ref")
    rows, table, summary = _logs(victim_dir)
    assert len(set(r["lr"] for r in ref_rows)) == 3  # the test would not see a wrong lr otherwise
    assert rows == ref_rows and table == ref_table and summary == ref_summary


def test_torchrun_two_processes(image_folder, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "torchsan",
           *train_args(image_folder, tmp_path / "ddp", "--batch-size", "8")]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert summary["final"]["val_images"] == 12  # every val image counted once over the two ranks
    assert summary["final"]["train_images"] == 32  # 36 images -> 2 ranks x 4 per rank x 4 steps
    assert [p.name for p in list_checkpoints(tmp_path / "ddp")] == ["checkpoint-e0001-s000000.pth",
                                                                    "checkpoint-e0002-s000000.pth"]
    assert proc.stdout.count("done:") == 1  # one process reports
    # the last validation's predictions, gathered from both ranks, are in the data set's order
    stored = json.loads((tmp_path / "ddp" / "val_predictions.json").read_text())
    last = tmp_path / "ddp" / "checkpoint-e0002-s000000.pth"
    assert main(["eval", str(last), "--predictions", str(tmp_path / "one.json")]) == 0
    assert stored == json.loads((tmp_path / "one.json").read_text())


def test_bf16_autocast_on_cpu(image_folder, tmp_path):
    # The CPU twin of the GPU mixed-precision path: bf16 autocast runs and still learns.
    assert main(train_args(image_folder, tmp_path / "bf16", "--amp", "bf16", "--epochs", "1")) == 0
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert math.isfinite(summary["final"]["train_loss"]) and summary["final"]["val_images"] == 12
    assert main(train_args(image_folder, tmp_path / "x", "--amp", "fp16")) == 2  # fp16 needs a GPU
    assert main(train_args(image_folder, tmp_path / "bf16", "--epochs", "1")) == 2  # would overwrite a run


def test_ops_under_autocast_match_float32():
    import torchsan

    x, w = torch.randn(2, 8, 9, 9), torch.randn(2, 2, 9, 81).softmax(dim=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torchsan.ops.aggregation(x.to(torch.bfloat16), w, kernel_size=3)  # bf16 values, fp32 weights
        d = torchsan.ops.subtraction2(x, x.to(torch.bfloat16), kernel_size=3)
    assert y.shape == (2, 8, 9, 9) and d.shape == (2, 8, 9, 81)  # dtype: autocast's choice (reflect pad is fp32)
    ref = torchsan.ops.aggregation(x, w, kernel_size=3)
    assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.02)
    with pytest.raises(TypeError):  # outside autocast a dtype mix is still an error
        torchsan.ops.aggregation(x.to(torch.bfloat16), w, kernel_size=3)


@pytest.mark.slow  # three torchrun launches; test_sigkill_then_resume_is_bit_exact covers one process by default
def test_torchrun_resume_mid_epoch_is_bit_exact(image_folder, tmp_path):
    # Two processes, a checkpoint every 2 iterations; resume both ranks from one taken inside epoch 2
    # and finish: weights and per-epoch metrics equal those of the uninterrupted run.
    run = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "torchsan"]
    args = train_args(image_folder, run, "--batch-size", "4", "--deterministic", "--checkpoint-every-steps", "2",
                     "--keep-checkpoints", "50")
    proc = subprocess.run([*torchrun, *args], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = run / "checkpoint-e0002-s000000.pth"
    expected_state, expected_history = _state(final), json.loads((run / "metrics.json").read_text())
    mid = run / "checkpoint-e0001-s000004.pth"  # 9 iterations per epoch: this one is inside epoch 2
    assert mid.exists()
    for later in [p for p in list_checkpoints(run) if p.name > mid.name]:
        later.unlink()
    proc = subprocess.run([*torchrun, "train", "--resume", str(mid), "--progress", "none"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = _state(final)
    assert all(torch.equal(state[k], expected_state[k]) for k in expected_state)
    history = json.loads((run / "metrics.json").read_text())
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in expected_history]
    assert [r["val_top1"] for r in history] == [r["val_top1"] for r in expected_history]


def test_mixup_option(image_folder, tmp_path):
    from torchsan.train.losses import mixup

    images, q = torch.randn(6, 3, 4, 4), smooth_targets(torch.tensor([0, 1, 2, 0, 1, 2]), 3, 0.1)
    mixed, mq = mixup(images, q, 0.2, torch.Generator().manual_seed(1))
    assert torch.allclose(mq.sum(1), torch.ones(6)) and not torch.equal(mixed, images)
    assert main(train_args(image_folder, tmp_path / "mix", "--epochs", "1", "--mixup-alpha", "0.2")) == 0
    summary = json.loads((tmp_path / "mix" / "summary.json").read_text())
    assert summary["final"]["train_top1"] is None  # no hard labels to score under mixup
    assert main(train_args(image_folder, tmp_path / "sbn", "--sync-bn")) == 2  # SyncBatchNorm needs GPUs


def test_model_kwargs_flags_add_to_the_config(image_folder, tmp_path, capsys):
    # --model-kwargs adds keys to the config file's model_kwargs (it used to replace them all, dropping
    # small_input); --drop-model-kwarg removes one, explicitly.
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"model: san10_pairwise\nmodel_kwargs: {json.dumps(TINY_SAN)}\n")
    common = ["--data", str(image_folder), "--image-size", "16", "--batch-size", "6", "--epochs", "1",
              "--progress", "none", "--no-tensorboard"]
    assert main(["train", str(cfg), *common, "--output", str(tmp_path / "a"), "--model-kwargs", "zero_init_last=true",
                 "--model-kwargs", "stem_width=16"]) == 0
    saved = load_config(tmp_path / "a" / "config.yaml").model_kwargs
    assert saved == {**TINY_SAN, "zero_init_last": True, "stem_width": 16}
    assert read_checkpoint(tmp_path / "a" / "model_best.pth")["state_dict"]["stem.conv.weight"].shape[0] == 16
    assert main(["train", str(cfg), *common, "--output", str(tmp_path / "b"), "--drop-model-kwarg", "small_input"]) == 2
    assert "san10_pairwise cannot run on 16 px images" in capsys.readouterr().err  # small_input really went
    assert main(["train", str(cfg), *common, "--output", str(tmp_path / "c"), "--drop-model-kwarg", "width"]) == 2
    assert "--drop-model-kwarg width: not among the model_kwargs" in capsys.readouterr().err
