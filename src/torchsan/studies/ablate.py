"""The paper's ablations as named studies (its Tables 3-7): ``torchsan ablate STUDY [CONFIG]``.

A study is a set of training runs that each change one option of a base config (a SAN model):

| study | the option | variants |
|---|---|---|
| ``relation`` | the relation (Table 3), both families | pairwise: 5 relations; patchwise: star, clique, concat |
| ``mapping`` | gamma's layers (Table 4) | ``L``, ``R-L``, ``L-R-L``, ``R-L-R-L`` |
| ``transforms`` | phi, psi and beta (Table 5) | separate, phi = psi, all shared (with r1 = r2, which it needs) |
| ``footprint`` | the footprint of stages 1-4 (Table 6) | 3, 5, 7 |
| ``position`` | the position encoding, pairwise (Table 7) | on, off |

Each run trains into ``OUTPUT/STUDY/VARIANT`` and resumes there if it was stopped (``--resume`` semantics), so a
study continues where it stopped. A run given with ``reuse`` (``--reuse RUN``) that trained exactly a variant's
config (the same recipe and model; only the output and how it ran may differ) stands for that variant instead, so a
study does not train its base model twice. The table (``ablate-STUDY.md``, ``.csv``, ``.json``, ``.png``) gives each
variant's final top-1 and top-5, parameters and multiply-adds.

``jobs`` (``--jobs J``) trains J variants at a time, each in its own process on 1/J of the threads: on a small CPU
machine several narrow runs use the cores better than one wide run (smaller layers scale poorly across threads).
A run's digits may then differ from a run on all threads, as with any other thread count.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import inspect
import io
import json
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..layers import PAIRWISE_RELATIONS, PATCHWISE_RELATIONS
from ..train.checkpoint import save_figure_atomic
from ._store import ResultStore

__all__ = ["STUDIES", "ablate", "variants"]

STUDIES = ("relation", "mapping", "transforms", "footprint", "position")


def _twin(model: str, sa_type: str) -> str:
    """The same SAN depth with the other attention type: san10_pairwise <-> san10_patchwise."""
    return model.replace("pairwise", sa_type).replace("patchwise", sa_type)


def variants(study: str, model: str, model_kwargs: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, model, the model_kwargs that differ from the base's) of each run of ``study``."""
    if not model.startswith("san") or "resnet" in model or not ("pairwise" in model or "patchwise" in model):
        raise ValueError(f"the ablations change SAN options: the base model must be a SAN, got {model!r}")
    sa_type = "pairwise" if "pairwise" in model else "patchwise"
    if study == "relation":
        return ([(f"pairwise {r}", _twin(model, "pairwise"), dict(relation=r)) for r in PAIRWISE_RELATIONS]
                + [(f"patchwise {r}", _twin(model, "patchwise"), dict(relation=r)) for r in PATCHWISE_RELATIONS])
    if study == "mapping":
        return [(m, model, dict(mapping=m)) for m in ("L", "R-L", "L-R-L", "R-L-R-L")]
    if study == "transforms":
        mid = model_kwargs.get("mid_reduction", 4)  # phi = psi = beta needs the relation as wide as the values
        return [("separate", model, dict(transform="separate")), ("phi = psi", model, dict(transform="shared_phi_psi")),
                ("all shared (r1 = r2)", model, dict(transform="shared_all", rel_reduction=mid))]
    if study == "footprint":
        first = list(model_kwargs.get("kernels", (3, 7, 7, 7, 7)))[0]
        return [(f"{k}x{k}", model, dict(kernels=[first, k, k, k, k])) for k in (3, 5, 7)]
    if study == "position":
        if sa_type != "pairwise":
            raise ValueError("the position study applies to pairwise attention: use a pairwise base model")
        return [("with position encoding", model, dict(position_encoding=True)),
                ("without", model, dict(position_encoding=False))]
    raise ValueError(f"unknown study {study!r}; one of {', '.join(STUDIES)}")


# How a run was carried out, not what it trained: a reused run may differ from the variant in these.
_HOW_IT_RAN = frozenset({"output", "threads", "workers", "device", "progress", "tensorboard", "keep_checkpoints",
                         "checkpoint_every_steps", "eval_every"})


def _option_default(model: str, key: str) -> Any:
    """The value a SAN model option takes when its config leaves it out (the model's, else its attention layer's)."""
    from ..layers import PairwiseSelfAttention, PatchwiseSelfAttention
    from ..models.san import SAN, SAN_LAYERS

    sa_type = "pairwise" if "pairwise" in model else "patchwise"
    if key == "sa_type":  # set by the model name, like the depth's layers
        return sa_type
    if key == "layers":
        return list(SAN_LAYERS[int(model.removeprefix("san").split("_")[0])])
    layer = PairwiseSelfAttention if sa_type == "pairwise" else PatchwiseSelfAttention
    for cls in (SAN, layer):
        param = inspect.signature(cls.__init__).parameters.get(key)
        if param is not None and param.default is not inspect.Parameter.empty and param.default is not None:
            return param.default
    return None


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back, so that tuples and lists compare equal."""
    return json.loads(json.dumps(value))


def same_experiment(a: Any, b: Any) -> bool:
    """Whether TrainConfigs ``a`` and ``b`` train the same model the same way (an option left out of one counts as
    its default)."""
    da, db = a.to_dict(), b.to_dict()
    if any(_plain(da[k]) != _plain(db[k]) for k in da if k not in _HOW_IT_RAN and k != "model_kwargs"):
        return False
    ka, kb = da["model_kwargs"], db["model_kwargs"]
    return all(_plain(ka.get(k, _option_default(a.model, k))) == _plain(kb.get(k, _option_default(b.model, k)))
               for k in set(ka) | set(kb))


def _finished(folder: Path, epochs: int) -> bool:
    path = folder / "summary.json"
    return path.exists() and json.loads(path.read_text()).get("epochs") == epochs


def _train_one(cfg: Any) -> None:
    """One variant's run in a process of its own (``jobs`` > 1)."""
    import traceback

    from ..allocator import keep_freed_memory
    from ..train import train

    keep_freed_memory()
    try:
        train(cfg, resume="auto")
    except KeyboardInterrupt:
        os._exit(130)  # stop this worker: the pool would otherwise hand it the next run
    except Exception:
        traceback.print_exc()  # the whole traceback here; the parent reports the run and the error's last line
        raise


def _train_all(cfgs: list[Any], jobs: int) -> None:
    """Train (or resume) every config: one after another, or ``jobs`` at a time in processes of their own.

    A failed run stops the study as with one job: the runs not yet started are dropped, those training finish
    their run, and the error names every failed run. An interrupt (Ctrl-C) stops them all at once; each resumes
    from its last checkpoint.
    """
    from ..train import train

    if jobs <= 1 or len(cfgs) <= 1:
        for cfg in cfgs:
            train(cfg, resume="auto")
        return
    import torch

    jobs = min(jobs, len(cfgs))
    total = cfgs[0].threads or torch.get_num_threads()
    threads = max(1, total // jobs)
    print(f"ablate: {len(cfgs)} runs, {jobs} at a time, on {threads} of {total} threads each", flush=True)
    failed = []
    # spawn, not fork: a forked child inherits the parent's OpenMP thread pool in an unusable state
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        # progress bars of side-by-side runs would share one terminal line: plain lines instead
        runs = {pool.submit(_train_one, dataclasses.replace(
            cfg, threads=threads, progress="lines" if cfg.progress in ("auto", "bar") else cfg.progress)): cfg
            for cfg in cfgs}
        for done in concurrent.futures.as_completed(runs):
            if done.cancelled() or done.exception() is None:
                continue
            error = done.exception()
            last = (str(error).strip().splitlines() or [type(error).__name__])[-1]
            failed.append(f"{runs[done].output} ({type(error).__name__}: {last})")
            for future in runs:
                future.cancel()  # the runs not yet started
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(cfgs)} runs failed: " + "; ".join(failed))


def ablate(study: str, base: Any, output: str | os.PathLike[str],
           reuse: Sequence[str | os.PathLike[str]] = (), jobs: int = 1) -> list[dict[str, Any]]:
    """Train (or resume, or just read) every variant of ``study`` from the TrainConfig ``base``; write the tables.

    ``reuse``: run folders (each with its ``config.yaml``) that may stand for a variant whose config they trained.
    ``jobs``: how many variants train at a time (see the module docstring).
    """
    from ..train import load_config

    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("jobs > 1 trains runs side by side in one process each; under torchrun give --jobs 1")
    candidates = []
    for run in map(Path, reuse):
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"--reuse {str(run)!r}: not a run folder (no config.yaml)")
        candidates.append((run, load_config(run / "config.yaml")))
    out = Path(output)
    store = ResultStore(out, f"ablate-{study}.json")
    plan = []
    for label, model, changes in variants(study, base.model, base.model_kwargs):  # (checks the base first)
        folder = out / study / "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
        cfg = dataclasses.replace(base, model=model, model_kwargs={**base.model_kwargs, **changes},
                                  output=str(folder).replace("{", "{{").replace("}", "}}"))
        cfg.validate()
        match = next(((run, run_cfg) for run, run_cfg in candidates if same_experiment(cfg, run_cfg)), None)
        if match is not None and not (folder / "config.yaml").exists():
            folder = match[0]  # that run is this variant: finish it if it was stopped, never train it twice
            how = {k: getattr(cfg, k) for k in _HOW_IT_RAN if k != "output"}  # resumed as this study runs
            cfg = dataclasses.replace(match[1], **how, output=str(folder).replace("{", "{{").replace("}", "}}"))
        plan.append((label, model, changes, folder, cfg))
    _train_all([cfg for *_, folder, cfg in plan if not _finished(folder, cfg.epochs)], jobs)
    rows = []
    for label, model, changes, folder, _ in plan:
        summary_path = folder / "summary.json"
        summary = json.loads(summary_path.read_text())
        final = summary.get("final", {})
        row = dict(study=study, variant=label, model=model, changes=changes, top1=final.get("val_top1"),
                   top5=final.get("val_top5"), best_top1=summary.get("best_val_top1"), params=summary.get("params"),
                   gmacs=summary.get("gmacs"), epochs=summary.get("epochs"), images=final.get("val_images"),
                   run=Path(os.path.relpath(os.path.realpath(folder), os.path.realpath(out))).as_posix())
        # (relative to the table, through any symlinks: the study folder can move)
        store.results[label] = row
        rows.append(row)
    store.write(f"ablate-{study}.json", json.dumps(store.results, indent=1))
    store.write(f"ablate-{study}.md", table(study, rows))
    store.write(f"ablate-{study}.csv", _csv(rows))
    _plot(study, rows, out / f"ablate-{study}.png")
    return rows


def table(study: str, rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"Ablation '{study}': each run changes only this option of the base config.", "",
             "| variant | model | top-1 | top-5 | params (M) | GMACs | epochs | val images |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['model']} | {fmt(r['top1'], '.2f')} | {fmt(r['top5'], '.2f')} | "
                     f"{fmt(r['params'] and r['params'] / 1e6, '.3f')} | {fmt(r['gmacs'], '.4f')} | {r['epochs']} | "
                     f"{r['images']} |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["study", "variant", "model", "changes", "top1", "top5", "params", "gmacs", "epochs", "run"])
    for r in rows:
        writer.writerow([r["study"], r["variant"], r["model"], json.dumps(r["changes"]), r["top1"], r["top5"],
                         r["params"], r["gmacs"], r["epochs"], r["run"]])
    return buffer.getvalue()


def _plot(study: str, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows)), 3.6))
    ax.bar(range(len(rows)), [r["top1"] or 0.0 for r in rows])
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"ablation: {study}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)
