"""Training configuration: one dataclass, the single source of truth for every default.

A run is configured by, in order of precedence: command-line flags (``--lr 0.05``), a YAML file
(``torchsan train configs/imagenet/san10_pairwise.yaml``), then the defaults below, which are
the authors' ImageNet recipe (Zhao et al. 2020, Section 5; ``config/imagenet/*.yaml`` of
hszhao/SAN). An unknown key in a file or a bad value is an error that names it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TrainConfig", "load_config", "config_path", "CONFIG_ROOT"]

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainConfig:
    """Every setting of a training run (defaults: the authors' ImageNet recipe)."""

    # model
    model: str = "san10_pairwise"  # any timm model name; torchsan registers san*/san_resnet*
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {small_input: true, relation: hadamard}
    # data
    data: str = "fashion-mnist"  # an ImageNet-layout folder, or the embedded default "fashion-mnist"
    image_size: int = 224  # training crop / evaluation size in pixels
    train_subset: int = 0  # use this many training images (balanced over classes); 0 = all
    val_subset: int = 0  # the same for validation
    augment: bool = True  # random resized crop + flip (folders) or shift + flip (small images)
    skip_corrupt: bool = False  # drop and count corrupt images instead of stopping
    workers: int = 0  # data loader processes per training process
    # optimisation
    epochs: int = 100  # length of the schedule
    batch_size: int = 256  # global: split evenly over the processes
    base_lr: float = 0.1  # learning rate for a batch of 256, scaled linearly to batch_size
    lr: float | None = None  # if set, used as is (no scaling)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # on all parameters, as the authors
    schedule: str = "cosine"  # cosine | step | constant
    schedule_unit: str = "epoch"  # the authors step the cosine per epoch; "step" anneals per iteration
    step_milestones: list[int] = field(default_factory=lambda: [30, 60, 90])  # for schedule "step" (x0.1 each)
    warmup_epochs: float = 0.0  # linear warm-up from 0, per iteration
    label_smoothing: float = 0.1  # authors' form: 1-eps on the target, eps/(classes-1) elsewhere
    mixup_alpha: float = 0.0  # 0 = off; the authors' ImageNet configs use 0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    # hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16 (fp16 uses a gradient scaler)
    channels_last: bool = False  # NHWC memory format (faster convolutions on recent GPUs)
    sync_bn: bool = False  # SyncBatchNorm across processes (GPU)
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    # run
    seed: int = 0  # initial weights, data order, augmentation: all follow from it
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-for-bit repeatable runs)
    output: str = "runs/{model}"  # run folder; {model} and {data} are filled in
    keep_checkpoints: int = 2  # the newest N checkpoints are kept, plus model_best.pth
    checkpoint_every_steps: int = 0  # also checkpoint every N iterations inside an epoch; 0 = per epoch only
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | none
    tensorboard: bool = True  # write TensorBoard event files to <run>/tensorboard

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"config: {msg}")

        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.image_size >= 8, f"image_size must be >= 8, got {self.image_size}")
        need(self.schedule in ("cosine", "step", "constant"),
             f"schedule must be cosine, step or constant, got {self.schedule!r}")
        need(self.schedule_unit in ("epoch", "step"),
             f"schedule_unit must be epoch or step, got {self.schedule_unit!r}")
        need(self.amp in ("none", "bf16", "fp16"), f"amp must be none, bf16 or fp16, got {self.amp!r}")
        need(self.progress in ("auto", "bar", "lines", "none"),
             f"progress must be auto, bar, lines or none, got {self.progress!r}")
        need(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.mixup_alpha >= 0.0, f"mixup_alpha must be >= 0, got {self.mixup_alpha}")
        need(self.warmup_epochs >= 0.0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        need(self.workers >= 0 and self.threads >= 0, "workers and threads must be >= 0")
        need(self.train_subset >= 0, f"train_subset must be >= 0 (0 = all), got {self.train_subset}")
        need(self.val_subset >= 0, f"val_subset must be >= 0 (0 = all), got {self.val_subset}")
        need(self.checkpoint_every_steps >= 0,
             f"checkpoint_every_steps must be >= 0 (0 = per epoch only), got {self.checkpoint_every_steps}")
        for name in ("base_lr", "lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "mixup_alpha",
                     "grad_clip"):
            value = getattr(self, name)
            need(value is None or math.isfinite(value), f"{name} must be a finite number, got {value}")
        need(self.base_lr > 0, f"base_lr must be > 0, got {self.base_lr}")
        need(self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        need(isinstance(self.step_milestones, list) and all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in self.step_milestones),
            f"step_milestones must be a list of epochs (integers >= 0), got {self.step_milestones!r}")
        need(self.step_milestones == sorted(self.step_milestones),
             f"step_milestones must be in increasing order, got {self.step_milestones}")
        need(isinstance(self.model_kwargs, dict) and all(isinstance(k, str) for k in self.model_kwargs),
             f"model_kwargs must be a mapping of argument names to values, got {self.model_kwargs!r}")
        need(bool(self.output.strip()), "output must name a folder")
        for placeholder in _placeholders(self.output):
            need(placeholder in ("model", "data"),
                 f"output {self.output!r} has the placeholder {{{placeholder}}}; only {{model}} and {{data}} are "
                 f"filled in (write {{{{ and }}}} for literal braces)")

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: ``lr`` if given, else ``base_lr * batch_size / 256``."""
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        data = "fashion-mnist" if self.data == "fashion-mnist" else Path(self.data).name
        return Path(self.output.format(model=self.model, data=data))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _placeholders(template: str) -> list[str]:
    """The ``{name}`` fields of a format string; ValueError if it is not one (a lone brace)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"config: output {template!r} is not a valid folder template ({err}); write {{{{ and "
                         f"}}}} for literal braces") from None


def field_help() -> dict[str, str]:
    """Each field's comment in the class body above (the help text of its command-line flag)."""
    import inspect
    import re

    found = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s{4}(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m and m.group(1) in FIELDS:
            found[m.group(1)] = m.group(2)
    return found


def _check_keys(values: dict[str, Any], source: str) -> None:
    for key in values:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {key!r} in {source}{hint}")


def config_path(name: str) -> Path:
    """A config file by path, or by name under the packaged configs (``imagenet/san10_pairwise``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_ROOT / name, CONFIG_ROOT / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(str(p.relative_to(CONFIG_ROOT).with_suffix("")) for p in CONFIG_ROOT.rglob("*.yaml"))
    import timm

    models = [m for m in timm.list_models() if m.startswith("san")]
    close = difflib.get_close_matches(name, known + models, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise FileNotFoundError(f"{name!r} is neither a config nor a model.{hint} Give a YAML path, a packaged config "
                            f"({', '.join(known)}) or a model name (timm.list_models('san*'))")


def load_config(source: str | os.PathLike[str] | None = None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (path or packaged name) and keyword overrides."""
    values: dict[str, Any] = {}
    if source is not None:
        path = config_path(os.fspath(source))
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as err:
            raise ValueError(f"config {str(path)!r} is not valid YAML: {' '.join(str(err).split())}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config {str(path)!r} must be a mapping of keys to values")
        values.update(loaded or {})
        _check_keys(values, repr(str(path)))
    _check_keys(overrides, "the overrides")
    values.update(overrides)
    for key, value in values.items():
        values[key] = _coerce(key, value)
    return TrainConfig(**values)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _coerce(key: str, value: Any) -> Any:
    """Check a value against its field's type; accept YAML 1.1's "1e-4" (a string) as a float."""
    default = FIELDS[key].default
    if key == "lr":
        if value is None:
            return None
        default = 0.0
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config: {key} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"config: {key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config: {key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config: {key} must be an integer, got {value!r}")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"config: {key} must be a string, got {value!r}")
    if key == "step_milestones" and not (isinstance(value, list) and all(
            isinstance(m, int) and not isinstance(m, bool) for m in value)):
        raise ValueError(f"config: step_milestones must be a list of epochs (integers), got {value!r}")
    if key == "model_kwargs" and not isinstance(value, dict):
        raise ValueError(f"config: model_kwargs must be a mapping of argument names to values, got {value!r}")
    return value
