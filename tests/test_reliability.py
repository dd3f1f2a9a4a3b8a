"""What the pipeline guarantees under misuse and accidents: one run per folder, checkpoints that cannot steer
writes, a full disk, stale temporary files, class names, and bad settings refused before any folder is made."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _cli import run_torchsan, subprocess_env, train_args
from conftest import make_image_folder
from torchsan.cli import main
from torchsan.train import load_config
from torchsan.train.checkpoint import CheckpointWriteError, list_checkpoints, read_checkpoint, save_atomic
from torchsan.train.run_folder import RunFolderBusy, RunFolderLock

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "torchsan"]


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("torchsan: error:")]


@pytest.fixture(scope="module")
def finished_run(image_folder, tmp_path_factory):
    """A finished 2-epoch run of the tiny SAN (its folder)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_args(image_folder, out)) == 0
    return out


# --- one run per folder ---------------------------------------------------------------------------

def test_second_run_into_a_busy_folder_is_refused_and_the_first_is_intact(image_folder, tmp_path):
    # Two runs into one folder, started together (seeds 1 and 2): one runs, the other is refused.
    run = tmp_path / "run"
    procs = {seed: subprocess.Popen([sys.executable, "-m", "torchsan",
                                     *train_args(image_folder, run, "--seed", str(seed), "--epochs", "4")],
                                    env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)}
    results = {seed: (*proc.communicate(timeout=600), proc.returncode) for seed, proc in procs.items()}
    (winner,) = [seed for seed, (_, _, rc) in results.items() if rc == 0]
    (loser,) = [seed for seed, (_, _, rc) in results.items() if rc == 2]
    message = results[loser][1].strip().splitlines()[-1]
    assert message.startswith("torchsan: error:") and str(run) in message, message
    assert f"in use by another run (pid {procs[winner].pid} on " in message, message
    assert "done:" in results[winner][0] and "done:" not in results[loser][0]
    # Everything in the folder is the winner's.
    assert load_config(run / "config.yaml").seed == winner
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-e0003-s000000.pth", "checkpoint-e0004-s000000.pth"]
    assert all(read_checkpoint(p)["config"]["seed"] == winner for p in list_checkpoints(run))
    assert read_checkpoint(run / "model_best.pth")["config"]["seed"] == winner
    assert len(json.loads((run / "metrics.json").read_text())) == 4
    assert json.loads((run / "summary.json").read_text())["final"]["epoch"] == 4


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parents[1] / "src")!r})
        from torchsan.train.run_folder import RunFolderLock
        RunFolderLock({str(folder)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=f"in use by another run \\(pid {holder.pid} on "):
            RunFolderLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunFolderLock(folder) as lock:  # the kernel dropped the dead holder's lock
        assert f"pid {os.getpid()} " in lock.path.read_text()


def test_torchrun_into_a_busy_folder_stops_every_rank(image_folder, tmp_path):
    run = tmp_path / "ddp"
    with RunFolderLock(run):
        proc = subprocess.run([*TORCHRUN, *train_args(image_folder, run, "--batch-size", "8")], env=subprocess_env(),
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.count(f"in use by another run (pid {os.getpid()} ") == 2  # both ranks, no hang
    assert [p.name for p in run.iterdir()] == [".lock"]


def test_failed_start_leaves_no_folder(image_folder, tmp_path, capsys):
    # SAN10 without small_input cannot run on 16 px images: refused before config.yaml or tensorboard/ exist.
    run = tmp_path / "nope"
    args = ["train", "san10_pairwise", "--data", str(image_folder), "--image-size", "16", "--output", str(run),
            "--epochs", "1", "--batch-size", "6", "--progress", "none", "--tensorboard"]
    assert main(args) == 2
    (error,) = _errors(capsys)
    assert "san10_pairwise cannot run on 16 px images" in error and "small_input=True" in error
    assert not run.exists()


# --- checkpoints cannot steer writes -----------------------------------------------------------------

def _planted(finished_run, tmp_path, **config_changes):
    """A copy of the finished run's last checkpoint in a new folder, its config changed as an attacker would."""
    ckpt = read_checkpoint(list_checkpoints(finished_run)[-1])
    ckpt["config"].update(config_changes)
    folder = tmp_path / "down{loaded}"  # braces: a folder name, not a template
    folder.mkdir()
    path = folder / "checkpoint-e0002-s000000.pth"
    torch.save(ckpt, path)
    return path


def test_resume_writes_into_the_checkpoints_own_folder(finished_run, tmp_path, capsys):
    victim = tmp_path / "victim"
    path = _planted(finished_run, tmp_path, output=str(victim), epochs=3)
    ckpt = read_checkpoint(path)
    ckpt["config"]["epochs"] = 3  # a longer schedule, as if the run had been planned for 3 epochs
    torch.save(ckpt, path)
    assert main(["train", "--resume", str(path), "--progress", "none"]) == 0
    assert not victim.exists()
    names = {p.name for p in path.parent.iterdir()}
    assert {"config.yaml", "metrics.json", "curves.png", "summary.json", "checkpoint-e0003-s000000.pth"} <= names
    # --output still chooses another folder
    other = tmp_path / "other"
    assert main(["train", "--resume", str(path), "--output", str(other), "--progress", "none"]) == 0
    assert (other / "summary.json").exists() and not victim.exists()


def test_checkpoint_model_kwargs_cannot_reach_timm(finished_run, tmp_path, capsys):
    secret = tmp_path / "secret.pth"
    secret.write_bytes(b"not for you")
    kwargs = {**read_checkpoint(list_checkpoints(finished_run)[-1])["config"]["model_kwargs"],
              "checkpoint_path": str(secret)}
    path = _planted(finished_run, tmp_path, model_kwargs=kwargs)
    assert main(["train", "--resume", str(path), "--progress", "none"]) == 2
    assert main(["eval", str(path)]) == 2
    errors = _errors(capsys)
    assert len(errors) == 2
    assert all("'checkpoint_path' is not an argument of san10_pairwise" in e for e in errors)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nothing written


# --- a full disk -------------------------------------------------------------------------------------

def test_save_atomic_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-e0001-s000000.pth"
    save_atomic({"w": torch.arange(10.0)}, path)

    class Full:  # a file whose writes fail after 1000 bytes, as on a full disk
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    from torchsan.train import checkpoint

    real = checkpoint._Sink.__init__
    monkeypatch.setattr(checkpoint._Sink, "__init__", lambda self, f: real(self, Full(f)))
    with pytest.raises(CheckpointWriteError, match=f"no space left on .* while writing {path.name}") as info:
        save_atomic({"w": torch.randn(10000)}, path)
    assert info.value.errno == errno.ENOSPC and "unexpected pos" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file is gone
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(10.0))


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(sys.platform != "linux" or not _can_mount_tmpfs(), reason="needs unshare and a tmpfs mount")
def test_full_disk_during_training_then_resume(image_folder, finished_run, tmp_path):
    # The run folder is a small tmpfs that fills up during epoch 2; the run stops with a readable message,
    # the epoch-1 checkpoint intact and no temporary file; freed, the run resumes to the uninterrupted result.
    size = (finished_run / "checkpoint-e0002-s000000.pth").stat().st_size
    script = tmp_path / "full.sh"
    mount, out = tmp_path / "mnt", tmp_path / "out"
    mount.mkdir()
    args = " ".join(f"'{a}'" for a in train_args(image_folder, mount / "run", "--deterministic"))
    ref = run_torchsan(train_args(image_folder, tmp_path / "ref", "--deterministic"))  # uninterrupted, same threads
    assert ref.returncode == 0, ref.stderr
    script.write_text(textwrap.dedent(f"""
        set -u
        mount -t tmpfs -o size=4m none {mount}
        head -c $((4 * 1024 * 1024 - {int(2.6 * size)})) /dev/zero > {mount}/ballast 2>/dev/null
        {sys.executable} -m torchsan {args} > {out}.1 2>&1; echo $? > {out}.rc1
        ls -a {mount}/run > {out}.ls
        rm {mount}/ballast
        {sys.executable} -m torchsan train --resume {mount}/run --progress none > {out}.2 2>&1; echo $? > {out}.rc2
        cp {mount}/run/checkpoint-e0002-s000000.pth {out}.pth
    """))
    subprocess.run(["unshare", "-rm", "sh", str(script)], env=subprocess_env(), timeout=600, check=True)
    first = Path(f"{out}.1").read_text()
    assert Path(f"{out}.rc1").read_text().strip() == "2", first
    error = first.strip().splitlines()[-1]
    assert error.startswith(f"torchsan: error: no space left on {mount} "), error
    assert "checkpoint-e0001-s000000.pth is intact" in error, error
    left = Path(f"{out}.ls").read_text().split()
    assert "checkpoint-e0001-s000000.pth" in left and not [n for n in left if ".tmp" in n]
    assert Path(f"{out}.rc2").read_text().strip() == "0", Path(f"{out}.2").read_text()
    expected = read_checkpoint(tmp_path / "ref" / "checkpoint-e0002-s000000.pth")["state_dict"]
    resumed = read_checkpoint(f"{out}.pth")["state_dict"]
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


# --- class names -----------------------------------------------------------------------------------

def test_eval_refuses_other_class_names(finished_run, tmp_path, capsys):
    other = make_image_folder(tmp_path / "fruit", classes=3, train_per_class=2, val_per_class=2)
    for split in ("train", "val"):
        for old, new in zip(sorted((other / split).iterdir()), ("apple", "pear", "zebra")):
            old.rename(old.with_name(new))
    ckpt = list_checkpoints(finished_run)[-1]
    assert read_checkpoint(ckpt)["classes"] == ["class_0", "class_1", "class_2"]
    assert read_checkpoint(finished_run / "model_best.pth")["classes"] == ["class_0", "class_1", "class_2"]
    assert main(["eval", str(ckpt), "--data", str(other)]) == 2
    (error,) = _errors(capsys)
    assert "other classes" in error and "'class_0' vs 'apple'" in error and "--ignore-class-names" in error
    with pytest.warns(UserWarning, match="class names differ"):
        assert main(["eval", str(ckpt), "--data", str(other), "--ignore-class-names"]) == 0


def test_resume_refuses_data_whose_classes_changed(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=4, val_per_class=2)
    run = tmp_path / "run"
    assert main(train_args(data, run)) == 0
    (run / "checkpoint-e0002-s000000.pth").unlink()
    for split in ("train", "val"):
        (data / split / "class_2").rename(data / split / "class_9")
    assert main(["train", "--resume", str(run), "--progress", "none"]) == 2
    (error,) = _errors(capsys)
    assert "other classes" in error and "'class_2' vs 'class_9'" in error and "resume on the data" in error


# --- settings refused before any folder is made ---------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--train-subset", "-1"], "train_subset must be >= 0"),
    (["--val-subset", "-5"], "val_subset must be >= 0"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--base-lr", "inf"], "base_lr must be a finite number"),
    (["--grad-clip", "-1"], "grad_clip must be >= 0"),
    (["--checkpoint-every-steps", "-2"], "checkpoint_every_steps must be >= 0"),
    (["--output", "OUT/{foo}"], "placeholder {foo}"),
    (["--output", "OUT/{model"], "not a valid folder template"),
    (["--model-kwargs", "smal_input=true"], "'smal_input' (did you mean 'small_input'?) is not an argument"),
    (["--model-kwargs", "num_classes=3"], "num_classes is set from the data"),
])
def test_bad_flags_are_refused_before_any_folder(flags, needle, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(image_folder, out, *[f.replace("OUT", str(out)) for f in flags])
    assert main(args) == 2
    (error,) = _errors(capsys)
    assert needle in error, error
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, needle", [
    ("lr: .nan\n", "lr must be a finite number"),
    ("step_milestones: abc\n", "step_milestones must be a list of epochs"),
    ("step_milestones: [60, 30]\n", "increasing order"),
    ("epochs: 3\nbatch_size: 8\nepochs: 5\n", "duplicate key 'epochs' (line 3)"),
    ("model_kwargs: [1, 2]\n", "model_kwargs must be a mapping"),
])
def test_bad_config_files_are_refused(text, needle, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert main(["train", str(cfg), "--output", str(tmp_path / "run")]) == 2
    (error,) = _errors(capsys)
    assert needle in error, error
    assert not (tmp_path / "run").exists()


# --- smaller things ----------------------------------------------------------------------------------

@pytest.mark.parametrize("content, needle", [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "holds a list"),
    ('{"model": "san10_pairwise"}', "missing or malformed: params"),
])
def test_results_of_a_malformed_summary_is_one_line(content, needle, tmp_path, capsys):
    (tmp_path / "summary.json").write_text(content)
    assert main(["results", str(tmp_path)]) == 2
    (error,) = _errors(capsys)
    assert needle in error


def test_convert_own_one_channel_checkpoint(tmp_path, capsys):
    import timm

    from torchsan.models import load_checkpoint

    small = dict(small_input=True, layers=[1, 1, 1, 1, 1], widths=[16, 16, 32, 32, 32], stem_width=8,
                 share_planes=4, kernels=[3, 3, 3, 3, 3])
    model = timm.create_model("san10_pairwise", num_classes=10, in_chans=1, **small)
    src, dst = tmp_path / "best.pth", tmp_path / "converted.pth"
    torch.save(dict(state_dict=model.state_dict(), model="san10_pairwise", in_chans=1, classes=list("abcdefghij"),
                    config=dict(model="san10_pairwise", model_kwargs=small)), src)
    assert main(["convert", str(src), str(dst)]) == 0  # model, its arguments and channels from the file
    out = read_checkpoint(dst)
    assert out["in_chans"] == 1 and out["classes"] == list("abcdefghij")
    again = timm.create_model("san10_pairwise", num_classes=10, in_chans=1, **small)
    load_checkpoint(again, dst)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    # a bare state dict needs the arguments on the command line
    torch.save(model.state_dict(), src)
    assert main(["convert", str(src), str(dst), "--model", "san10_pairwise"]) == 2
    flags = [f"--model-kwargs={k}={json.dumps(v)}" for k, v in {**small, "in_chans": 1}.items()]
    assert main(["convert", str(src), str(dst), "--model", "san10_pairwise", *flags]) == 0
    assert main(["convert", str(src), str(dst), "--model", "san10_pairwise", "--model-kwargs", "cache_dir=/"]) == 2
    assert "'cache_dir' is not an argument" in _errors(capsys)[-1]


def test_done_line_lists_what_the_folder_holds(finished_run, capsys):
    # finished without TensorBoard: its "done" line must not name tensorboard/
    assert not (finished_run / "tensorboard").exists()
    assert main(["train", "--resume", str(finished_run), "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "done:" in out and "tensorboard" not in out
    assert "checkpoints, model_best.pth, metrics.csv, metrics.json, curves.png, summary.json" in out


def test_resuming_a_finished_run_rewrites_nothing(finished_run):
    def stamps():
        return {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir() if p.name not in (".lock", "summary.json")}

    before = stamps()
    assert main(["train", "--resume", str(finished_run), "--progress", "none", "--tensorboard"]) == 0
    after = stamps()
    assert after == before


def test_ranks_that_drift_fail_the_run(tmp_path):
    # _finish on two processes whose weights differ: both raise, after summary.json records it.
    script = tmp_path / "drift.py"
    script.write_text(textwrap.dedent(f"""
        import sys, types
        from pathlib import Path
        import torch
        from torchsan.train import engine
        from torchsan.train.distributed import init_distributed, shutdown
        env = init_distributed("cpu")
        model = torch.nn.Linear(3, 2)
        torch.nn.init.constant_(model.weight, 1.0 + env.rank * 1e-6)  # rank 1 has drifted
        cfg = engine.TrainConfig(model="san10_pairwise", epochs=1)
        parts = types.SimpleNamespace(ddp=model, n_params=8, gmacs=None)
        data = types.SimpleNamespace(info=types.SimpleNamespace(name="x"))
        state = engine.RunState(history=[dict(epoch=1, val_top1=50.0, val_top5=100.0)], best_top1=50.0)
        state.start_time = 0.0
        try:
            engine._finish(cfg, env, Path({str(tmp_path)!r}), data, parts, state, None)
        except RuntimeError as err:
            print("rank", env.rank, "raised:", err, flush=True)
        shutdown()
    """))
    proc = subprocess.run([*TORCHRUN[:-2], str(script)], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("processes ended with different weights") == 2
    assert json.loads((tmp_path / "summary.json").read_text())["ranks_in_sync"] is False
