"""A model's eval forward as a flat list of its ops, recorded once per input and replayed: what ONNX Runtime's
``InferenceSession`` does for an exported graph, for the model as it runs in PyTorch with torchsan's kernels.

    session = torchsan.InferenceSession(model)   # a copy of the model, in eval mode
    logits = session(images)                     # (N, C, H, W) -> what model(images) returns

The first call for an input of a new (shape, strides, dtype, device) runs the forward in eval mode under
``torch.inference_mode`` and records every op it dispatches (aten ops and torchsan's custom ops). What does not
depend on the input (the BatchNorms' affine maps, stacked weights, the position encoding) is computed there once
and kept; each later call with such an input replays only the ops on the input's path, with their recorded
arguments. The Python around them (module calls, the fusion rules, argument checks) does not run again, which at
batch 1 is a tenth of a SAN10 forward. Every op runs as in the model's own forward, so the result is the same, bit
for bit.

The session is a snapshot: it runs its own copy of the model, made on construction, so later changes to the model
(its weights, hooks, modules) do not reach it; build a new session after them. A recording is refused (ValueError)
where a replay could not give what the forward gives: a forward that runs a forward hook (a hook must see each
call), draws random numbers, writes into a tensor that is not on the input's path (a parameter, a buffer, a kept
value), makes a tensor whose size depends on the input's values (``x[x > 0]``), reads a value of the input into
Python through PyTorch (``.item()``, ``if x.sum() > 0``) or reads the input's memory through a tensor no op made
(``torch.from_numpy(x.numpy())``). Reads that bypass PyTorch altogether (``x.tolist()``, NumPy's own arithmetic on
``x.numpy()``) cannot be seen: a forward that branches on them is replayed with the recorded branch. An expanded
input (elements sharing memory, which no forward can write into) runs as ``x.contiguous()``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from torchsan.ops._fusion import has_hooks

__all__ = ["InferenceSession"]



def _storage(t: torch.Tensor) -> int | None:
    """The address of a tensor's memory, shared by its views (None for a tensor without memory)."""
    return t.untyped_storage().data_ptr() or None


def _not_training(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a random op runs with its ``train``/``training`` argument False (dropout in eval: no draw)."""
    for i, argument in enumerate(func._schema.arguments):
        if argument.name in ("train", "training"):
            value = args[i] if i < len(args) else kwargs.get(argument.name, argument.default_value)
            return value is False
    return False


def _copy(x: torch.Tensor) -> torch.Tensor:
    """x's values in new memory with x's strides (a clone would make a sliced x contiguous)."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)


def _expanded(x: torch.Tensor) -> bool:
    """Whether elements of x share memory (an expanded tensor): no forward can write into it, and it has no copy
    with its strides."""
    return any(stride == 0 and size > 1 for size, stride in zip(x.shape, x.stride()))


class _Slot:
    """An argument filled at replay time: the output of an earlier op on the input's path (slot 0: the input)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class _Recorder(TorchDispatchMode):
    """Runs a forward, keeping each op on the input's path as (op, args with _Slot placeholders, kwargs, output
    slots); ops on constants alone run once and their outputs become constants."""

    def __init__(self, x: torch.Tensor, owned: set[int]) -> None:
        super().__init__()
        self.slots = {id(x): 0}
        self.count = 1
        self.steps: list[tuple[Any, Any, Any, int | list[int | None]]] = []
        self.keep: list[torch.Tensor] = [x]  # no recorded tensor may be freed (its id reused) while recording
        self.constants: dict[int, torch.Tensor] = {}  # id -> the snapshot of a tensor off the path
        self.storages = {_storage(x)}  # the memory of the tensors on the path
        self.owned = owned  # the memory of the session's own parameters and buffers, kept without a copy

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags and not _not_training(func, args, kwargs):
            raise ValueError(f"InferenceSession: the forward draws random numbers ({func}); a replay would repeat "
                             "the recorded draw")
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(id(t) not in self.slots and _storage(t) is not None and _storage(t) in self.storages for t in tensors):
            raise ValueError(f"InferenceSession: the forward reads the input's path through a tensor that no op made "
                             f"({func}); a replay would repeat the recorded values")
        for i, argument in enumerate(func._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                target = args[i] if i < len(args) else kwargs.get(argument.name)
                if any(isinstance(t, torch.Tensor) and id(t) not in self.slots for t in pytree.tree_leaves(target)):
                    raise ValueError(f"InferenceSession: the forward writes into a tensor that is not on the "
                                     f"input's path ({func}): a parameter, a buffer or a kept value")
        on_path = any(id(t) in self.slots for t in tensors)
        if on_path and (torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags):
            raise ValueError(f"InferenceSession: the forward makes a tensor whose size or value depends on the input's "
                             f"values ({func}); a replay would repeat the recorded one")
        out = func(*args, **kwargs)
        self.keep.extend(tensors)
        if not on_path:
            return out  # constant: its value is recorded where an op on the path reads it
        if any(not isinstance(t, torch.Tensor) and t is not None for t in pytree.tree_leaves(out)):
            raise ValueError(f"InferenceSession: the forward reads a value of the input's path into Python ({func}); "
                             "a replay would repeat the recorded value")

        def placeholder(a: Any) -> Any:
            if not isinstance(a, torch.Tensor):
                return a
            if id(a) in self.slots:
                return _Slot(self.slots[id(a)])
            if id(a) not in self.constants:  # a snapshot, one per tensor (the session's own weights as they are)
                self.constants[id(a)] = a if _storage(a) in self.owned else a.clone()
            return self.constants[id(a)]

        step_args, step_kwargs = pytree.tree_map(placeholder, args), pytree.tree_map(placeholder, kwargs)
        outputs = []  # (after the arguments: an in-place op's output is its input, under a new slot)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.keep.append(t)
                self.slots[id(t)] = self.count
                self.storages.add(_storage(t))
                outputs.append(self.count)
                self.count += 1
            else:
                outputs.append(None)
        # outputs: one slot for a bare tensor, else a slot or None per leaf of what the op returns
        self.steps.append((func, step_args, step_kwargs, outputs[0] if isinstance(out, torch.Tensor) else outputs))
        return out


class _Plan:
    """The recorded steps of one input's forward, replayed on a new input of the same kind."""

    def __init__(self, recorder: _Recorder, output: Any) -> None:
        self.size = recorder.count
        leaves, self.spec = pytree.tree_flatten(output)
        self.output = [recorder.slots[id(t)] if isinstance(t, torch.Tensor) and id(t) in recorder.slots
                       else (t.clone() if isinstance(t, torch.Tensor) else t) for t in leaves]
        self.output_slots = [isinstance(t, torch.Tensor) and id(t) in recorder.slots for t in leaves]
        # Each slot is dropped after the last step that reads it, as eager frees a value after its last use: the
        # replay's memory peaks where the forward's does.
        returned = {v for v, is_slot in zip(self.output, self.output_slots) if is_slot}
        last_read: dict[int, int] = {}
        for i, (_, args, kwargs, outputs) in enumerate(recorder.steps):
            for a in pytree.tree_leaves((args, kwargs), is_leaf=lambda a: isinstance(a, _Slot)):
                if isinstance(a, _Slot):
                    last_read[a.index] = i
            for slot in [outputs] if isinstance(outputs, int) else outputs:
                if slot is not None:
                    last_read.setdefault(slot, i)  # never read: dropped at once
        drops: list[list[int]] = [[] for _ in recorder.steps]
        for slot, i in last_read.items():
            if slot not in returned:
                drops[i].append(slot)
        self.steps: list[tuple[Any, Callable[[list], tuple], Callable[[list], dict], int | list[int | None],
                               list[int]]] = []
        for (func, args, kwargs, outputs), drop in zip(recorder.steps, drops):
            self.steps.append((func, _filler(args), _filler(kwargs), outputs, drop))

    def __call__(self, x: torch.Tensor) -> Any:
        env: list = [None] * self.size
        env[0] = x
        for func, args, kwargs, outputs, drop in self.steps:
            out = func(*args(env), **kwargs(env))
            if isinstance(outputs, int):
                env[outputs] = out
            else:
                for slot, t in zip(outputs, pytree.tree_leaves(out)):
                    if slot is not None:
                        env[slot] = t
            del out
            for slot in drop:
                env[slot] = None
        # (a constant output is copied, as the forward would make it afresh)
        leaves = [env[v] if is_slot else v.clone() if isinstance(v, torch.Tensor) else v
                  for v, is_slot in zip(self.output, self.output_slots)]
        return pytree.tree_unflatten(leaves, self.spec)


def _filler(template: Any) -> Callable[[list], Any]:
    """A function of the replay's slots that rebuilds ``template`` with its _Slot placeholders filled: flat
    tuples and dicts by position, anything nested through pytree."""
    leaves, spec = pytree.tree_flatten(template, is_leaf=lambda a: isinstance(a, _Slot))
    holes = [(i, a.index) for i, a in enumerate(leaves) if isinstance(a, _Slot)]
    if not holes:
        value = pytree.tree_unflatten(leaves, spec)
        return lambda env: value
    flat = isinstance(template, tuple) and all(not isinstance(a, (list, tuple, dict)) for a in template)
    if flat:
        def fill_flat(env: list) -> tuple:
            filled = list(leaves)
            for i, slot in holes:
                filled[i] = env[slot]
            return tuple(filled)

        return fill_flat

    def fill(env: list) -> Any:
        filled = list(leaves)
        for i, slot in holes:
            filled[i] = env[slot]
        return pytree.tree_unflatten(filled, spec)

    return fill


class InferenceSession:
    """``model``'s eval forward, recorded once per kind of input and replayed (see the module docstring).

    Args:
        model: the module. The session runs a copy of it in eval mode (``copy.deepcopy``, made here: the memory of
            its weights again), and keeps what each recording computes from the weights.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        self._owned = {_storage(t) for t in (*self.model.parameters(), *self.model.buffers())} - {None}
        self._plans: dict[tuple, _Plan] = {}

    def _key(self, x: torch.Tensor) -> tuple:
        from . import ops

        # what the recorded routes depend on besides the input: the threads (the kernels' rules), the backend and
        # fusion switches
        device = x.device.type
        autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        return (tuple(x.shape), x.stride(), x.dtype, x.device, autocast, torch.get_num_threads(), ops.get_backend(),
                ops.fusion_enabled())

    def __call__(self, x: torch.Tensor) -> Any:
        """What ``model(x)`` returns in eval mode, for x (N, C, H, W)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"InferenceSession takes one tensor, got {type(x).__name__}")
        if _expanded(x):
            x = x.contiguous()  # recorded and replayed on the same layout
        key = self._key(x)
        plan = self._plans.get(key)
        with torch.inference_mode():
            if plan is None:
                plan = self._plans[key] = self._record(x)
            return plan(x)

    def _record(self, x: torch.Tensor) -> _Plan:
        if has_hooks(*self.model.modules(), backward=False):  # a replay runs no backward: those hooks may stay
            raise ValueError("InferenceSession: the model has forward hooks, which must see each call; remove them "
                             "or call the model itself")
        self.model(_copy(x))  # a first call builds what the layers keep between calls (stacked weights, encodings)
        x = _copy(x)  # the recording's input: its own tensor, which nothing else holds (the forward may write it)
        recorder = _Recorder(x, self._owned)
        with recorder:
            output = self.model(x)
        return _Plan(recorder, output)
