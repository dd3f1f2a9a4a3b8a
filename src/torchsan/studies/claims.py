"""The paper's claims, each checked against stored results: ``torchsan report DIR --claims FILE``.

A claims file (YAML) lists claims, each a comparison of two results under DIR with an expectation::

    preface: |            # optional Markdown, printed above the table (budget, where it ran, caveats)
      ...
    claims:
      - claim: SAN10 matches or beats ResNet26 at fewer parameters and multiply-adds
        runs: [san10_pairwise, san_resnet26]   # two run folders (relative to DIR): top-1 per image
        expect: ">="                           # A matches or beats B, within the margin
        margin: 1.0                            # points (">=" and "=" only)
      - claim: Summation, subtraction and Hadamard product are about equal
        ablation: relation                     # an ablation table (ablate-relation.json) ...
        variants: [pairwise summation, pairwise subtraction]  # ... and its rows: for "=" every pair is compared,
                                                              # else the first against each of the others
        expect: "="
      - claim: Without position encoding, top-1 drops by about 5 points
        runs: [san10_pairwise, san10_pairwise_no_position]
        expect: ">"
        paper_gap: 5                           # optional, 'runs' only: the paper's gap in points; full agreement
                                               # also needs it inside our 90% interval
      - claim: SAN is more robust to rotated images
        rotate: [san10_pairwise, san_resnet26] # the drop from the images as given, under each transform
        expect: ">"
      - claim: SAN is more robust to adversarial attack
        attack: [san10_pairwise, san_resnet26] # per-image success after the most steps: lower is better
        expect: ">"
      - claim: Two linear layers are the best mapping
        not_run: the mapping study is not part of this study

Every comparison is paired, per image: d_i = A's score - B's score (top-1 hit; minus the drop under a transform;
minus attack success). Verdicts:

* ``">"`` (A better): *agrees* when the sign test on the images where A and B differ gives p < 0.05 in A's favour
  (for top-1 hits this is McNemar's exact test), *disagrees* when it does in B's favour, else *not resolved*.
* ``">="`` (A matches or beats B): *agrees* when the lower end of the 90% confidence interval of mean(d) lies above
  -margin (non-inferiority at 5%), *disagrees* when its upper end lies below -margin, else *not resolved*.
* ``"="`` (about equal): *agrees* when the 90% interval lies within +-margin (two one-sided tests at 5%),
  *disagrees* when it lies wholly outside, else *not resolved*.

A claim whose results are missing says so; a gap the data cannot resolve is never written as agreement.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

__all__ = ["Comparison", "claims_section", "compare", "load_claims", "sign_test"]

ALPHA = 0.05
_Z90 = 1.6448536269514722  # two-sided 90% interval: the 5% one-sided tests of ">=" and "="
_EXPECT = {">": "A better than B", ">=": "A matches or beats B", "=": "A and B about equal"}
_KINDS = ("runs", "ablation", "rotate", "attack", "not_run")


def sign_test(positive: int, negative: int) -> float:
    """Two-sided exact sign test (binomial, p = 1/2) of ``positive`` against ``negative`` outcomes."""
    n = positive + negative
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(positive, negative) + 1))  # exact integers: no underflow
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class Comparison:
    """One paired comparison of A and B; ``gap`` and the interval are in points (percent of images)."""

    gap: float
    low: float
    high: float
    better_a: int  # images where A scores higher
    better_b: int
    p: float

    def verdict(self, expect: str, margin: float) -> str:
        if expect == ">":
            if self.p < ALPHA:
                return "agrees" if self.better_a > self.better_b else "disagrees"
            return "not resolved"
        if expect == ">=":
            return "agrees" if self.low > -margin else "disagrees" if self.high < -margin else "not resolved"
        if expect == "=":
            if -margin < self.low and self.high < margin:
                return "agrees"
            return "disagrees" if self.low > margin or self.high < -margin else "not resolved"
        raise ValueError(f"unknown expectation {expect!r}; one of {', '.join(_EXPECT)}")

    def text(self) -> str:
        return (f"{self.gap:+.2f} points [90% CI {self.low:+.2f}, {self.high:+.2f}]; "
                f"{self.better_a} images favour A, {self.better_b} B, sign test p = {self.p:.3g}")


def compare(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """Paired comparison of per-image scores (e.g. 1.0 for a right prediction), A minus B."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need equal, non-zero lengths, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
    half = _Z90 * math.sqrt(var / n)
    better_a, better_b = sum(x > 0 for x in d), sum(x < 0 for x in d)
    return Comparison(100 * mean, 100 * (mean - half), 100 * (mean + half), better_a, better_b,
                      sign_test(better_a, better_b))


def load_claims(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a claims file: ``{"preface": str, "claims": [dict, ...]}``."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{str(path)!r} is not a readable claims file ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("claims"), list):
        raise ValueError(f"{str(path)!r}: a claims file is a mapping with a list under 'claims'")
    for i, claim in enumerate(data["claims"], 1):
        where = f"{str(path)!r}, claim {i}"
        if not isinstance(claim, dict) or not isinstance(claim.get("claim"), str):
            raise ValueError(f"{where}: each claim is a mapping with its text under 'claim'")
        kinds = [k for k in _KINDS if k in claim]
        if len(kinds) != 1:
            raise ValueError(f"{where}: name exactly one of {', '.join(_KINDS)}, got {kinds or 'none'}")
        kind = kinds[0]
        if kind == "not_run":
            continue
        if claim.get("expect") not in _EXPECT:
            raise ValueError(f"{where}: 'expect' must be one of {', '.join(repr(e) for e in _EXPECT)}")
        if claim["expect"] != ">" and not isinstance(claim.get("margin"), (int, float)):
            raise ValueError(f"{where}: expect {claim['expect']!r} needs a 'margin' in points")
        if "paper_gap" in claim and (kind != "runs" or not isinstance(claim["paper_gap"], (int, float))):
            raise ValueError(f"{where}: 'paper_gap' is a number of points, for a 'runs' claim")
        if kind == "ablation":
            if not isinstance(claim.get("variants"), list) or len(claim["variants"]) < 2:
                raise ValueError(f"{where}: an ablation claim names two or more 'variants'")
        elif not (isinstance(claim[kind], list) and len(claim[kind]) == 2):
            raise ValueError(f"{where}: {kind!r} names two results, A and B")
    return dict(preface=str(data.get("preface") or "").strip(), claims=data["claims"])


class _Missing(Exception):
    """A result a claim needs is not stored (yet)."""


def _run_scores(root: Path, name: str) -> tuple[list[int], list[float], dict[str, Any]]:
    from .report import _load

    folder = root / name
    if not (folder / "val_predictions.json").is_file() or not (folder / "summary.json").is_file():
        raise _Missing(f"run {name!r} has no results")
    data = _load(folder / "val_predictions.json")
    return data["labels"], [float(p == t) for p, t in zip(data["predictions"], data["labels"])], \
        _load(folder / "summary.json")


def _size(summary: dict[str, Any]) -> str:
    gmacs = summary.get("gmacs")
    return f"{summary.get('params', 0) / 1e6:.2f}M params" + ("" if gmacs is None else f", {gmacs:.3f} GMACs")


def _runs(root: Path, claim: dict[str, Any]) -> tuple[list[str], list[Comparison]]:
    a, b = claim["runs"]
    (la, sa, ma), (lb, sb, mb) = _run_scores(root, a), _run_scores(root, b)
    if la != lb:
        raise _Missing(f"runs {a!r} and {b!r} were validated on different images")
    c = compare(sa, sb)
    top1 = f"{100 * sum(sa) / len(sa):.2f} vs {100 * sum(sb) / len(sb):.2f} top-1"
    extra = f"; paper: {claim['paper_gap']:+g}" if "paper_gap" in claim else ""
    return [f"{top1}: {c.text()}{extra}", f"{_size(ma)} vs {_size(mb)}"], [c]


def _ablation(root: Path, claim: dict[str, Any]) -> tuple[list[str], list[Comparison], list[str]]:
    from .report import _find, _load, _run_folder

    tables = [p for p in _find(root, f"ablate-{claim['ablation']}.json")]
    if not tables:
        raise _Missing(f"ablation {claim['ablation']!r} has no table")
    rows = {r["variant"]: r for r in _load(tables[0]).values()}
    scores = {}
    for variant in claim["variants"]:
        if variant not in rows:
            raise _Missing(f"ablation {claim['ablation']!r} has no row {variant!r} yet")
        folder = _run_folder(tables[0], rows[variant])
        labels, s, _ = _run_scores(folder.parent, folder.name)
        scores[variant] = (labels, s)
    lines, comparisons, names = [], [], []
    first, *others = claim["variants"]
    pairs = combinations(claim["variants"], 2) if claim["expect"] == "=" else [(first, v) for v in others]
    for va, vb in pairs:
        if scores[va][0] != scores[vb][0]:
            raise _Missing(f"{va!r} and {vb!r} were validated on different images")
        c = compare(scores[va][1], scores[vb][1])
        lines.append(f"{va} - {vb}: {c.text()}")
        comparisons.append(c)
        names.append(f"{va} vs {vb}")
    tops = ", ".join(f"{v} {100 * sum(s) / len(s):.2f}" for v, (_, s) in scores.items())
    return [f"top-1: {tops}", *lines], comparisons, names


def _by_checkpoint(root: Path, file: str, name: str) -> dict[str, Any]:
    from .report import _find, _load

    for path in _find(root, file):
        for result in _load(path).values():
            if Path(result["checkpoint"]).parent.name == name:
                return result
    raise _Missing(f"{file} holds no result for {name!r}")


def _rotate(root: Path, claim: dict[str, Any]) -> tuple[list[str], list[Comparison], list[str]]:
    from ._store import unpack_bits

    a, b = (_by_checkpoint(root, "rotate.json", name) for name in claim["rotate"])
    names = list(a["results"])
    if list(b["results"]) != names or a["images"] != b["images"]:
        raise _Missing("the two rotation results used different transforms or images")

    def hits(result: dict[str, Any], name: str) -> list[float]:
        if "hits" not in result["results"][name]:
            raise _Missing("the rotation results do not store per-image outcomes")
        return [float(x) for x in unpack_bits(result["results"][name]["hits"], result["images"])]

    given_a, given_b = hits(a, names[0]), hits(b, names[0])
    lines, comparisons = [], []
    for name in names[1:]:
        # robustness: minus the drop (transformed hit - given hit), per image
        ra = [t - g for t, g in zip(hits(a, name), given_a)]
        rb = [t - g for t, g in zip(hits(b, name), given_b)]
        c = compare(ra, rb)
        drop_a = a["results"][names[0]]["top1"] - a["results"][name]["top1"]
        drop_b = b["results"][names[0]]["top1"] - b["results"][name]["top1"]
        lines.append(f"{name}: drop {drop_a:.2f} vs {drop_b:.2f}; A drops less by {c.text()}")
        comparisons.append(c)
    return lines, comparisons, names[1:]


def _attack(root: Path, claim: dict[str, Any]) -> tuple[list[str], list[Comparison], list[str]]:
    from ._store import unpack_bits

    a, b = (_by_checkpoint(root, "attack.json", name) for name in claim["attack"])
    if a["images"] != b["images"] or "success_bits" not in a or "success_bits" not in b:
        raise _Missing("the two attack results used different images or lack per-image outcomes")
    if (a["epsilon"], a["step_size"], a["seed"]) != (b["epsilon"], b["step_size"], b["seed"]):
        raise _Missing("the two attack results used different settings")
    steps = a["rows"][-1]["steps"]
    # robustness: minus the success, per image
    sa, sb = ([-float(x) for x in unpack_bits(r["success_bits"], r["images"])] for r in (a, b))
    c = compare(sa, sb)
    return [f"success after {steps} steps {a['rows'][-1]['success']:.2f}% vs {b['rows'][-1]['success']:.2f}%; "
            f"A resists more by {c.text()}"], [c], [f"{steps} steps"]


def _overall(verdicts: list[str], names: list[str]) -> str:
    if len(verdicts) == 1:
        return f"**{verdicts[0]}**"
    counts = {v: verdicts.count(v) for v in ("agrees", "disagrees", "not resolved") if v in verdicts}
    if len(counts) == 1:
        return f"**{verdicts[0]}** (all {len(verdicts)})"
    parts = [f"{v} on {', '.join(n for n, w in zip(names, verdicts) if w == v)}" for v in counts]
    return "**mixed**: " + "; ".join(parts)


def _size_verdict(c: Comparison, paper_gap: float) -> str:
    """A claim that names the paper's gap agrees fully only when that gap lies in our 90% interval."""
    if c.low <= paper_gap <= c.high:
        return "**agrees**, in size too"
    size = "smaller" if c.high < paper_gap else "larger"
    return f"**agrees in direction**; the gap is {size} than the paper's {paper_gap:g} points"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def claims_section(root: Path, spec: dict[str, Any]) -> list[str]:
    """The page's section: one table row per claim, what we measured and the verdict, then how to read it."""
    lines = ["## The paper's claims", ""]
    if spec["preface"]:
        lines += [spec["preface"], ""]
    lines += ["| the paper says | A vs B | what we measured | verdict |", "|---|---|---|---|"]
    for claim in spec["claims"]:
        kind = next(k for k in _KINDS if k in claim)
        if kind == "not_run":
            lines.append(f"| {_cell(claim['claim'])} | - | {_cell(str(claim['not_run']))} | not run |")
            continue
        expect, margin = claim["expect"], float(claim.get("margin", 0.0))
        subjects = claim["variants"] if kind == "ablation" else claim[kind]
        pair = " vs ".join(f"`{s}`" for s in subjects) if kind != "ablation" else \
            f"ablation {claim['ablation']}: " + ", ".join(f"`{s}`" for s in subjects)
        try:
            if kind == "runs":
                measured, comparisons = _runs(root, claim)
                names = [""]
            else:
                measured, comparisons, names = {"ablation": _ablation, "rotate": _rotate,
                                                "attack": _attack}[kind](root, claim)
        except _Missing as missing:
            lines.append(f"| {_cell(claim['claim'])} | {pair} | not measured: {_cell(str(missing))} | not run |")
            continue
        unit = "point" if margin == 1 else "points"
        how = _EXPECT[expect] + (f" (margin {margin:g} {unit})" if expect != ">" else "")
        verdicts = [c.verdict(expect, margin) for c in comparisons]
        verdict = _overall(verdicts, names)
        if "paper_gap" in claim and verdicts == ["agrees"]:  # load_claims allows it on one-comparison claims only
            verdict = _size_verdict(comparisons[0], float(claim["paper_gap"]))
        lines.append(f"| {_cell(claim['claim'])} | {pair}; tested: {how} | "
                     + "<br>".join(_cell(m) for m in measured) + f" | {verdict} |")
    lines += ["", "Each comparison is paired on the same images. *A better than B*: an exact sign test on the images "
              "where the two differ (McNemar's test, for top-1), at p < 0.05. *Matches or beats* and *about equal*: "
              "the 90% confidence interval of the gap against the margin (non-inferiority; two one-sided tests). "
              "Robustness to a transform compares the drop from the images as given, per image; robustness to the "
              "attack compares per-image success. *Not resolved* means the data cannot decide at this size: it is "
              "not agreement.", ""]
    return lines
