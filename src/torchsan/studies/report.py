"""``torchsan report DIR``: one Markdown page from the result files under DIR, with a paired test for each comparison.

It reads only stored files, never a model or an image:

* run folders (``summary.json``, and ``val_predictions.json``, which ``torchsan train`` writes at its last
  validation): a table of the runs, and every pair of runs validated on the same images compared;
* ``ablate-STUDY.json``: each study's table, every variant compared with the study's first (the base);
* ``rotate.json``: top-1 under each transform and its drop, and under each transform every pair of checkpoints;
* ``attack.json``: success rate and top-1 after each step count, and every pair's success at the most steps.

Each table's figure (``ablate-STUDY.png``, ``rotate.png``, ``attack.png``) is embedded beside it, and each run's
``curves.png`` linked, by paths relative to the page. ``collect`` first copies the result files (not checkpoints or
TensorBoard logs) into a folder of their own, to be kept with the page (committed, say), and builds from there.

A comparison is McNemar's exact test on the images where exactly one side is right (two-sided binomial, p = 1/2).
A gap with p >= 0.05 is written "not resolved": the data cannot tell the two apart, which is not agreement.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from ._store import unpack_bits
from .claims import claims_section, load_claims, sign_test

__all__ = ["ALPHA", "RESULT_FILES", "collect_results", "mcnemar", "report", "verdict"]

ALPHA = 0.05
# What a study leaves that the page reads or shows (checkpoints and TensorBoard logs are left behind).
RESULT_FILES = ("summary.json", "val_predictions.json", "config.yaml", "metrics.json", "metrics.csv", "curves.png",
                "ablate-*.json", "ablate-*.md", "ablate-*.csv", "ablate-*.png", "rotate.*", "attack.*")


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """McNemar's exact test of paired outcomes (True: right): (only a right, only b right, two-sided p-value)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    return only_a, only_b, sign_test(only_a, only_b)


def verdict(name_a: str, name_b: str, a: Sequence[bool], b: Sequence[bool], what: str = "right") -> str:
    """One comparison as a line: which side is ahead at p < ALPHA, else "not resolved"."""
    only_a, only_b, p = mcnemar(a, b)
    gap = 100 * (sum(a) - sum(b)) / max(1, len(a))
    counts = f"{only_a} images {what} only for {name_a}, {only_b} only for {name_b}; p = {p:.3g}"
    if p < ALPHA:
        ahead = name_a if only_a > only_b else name_b
        return f"{ahead} ahead by {abs(gap):.2f} points ({counts})"
    return f"not resolved: {gap:+.2f} points for {name_a} ({counts})"


def _find(root: Path, name: str) -> list[Path]:
    return sorted(p for p in root.rglob(name) if p.is_file())


def _relative(page: Path, target: Path) -> str:
    """``target``'s path from the page's folder (a Markdown link)."""
    return Path(os.path.relpath(target.resolve(), page.parent.resolve())).as_posix()


def _figure(page: Path, png: Path, caption: str) -> list[str]:
    """A Markdown image of ``png`` relative to the page's folder, if it exists."""
    return [f"![{caption}]({_relative(page, png)})", ""] if png.is_file() else []


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not a readable result file ({err})") from None


def _hits(folder: Path) -> tuple[list[int], list[bool]] | None:
    """A run folder's validation labels and per-image top-1 hits, if it stored its predictions."""
    path = folder / "val_predictions.json"
    if not path.is_file():
        return None
    data = _load(path)
    return data["labels"], [p == t for p, t in zip(data["predictions"], data["labels"])]


def _name(root: Path, folder: Path) -> str:
    return str(folder.relative_to(root)) if folder != root else folder.name


def _runs_section(root: Path, page: Path) -> list[str]:
    summaries = [(p.parent, _load(p)) for p in _find(root, "summary.json")]
    if not summaries:
        return []
    lines = ["## Runs", "", "| run | model | params (M) | GMACs | epochs | px | top-1 | top-5 | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for folder, s in summaries:
        final = s.get("final", {})
        gmacs = "-" if s.get("gmacs") is None else f"{s['gmacs']:.4f}"
        lines.append(f"| {_name(root, folder)} | {s.get('model')} | {s.get('params', 0) / 1e6:.3f} | {gmacs} | "
                     f"{s.get('epochs')} | {s.get('image_size')} | {final.get('val_top1', float('nan')):.2f} | "
                     f"{final.get('val_top5', float('nan')):.2f} | {s.get('seconds', 0) / 60:.1f} |")
    curves = [(folder, folder / "curves.png") for folder, _ in summaries if (folder / "curves.png").is_file()]
    if curves:
        links = ", ".join(f"[{_name(root, folder)}]({_relative(page, png)})" for folder, png in curves)
        lines += ["", f"Training curves: {links}."]
    lines += ["", "Paired comparisons (McNemar, top-1 on the same validation images):", ""]
    paired = [(folder, _hits(folder)) for folder, _ in summaries]
    paired = [(folder, h) for folder, h in paired if h is not None]
    compared = 0
    for (fa, (la, ha)), (fb, (lb, hb)) in combinations(paired, 2):
        if la != lb:
            continue  # validated on different images: no paired test
        lines.append(f"- {_name(root, fa)} vs {_name(root, fb)}: "
                     f"{verdict(_name(root, fa), _name(root, fb), ha, hb)}")
        compared += 1
    if not compared:
        lines.append("- none: fewer than two runs stored their predictions on the same images")
    return lines + [""]


def _ablation_section(root: Path, page: Path) -> list[str]:
    lines: list[str] = []
    for path in _find(root, "ablate-*.json"):
        rows = list(_load(path).values())
        if not rows:
            continue
        study = rows[0].get("study", path.stem[len("ablate-"):])
        lines += [f"## Ablation: {study}", "", "| variant | model | top-1 | top-5 | params (M) | GMACs |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            top1 = "-" if r.get("top1") is None else f"{r['top1']:.2f}"
            top5 = "-" if r.get("top5") is None else f"{r['top5']:.2f}"
            gmacs = "-" if r.get("gmacs") is None else f"{r['gmacs']:.4f}"
            lines.append(f"| {r['variant']} | {r['model']} | {top1} | {top5} | {(r.get('params') or 0) / 1e6:.3f} | "
                         f"{gmacs} |")
        lines += ["", *_figure(page, path.with_suffix(".png"), f"ablation: {study}"),
                  f"Each variant against the first ({rows[0]['variant']}), McNemar on top-1:", ""]
        base = _hits(_run_folder(path, rows[0]))
        for r in rows[1:]:
            other = _hits(_run_folder(path, r))
            if base is None or other is None or base[0] != other[0]:
                lines.append(f"- {r['variant']}: no paired test (predictions not stored for both runs)")
                continue
            lines.append(f"- {r['variant']} vs {rows[0]['variant']}: "
                         f"{verdict(r['variant'], rows[0]['variant'], other[1], base[1])}")
        lines.append("")
    return lines


def _run_folder(result_file: Path, row: dict[str, Any]) -> Path:
    """An ablation row's run folder: relative to the result file's folder (as ``torchsan ablate`` records it), else
    as recorded (tables written before, relative to the working folder), else beside the result file."""
    run = Path(row.get("run", ""))
    for candidate in (result_file.parent / run, run, result_file.parent / run.parent.name / run.name):
        if candidate.is_dir():
            return candidate
    return result_file.parent / run


def _rotate_section(root: Path, page: Path) -> list[str]:
    lines: list[str] = []
    for path in _find(root, "rotate.json"):
        results = list(_load(path).values())
        if not results:
            continue
        names = list(results[0]["results"])
        lines += ["## Rotations and flips (zero-shot)", "",
                  "| checkpoint | model | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in results:
            given = r["results"][names[0]]["top1"]
            cells = [f"{r['results'][n]['top1']:.2f}" + ("" if n == names[0] else
                                                         f" ({r['results'][n]['top1'] - given:+.2f})")
                     for n in names]
            lines.append(f"| {_short(r['checkpoint'])} | {r['model']} | " + " | ".join(cells) + " |")
        lines += ["", "Top-1 (and its change from the images as given).", "",
                  *_figure(page, path.with_suffix(".png"), "an image under every transform"),
                  "Each transform, every pair of checkpoints (McNemar on top-1):", ""]
        for a, b in combinations(results, 2):
            for n in names:
                ha, hb = (_unpacked(r["results"][n]) for r in (a, b))
                label_a, label_b = _short(a["checkpoint"]), _short(b["checkpoint"])
                if ha is None or hb is None:
                    lines.append(f"- {n}, {label_a} vs {label_b}: no paired test (per-image results not stored)")
                    continue
                lines.append(f"- {n}, {label_a} vs {label_b}: {verdict(label_a, label_b, ha, hb)}")
        lines.append("")
    return lines


def _unpacked(result: dict[str, Any]) -> list[bool] | None:
    return unpack_bits(result["hits"], result["images"]) if "hits" in result else None


def _short(checkpoint: str) -> str:
    parts = Path(checkpoint).parts
    return os.path.join(*parts[-2:]) if len(parts) >= 2 else checkpoint


def _attack_section(root: Path, page: Path) -> list[str]:
    lines: list[str] = []
    for path in _find(root, "attack.json"):
        results = list(_load(path).values())
        if not results:
            continue
        first = results[0]
        steps = [row["steps"] for row in first["rows"]]
        lines += ["## Targeted PGD attack", "",
                  f"L-infinity epsilon {first['epsilon']:.4g}, step {first['step_size']:.4g} in pixel space [0, 1], "
                  f"targets drawn from (seed {first['seed']}, image index): our settings, not the paper's.", "",
                  "| checkpoint | model | clean top-1 | " + " | ".join(f"success @{s}" for s in steps) + " |",
                  "|---|---|---|" + "---|" * len(steps)]
        for r in results:
            lines.append(f"| {_short(r['checkpoint'])} | {r['model']} | {r['clean_top1']:.2f} | "
                         + " | ".join(f"{row['success']:.2f}" for row in r["rows"]) + " |")
        lines += ["", *_figure(page, path.with_suffix(".png"), "attack success against steps"),
                  f"Every pair, McNemar on per-image success after {max(steps)} steps (lower is more robust):", ""]
        for a, b in combinations(results, 2):
            label_a, label_b = _short(a["checkpoint"]), _short(b["checkpoint"])
            if "success_bits" not in a or "success_bits" not in b or a["images"] != b["images"]:
                lines.append(f"- {label_a} vs {label_b}: no paired test (per-image results not stored)")
                continue
            sa, sb = (unpack_bits(r["success_bits"], r["images"]) for r in (a, b))
            lines.append(f"- {label_a} vs {label_b}: {verdict(label_a, label_b, sa, sb, what='attacked successfully')}")
        lines.append("")
    return lines


def collect_results(folder: str | os.PathLike[str], to: str | os.PathLike[str]) -> list[Path]:
    """Copy the result files under ``folder`` (:data:`RESULT_FILES`) to ``to``, keeping their relative layout."""
    root, dest = Path(folder), Path(to)
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a folder")
    if dest.resolve() == root.resolve() or root.resolve() in dest.resolve().parents:
        raise ValueError(f"--collect {str(dest)!r} must lie outside {str(root)!r}")
    copied = []
    for pattern in RESULT_FILES:
        for src in _find(root, pattern):
            if "tensorboard" in src.relative_to(root).parts:
                continue
            target = dest / src.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            copied.append(target)
    return copied


def report(folder: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
           title: str = "torchsan results", collect: str | os.PathLike[str] | None = None,
           claims: str | os.PathLike[str] | None = None) -> Path:
    """Build the page from the result files under ``folder``; write it to ``output`` (default folder/report.md).

    ``collect``: first copy the result files to this folder (see :func:`collect_results`) and build from the copy.
    ``claims``: a claims file (:mod:`torchsan.studies.claims`): the page opens with each claim's verdict.
    """
    from ..train.checkpoint import write_text_atomic

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a folder")
    spec = load_claims(claims) if claims is not None else None
    if collect is not None:
        collect_results(root, collect)
        root = Path(collect)
    path = Path(output) if output is not None else root / "report.md"
    sections = (_runs_section(root, path) + _ablation_section(root, path) + _rotate_section(root, path)
                + _attack_section(root, path))
    if not sections:
        raise ValueError(f"{str(root)!r} holds no torchsan results (summary.json, ablate-*.json, rotate.json, "
                         f"attack.json)")
    text = "\n".join([f"# {title}", "", f"Built by `torchsan report` from the result files under `{root}`. "
                      f"Comparisons: McNemar's exact test; a gap with p >= {ALPHA} is \"not resolved\".", "",
                      *(claims_section(root, spec) if spec is not None else []), *sections])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path
