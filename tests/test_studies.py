"""The paper's studies as commands: ``torchsan robustness rotate``."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import yaml
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
    # a second call finds the checkpoint done and does not evaluate it again, whatever threads or batch it runs with
    stamp = (out / "rotate.json").stat().st_mtime_ns
    assert main(["robustness", "rotate", str(tiny_checkpoint), "--output", str(out), "--threads", "1",
                 "--batch-size", "5"]) == 0
    assert (out / "rotate.json").stat().st_mtime_ns == stamp
    # other images are another result: kept beside the first
    assert main(["robustness", "rotate", str(tiny_checkpoint), "--output", str(out), "--val-subset", "6"]) == 0
    assert sorted(r["images"] for r in json.loads((out / "rotate.json").read_text()).values()) == [6, 12]


# --- the targeted attack -----------------------------------------------------------------------------------------

def _tiny_model():
    import timm

    from conftest import TINY_SAN

    torch.manual_seed(0)
    model = timm.create_model("san10_pairwise", num_classes=5, **TINY_SAN)
    with torch.no_grad():  # BN statistics that are not the defaults, so that a change would show
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


MEAN, STD = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)


def test_targets_are_never_the_labels_and_do_not_depend_on_batching():
    from torchsan.studies import targets_for

    labels = torch.randint(0, 4, (300,))
    targets = targets_for(labels, 0, 4, seed=3)
    assert (targets != labels).all() and targets.min() >= 0 and targets.max() < 4
    assert len(set(targets.tolist())) == 4  # every class is a target for some image
    split = torch.cat([targets_for(labels[:100], 0, 4, 3), targets_for(labels[100:], 100, 4, 3)])
    assert torch.equal(split, targets)
    assert not torch.equal(targets_for(labels, 0, 4, seed=4), targets)


def test_one_pgd_step_is_the_formula():
    from torchsan.studies import pgd

    model = _tiny_model()
    images, targets = torch.rand(3, 3, 16, 16), torch.tensor([1, 4, 2])
    eps, alpha = 8 / 255, 3 / 255
    x = images.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model((x - MEAN) / STD), targets)
    (grad,) = torch.autograd.grad(loss, x)
    expected = (images - alpha * grad.sign()).clamp(images - eps, images + eps).clamp(0, 1)
    adversarial, _ = pgd(model, images, targets, MEAN, STD, eps, alpha, steps=1)
    assert torch.equal(adversarial, expected)


def test_pgd_agrees_with_torchattacks():
    """Our targeted PGD and torchattacks' (a well-kept library, fed the same model behind its normalisation) give
    the same images after 1 and 6 steps (float64: no sign of a gradient flips on a rounding difference)."""
    torchattacks = pytest.importorskip("torchattacks")
    from torchsan.studies import pgd

    model = _tiny_model().double()
    mean, std = MEAN.double(), STD.double()

    class OnPixels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model((x - mean) / std)

    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 16, 16, dtype=torch.float64, generator=generator)
    targets = torch.tensor([1, 4, 2, 0])
    for steps in (1, 6):
        attack = torchattacks.PGD(OnPixels().eval(), eps=8 / 255, alpha=2 / 255, steps=steps, random_start=False)
        attack.set_mode_targeted_by_label(quiet=True)
        theirs = attack(images, targets)
        ours, _ = pgd(model, images, targets, mean, std, 8 / 255, 2 / 255, steps=steps)
        assert (ours - images).abs().max() >= min(2 * steps, 8) / 255 - 1e-12  # it moved them (to the ball's edge)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_pgd_stays_in_the_ball_raises_the_target_and_leaves_bn_alone():
    from torchsan.studies import pgd

    model = _tiny_model()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    images, targets = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    eps = 4 / 255
    adversarial, logits = pgd(model, images, targets, MEAN, STD, eps, 1 / 255, steps=8, record=(1, 2, 4, 8))
    assert (adversarial - images).abs().max() <= eps + 1e-7
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        start = model((images - MEAN) / STD).log_softmax(1).gather(1, targets[:, None]).mean()
    rising = [logits[s].log_softmax(1).gather(1, targets[:, None]).mean() for s in (1, 2, 4, 8)]
    assert start < rising[0] < rising[-1]
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    assert not model.training


def test_attack_command_end_to_end_and_resumes(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "attack"
    args = ["robustness", "attack", str(tiny_checkpoint), "--output", str(out), "--steps", "1,2,4",
            "--epsilon", "8/255", "--step-size", "2/255"]
    assert main(args) == 0
    assert "epsilon 8/255, step 2/255" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"attack.json", "attack.csv", "attack.md", "attack.png"}
    (result,) = json.loads((out / "attack.json").read_text()).values()
    assert [r["steps"] for r in result["rows"]] == [1, 2, 4] and result["images"] == 12
    assert len(result["targets"]) == 12 and all(0 <= r["success"] <= 100 for r in result["rows"])
    stamp = (out / "attack.json").stat().st_mtime_ns
    assert main([*args, "--threads", "1"]) == 0
    assert (out / "attack.json").stat().st_mtime_ns == stamp  # done: not attacked again, whatever the threads
    assert main([*args[:-4], "--epsilon", "2"]) == 2  # beyond the pixel scale


# --- the ablations -----------------------------------------------------------------------------------------------


def _ablation_base(path, image_folder, **extra) -> None:
    """The tiny ablation's base config: TINY_SAN on the test image folder, one epoch at 16 px."""
    from conftest import TINY_SAN

    lines = [f"model: san10_pairwise\nmodel_kwargs: {json.dumps(TINY_SAN)}\ndata: {image_folder}\n"
             "image_size: 16\nbatch_size: 6\nepochs: 1\nlr: 0.05\nprogress: none\ntensorboard: false\n"]
    lines += [f"{key}: {value}\n" for key, value in extra.items()]
    path.write_text("".join(lines))


@pytest.mark.parametrize("study", ["relation", "mapping", "transforms", "footprint", "position"])
def test_ablate_changes_only_the_named_option(study, image_folder, tmp_path, capsys):
    import timm

    from conftest import TINY_SAN
    from torchsan.studies import variants
    from torchsan.train import load_config

    base = tmp_path / "base.yaml"
    _ablation_base(base, image_folder)
    out = tmp_path / "ablate"
    assert main(["ablate", study, str(base), "--output", str(out)]) == 0
    table = (out / f"ablate-{study}.md").read_text()
    expected = variants(study, "san10_pairwise", TINY_SAN)
    assert table.count("\n| ") == len(expected) + 1  # header and one row per variant
    base_cfg = load_config(base).to_dict()
    for label, model, changes in expected:
        run = next(p for p in (out / study).iterdir() if (p / "config.yaml").exists() and
                   load_config(p / "config.yaml").model_kwargs == {**TINY_SAN, **changes} and
                   load_config(p / "config.yaml").model == model)
        saved = load_config(run / "config.yaml").to_dict()
        differ = {k for k in saved if saved[k] != base_cfg[k]}
        assert differ <= {"model", "model_kwargs", "output"}, (label, differ)
        changed = {k for k, v in changes.items() if TINY_SAN.get(k) != v}  # (a variant may be the base itself)
        assert {k for k in saved["model_kwargs"] if saved["model_kwargs"][k] != TINY_SAN.get(k)} == changed
        built = timm.create_model(model, num_classes=3, **saved["model_kwargs"])
        attn = built.stages[1].blocks[0].attn
        for key, value in changes.items():
            if key in ("relation", "transform"):
                assert getattr(attn, key) == value, (label, key)
            if key == "position_encoding":
                assert (getattr(attn, "pos_proj", None) is not None) == value, label
    # a second call trains nothing: every run is complete
    stamps = {p: (p / "summary.json").stat().st_mtime_ns for p in (out / study).iterdir()}
    assert main(["ablate", study, str(base), "--output", str(out)]) == 0
    assert stamps == {p: (p / "summary.json").stat().st_mtime_ns for p in (out / study).iterdir()}


def test_ablate_trains_variants_side_by_side_with_jobs(image_folder, tmp_path):
    from torchsan.train import load_config

    base = tmp_path / "base.yaml"
    _ablation_base(base, image_folder, val_subset=9, threads=2)
    out = tmp_path / "ablate"
    assert main(["ablate", "position", str(base), "--output", str(out), "--jobs", "2"]) == 0
    rows = json.loads((out / "ablate-position.json").read_text())
    assert sorted(rows) == ["with position encoding", "without"]
    for row in rows.values():
        run = out / row["run"]
        assert json.loads((run / "summary.json").read_text())["final"]["val_images"] == 9
        assert load_config(run / "config.yaml").threads == 1  # each of the 2 at a time on half the threads
        assert row["top1"] is not None
    stamps = {name: (out / row["run"] / "summary.json").stat().st_mtime_ns for name, row in rows.items()}
    assert main(["ablate", "position", str(base), "--output", str(out), "--jobs", "2"]) == 0  # finished: read only
    assert stamps == {name: (out / row["run"] / "summary.json").stat().st_mtime_ns for name, row in rows.items()}
    with pytest.raises(SystemExit):
        main(["ablate", "position", str(base), "--output", str(out), "--jobs", "x"])
    assert main(["ablate", "position", str(base), "--output", str(out), "--jobs", "0"]) == 2


def test_ablate_with_jobs_names_the_run_that_failed_and_finishes_the_other(image_folder, tmp_path, capsys):
    from torchsan.train.run_folder import RunFolderLock

    base = tmp_path / "base.yaml"
    _ablation_base(base, image_folder, val_subset=9)
    out = tmp_path / "ablate"
    lock = RunFolderLock(out / "position" / "without").acquire()  # another process's run holds this folder
    try:
        assert main(["ablate", "position", str(base), "--output", str(out), "--jobs", "2"]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert "1 of 2 runs failed" in err and "position/without" in err and "with_position" not in err
    assert (out / "position" / "with_position_encoding" / "summary.json").is_file()
    assert not (out / "position" / "without" / "summary.json").exists()


def test_ablate_reuses_a_run_that_trained_a_variant_and_the_report_pairs_it(image_folder, tmp_path):
    from torchsan.studies.ablate import same_experiment
    from torchsan.train import load_config

    base = tmp_path / "base.yaml"
    _ablation_base(base, image_folder, val_subset=9)
    study = tmp_path / "study"
    core, other = study / "core", study / "other_lr"
    assert main(["train", str(base), "--output", str(core)]) == 0  # position encoding left at its default (on)
    assert main(["train", str(base), "--lr", "0.02", "--output", str(other)]) == 0  # another recipe
    stamp = (core / "summary.json").stat().st_mtime_ns
    out = study / "ablate"
    assert main(["ablate", "position", str(base), "--output", str(out), "--reuse", str(other), str(core)]) == 0
    assert (core / "summary.json").stat().st_mtime_ns == stamp  # stood in for "with position encoding", untrained
    assert sorted(p.name for p in (out / "position").iterdir()) == ["without"]
    rows = json.loads((out / "ablate-position.json").read_text())
    assert rows["with position encoding"]["run"] == "../core" and rows["without"]["run"] == "position/without"
    assert rows["with position encoding"]["top1"] == json.loads((core / "summary.json").read_text())["final"][
        "val_top1"]
    # an option left out equals its default; any other difference is another experiment
    cfg = load_config(core / "config.yaml")
    assert same_experiment(cfg, dataclasses.replace(cfg, output="x", threads=1,
                                                    model_kwargs={**cfg.model_kwargs, "relation": "subtraction"}))
    assert not same_experiment(cfg, dataclasses.replace(cfg, model_kwargs={**cfg.model_kwargs, "relation": "dot"}))
    assert not same_experiment(cfg, load_config(other / "config.yaml"))
    # a depth's layers come from the model's name: SAN15 with SAN10's layers is another model
    s15 = dataclasses.replace(cfg, model="san15_pairwise", model_kwargs={"small_input": True})
    with_layers = dataclasses.replace(s15, model_kwargs={"small_input": True, "layers": [3, 2, 3, 5, 2]})
    assert same_experiment(s15, with_layers)
    assert not same_experiment(s15, dataclasses.replace(with_layers, model_kwargs={"layers": [2, 1, 2, 4, 1],
                                                                                     "small_input": True}))
    # the study folder moved elsewhere still reports: the ablation's runs are found relative to its table
    moved = tmp_path / "moved"
    study.rename(moved)
    assert main(["report", str(moved)]) == 0
    page = (moved / "report.md").read_text()
    assert "- without vs with position encoding: " in page and "no paired test" not in page.split("## Ablation")[1]
    # --collect: the result files alone (no checkpoint), elsewhere; the page built from them links what exists
    kept, docs = tmp_path / "kept", tmp_path / "docs" / "results.md"
    assert main(["report", str(moved), "--collect", str(kept), "--output", str(docs)]) == 0
    assert not list(kept.rglob("*.pth")) and not list(kept.rglob("events.*"))
    assert (kept / "core" / "val_predictions.json").is_file() and (kept / "ablate" / "ablate-position.png").is_file()
    collected = docs.read_text()
    links = re.findall(r"\]\(([^)]+)\)", collected)
    assert "![ablation: position](../kept/ablate/ablate-position.png)" in collected and len(links) >= 4
    assert all((docs.parent / link).is_file() for link in links), links
    # the same tables and tests, read from the copy
    assert collected.split("## Runs")[1] == page.split("## Runs")[1].replace("](", "](../kept/")
    assert main(["report", str(moved), "--collect", str(moved / "inside")]) == 2
    assert main(["ablate", "position", str(base), "--output", str(out), "--reuse", str(tmp_path / "nope")]) == 2


def test_bad_study_input_is_one_line_and_leaves_no_folder(tiny_checkpoint, tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    for args in (["robustness", "rotate", str(tiny_checkpoint), str(missing), "--output", str(tmp_path / "r")],
                 ["robustness", "attack", str(missing), "--output", str(tmp_path / "a")],
                 ["ablate", "relation", "san_resnet26", "--output", str(tmp_path / "b")]):
        assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("torchsan: error:")]
    assert len(errors) == 3 and "does not exist" in errors[0] and "must be a SAN" in errors[2]
    assert list(tmp_path.iterdir()) == []


# --- the report ---------------------------------------------------------------------------------------------------

def test_mcnemar_exact_p_values():
    from torchsan.studies.report import mcnemar

    def pairs(only_a, only_b, both=3, neither=2):
        a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
        b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
        return a, b

    # two-sided binomial on the discordant images: 2 * sum_{i <= min} C(n, i) / 2^n, by hand
    assert mcnemar(*pairs(0, 5)) == (0, 5, 2 / 32)
    assert mcnemar(*pairs(9, 1)) == (9, 1, 2 * (1 + 10) / 1024)
    assert mcnemar(*pairs(3, 3)) == (3, 3, 1.0)
    assert mcnemar(*pairs(0, 0)) == (0, 0, 1.0)
    only_a, only_b, p = mcnemar(*pairs(400, 600))  # large counts: exact integers, no underflow
    assert (only_a, only_b) == (400, 600) and 0 < p < 1e-9
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar([True], [True, False])


def _fake_run(folder, model, labels, predictions, top1):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(dict(
        model=model, params=1000, gmacs=0.001, epochs=1, image_size=16, seconds=60.0, best_val_top1=top1,
        final=dict(val_top1=top1, val_top5=100.0))))
    (folder / "val_predictions.json").write_text(json.dumps(dict(labels=labels, predictions=predictions)))


def test_report_builds_from_stored_files_alone(tmp_path, capsys):
    labels = [i % 3 for i in range(60)]
    right = list(labels)
    # b beats a on 12 images and loses none (p = 2 / 2^12: resolved); c differs from a on 2 images each way
    a_pred = [(t + 1) % 3 if i < 20 else t for i, t in enumerate(labels)]
    b_pred = [(t + 1) % 3 if i < 8 else t for i, t in enumerate(labels)]
    c_pred = [t if i in (0, 1) else p for i, (t, p) in enumerate(zip(labels, a_pred))]
    c_pred[30], c_pred[31] = (labels[30] + 1) % 3, (labels[31] + 1) % 3
    _fake_run(tmp_path / "runs" / "a", "san10_pairwise", labels, a_pred, 66.67)
    _fake_run(tmp_path / "runs" / "b", "san_resnet26", labels, b_pred, 86.67)
    _fake_run(tmp_path / "runs" / "c", "san10_patchwise", labels, c_pred, 66.67)
    _fake_run(tmp_path / "runs" / "other", "san10_pairwise", labels[:30], right[:30], 100.0)  # other images
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.md").read_text()
    assert "| runs/a | san10_pairwise |" in page and "| runs/b | san_resnet26 |" in page
    assert "- runs/a vs runs/b: runs/b ahead by 20.00 points (0 images right only for runs/a, 12 only for " \
           "runs/b; p = 0.000488)" in page
    assert "- runs/a vs runs/c: not resolved: +0.00 points for runs/a (2 images right only for runs/a, 2 only " \
           "for runs/c; p = 1)" in page
    assert "runs/other vs" not in page and "vs runs/other" not in page  # different images: no paired test
    assert "wrote" in capsys.readouterr().out
    # nothing to report: one clear line, nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert not (empty / "report.md").exists()


def test_predictions_and_report_from_real_results(tiny_checkpoint, tmp_path):
    """Training stores its last validation's predictions; eval --predictions gives the same for the same weights;
    rotate and attack store per-image outcomes, and the report pairs them."""
    run = tiny_checkpoint.parent
    stored = json.loads((run / "val_predictions.json").read_text())
    assert len(stored["labels"]) == len(stored["predictions"]) == 12
    last = sorted(run.glob("checkpoint-e*.pth"))[-1]
    assert main(["eval", str(last), "--predictions", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text()) == stored
    out = tmp_path / "results"
    assert main(["robustness", "rotate", str(tiny_checkpoint), str(last), "--output", str(out / "rotate")]) == 0
    assert main(["robustness", "attack", str(tiny_checkpoint), str(last), "--output", str(out / "attack"),
                 "--steps", "1"]) == 0
    assert main(["report", str(out)]) == 0
    page = (out / "report.md").read_text()
    assert "## Rotations and flips (zero-shot)" in page and "## Targeted PGD attack" in page
    assert page.count("- rotated 90 cw, ") == 1 and "no paired test" not in page
    assert "![an image under every transform](rotate/rotate.png)" in page
    assert "![attack success against steps](attack/attack.png)" in page


# --- the claims ---------------------------------------------------------------------------------------------------

def test_paired_comparison_and_verdicts_by_hand():
    from torchsan.studies.claims import compare

    a = [1] * 60 + [0] * 40  # A right on 10 images where B is wrong, and on none where B is right alone
    b = [1] * 50 + [0] * 50
    c = compare(a, b)
    # d = 1 on 10 of 100 images: mean 0.1, sample variance 9/99, 90% half-width 1.6449 * sqrt(9/99/100)
    half = 1.6448536269514722 * (9 / 99 / 100) ** 0.5
    assert (c.better_a, c.better_b) == (10, 0) and c.p == pytest.approx(2 / 2**10)
    assert c.gap == pytest.approx(10.0) and c.low == pytest.approx(100 * (0.1 - half))
    assert c.high == pytest.approx(100 * (0.1 + half)) and 4.9 < c.low < 5.1
    assert c.verdict(">", 0) == "agrees" and c.verdict(">=", 1.0) == "agrees"
    assert c.verdict("=", 1.0) == "disagrees" and c.verdict("=", 20.0) == "agrees"
    r = compare(b, a)
    assert r.verdict(">", 0) == "disagrees" and r.verdict(">=", 1.0) == "disagrees"
    assert r.verdict(">=", 10.0) == "not resolved"  # the interval straddles -10
    close = compare([1, 0] * 10 + [1] * 80, [0, 1] * 10 + [1] * 80)  # 10 each way: no gap, wide interval
    assert close.gap == 0 and close.p == 1.0
    assert close.verdict(">", 0) == "not resolved" and close.verdict("=", 1.0) == "not resolved"
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        compare([1], [1, 0])


def _claims_file(path, claims, preface="Ran here."):
    path.write_text(yaml.safe_dump(dict(preface=preface, claims=claims)))
    return path


def test_claims_page_from_stored_files(tmp_path):
    from torchsan.studies._store import pack_bits

    labels = [i % 3 for i in range(100)]
    wrong = lambda n: [(t + 1) % 3 if i < n else t for i, t in enumerate(labels)]  # noqa: E731
    root = tmp_path / "study"
    _fake_run(root / "san", "san10_pairwise", labels, wrong(10), 90.0)   # 90% right
    _fake_run(root / "cnn", "san_resnet26", labels, wrong(40), 60.0)     # 60% right, same images
    _fake_run(root / "twin", "san10_pairwise", labels, wrong(10), 90.0)  # identical to san

    def rotate_result(name, given, turned):
        bits = lambda n: pack_bits([i >= n for i in range(100)])  # noqa: E731
        return dict(checkpoint=f"runs/{name}/model_best.pth", model=name, images=100, results={
            "as given": dict(top1=100 - given, top5=100.0, images=100, hits=bits(given)),
            "flipped up-down": dict(top1=100 - turned, top5=100.0, images=100, hits=bits(turned))})
    (root / "robustness").mkdir()
    # san drops 5 points, cnn 40: san more robust
    (root / "robustness" / "rotate.json").write_text(json.dumps(dict(
        k1=rotate_result("san", 10, 15), k2=rotate_result("cnn", 40, 80))))

    def attack_result(name, succeeded):
        return dict(checkpoint=f"runs/{name}/model_best.pth", model=name, images=100, epsilon=0.03, step_size=0.01,
                    seed=0, clean_top1=90.0, rows=[dict(steps=8, success=float(succeeded), top1=50.0)],
                    success_bits=pack_bits([i < succeeded for i in range(100)]))
    (root / "robustness" / "attack.json").write_text(json.dumps(dict(
        k1=attack_result("san", 90), k2=attack_result("cnn", 30))))  # san attacked more often: disagrees

    spec = _claims_file(tmp_path / "claims.yaml", [
        dict(claim="SAN beats the CNN", runs=["san", "cnn"], expect=">"),
        dict(claim="SAN beats the CNN by 30", runs=["san", "cnn"], expect=">", paper_gap=30),
        dict(claim="SAN beats the CNN by 50", runs=["san", "cnn"], expect=">", paper_gap=50),
        dict(claim="SAN beats the CNN by 5", runs=["san", "cnn"], expect=">", paper_gap=5),
        dict(claim="twins are equal", runs=["san", "twin"], expect="=", margin=1.0),
        dict(claim="the CNN matches SAN", runs=["cnn", "san"], expect=">=", margin=1.0),
        dict(claim="SAN is robust to flips", rotate=["san", "cnn"], expect=">"),
        dict(claim="SAN resists attack", attack=["san", "cnn"], expect=">"),
        dict(claim="a run not trained yet", runs=["san", "absent"], expect=">"),
        dict(claim="mapping", not_run="not in this study"),
    ])
    page_path = tmp_path / "page.md"
    assert main(["report", str(root), "--claims", str(spec), "--output", str(page_path)]) == 0
    page = page_path.read_text()
    rows = {line.split(" | ")[0][2:]: line for line in page.splitlines() if line.startswith("| ")}
    assert page.index("## The paper's claims") < page.index("## Runs") and "Ran here." in page
    assert rows["SAN beats the CNN"].endswith("| **agrees** |") and "90.00 vs 60.00 top-1" in rows["SAN beats the CNN"]
    # the paper's gap: inside our interval (about 30 +- 7.6), or outside it on either side
    assert rows["SAN beats the CNN by 30"].endswith("| **agrees**, in size too |")
    assert "paper: +30" in rows["SAN beats the CNN by 30"]
    assert rows["SAN beats the CNN by 50"].endswith(
        "| **agrees in direction**; the gap is smaller than the paper's 50 points |")
    assert rows["SAN beats the CNN by 5"].endswith(
        "| **agrees in direction**; the gap is larger than the paper's 5 points |")
    assert rows["twins are equal"].endswith("| **agrees** |")  # identical predictions: a zero-width interval
    assert rows["the CNN matches SAN"].endswith("| **disagrees** |")
    assert "flipped up-down: drop 5.00 vs 40.00" in rows["SAN is robust to flips"]
    assert rows["SAN is robust to flips"].endswith("| **agrees** |")
    assert rows["SAN resists attack"].endswith("| **disagrees** |")
    assert "not measured: run 'absent' has no results | not run |" in rows["a run not trained yet"]
    assert rows["mapping"].endswith("| not in this study | not run |")


def test_bad_claims_file_is_one_clear_line(tmp_path, capsys):
    labels = [0, 1, 2]
    _fake_run(tmp_path / "study" / "a", "san10_pairwise", labels, labels, 100.0)
    bad = [
        ("claims: nope", "a list under 'claims'"),
        (yaml.safe_dump(dict(claims=[dict(claim="x", runs=["a", "b"])])), "'expect' must be one of"),
        (yaml.safe_dump(dict(claims=[dict(claim="x", runs=["a", "b"], expect="=")])), "needs a 'margin'"),
        (yaml.safe_dump(dict(claims=[dict(claim="x", runs=["a"], expect=">")])), "names two results"),
        (yaml.safe_dump(dict(claims=[dict(claim="x", runs=["a", "b"], expect=">", paper_gap="5")])), "'paper_gap'"),
        (yaml.safe_dump(dict(claims=[dict(claim="x", runs=["a", "b"], attack=["a", "b"], expect=">")])),
         "exactly one of"),
    ]
    for text, message in bad:
        (tmp_path / "c.yaml").write_text(text)
        assert main(["report", str(tmp_path / "study"), "--claims", str(tmp_path / "c.yaml")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "study" / "report.md").exists()
