"""A model's eval forward as a flat list of its ops, recorded once per input and replayed: what ONNX Runtime's
``InferenceSession`` does for an exported graph, for the model as it runs in PyTorch with torchsan's kernels.

    session = torchsan.InferenceSession(model)   # a snapshot of the model in eval mode
    logits = session(images)                     # (N, C, H, W) -> what model(images) returns

The first call for an input of a new (shape, strides, dtype, device) runs the model's forward in eval mode under
``torch.inference_mode`` and records every op it dispatches (aten ops and torchsan's custom ops). What does not
depend on the input (the BatchNorms' affine maps, stacked weights, the position encoding) is computed there once
and kept; each later call with such an input replays only the ops on the input's path, with their recorded
arguments. The Python around them (module calls, the fusion rules, argument checks) does not run again, which at
batch 1 is a tenth of a SAN10 forward. Every op runs as in the model's own forward, so the result is the same, bit
for bit.

The session holds copies of the tensors it keeps (it is a snapshot, like an exported model): later changes to the
model's parameters or buffers do not reach it; build a new session after them. A recording is refused (ValueError)
where a replay could not give what the model gives: a forward that mutates a parameter or buffer, draws random
numbers, or runs a forward hook (a hook must see each call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["InferenceSession"]

# Ops whose result is drawn at random: a replay would repeat the recorded draw.
_RANDOM_OPS = ("bernoulli", "rand", "randn", "randint", "randperm", "normal", "uniform", "multinomial",
               "exponential", "geometric", "cauchy", "log_normal", "random", "native_dropout")


class _Slot:
    """An argument filled at replay time: the output of an earlier op on the input's path (slot 0: the input)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class _Recorder(TorchDispatchMode):
    """Runs a forward, keeping each op on the input's path as (op, args with _Slot placeholders, kwargs, output
    slots); ops on constants alone run once and their outputs become constants."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.slots = {id(x): 0}
        self.count = 1
        self.steps: list[tuple[Any, Any, Any, list[int | None]]] = []
        self.keep: list[torch.Tensor] = [x]  # no recorded tensor may be freed (its id reused) while recording
        self.constants: dict[int, torch.Tensor] = {}  # id -> the snapshot of a tensor off the path

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__.strip("_")
        if name in _RANDOM_OPS or any(name.startswith(op) for op in ("rand", "bernoulli")):
            raise ValueError(f"InferenceSession: the forward draws random numbers ({func}); a replay would repeat "
                             "the recorded draw")
        out = func(*args, **kwargs)
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.keep.extend(tensors)
        on_path = any(id(t) in self.slots for t in tensors)
        for i, argument in enumerate(func._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                target = args[i] if i < len(args) else kwargs.get(argument.name)
                written = [t for t in pytree.tree_leaves(target) if isinstance(t, torch.Tensor)]
                if any(id(t) not in self.slots for t in written) and on_path:
                    raise ValueError(f"InferenceSession: the forward writes into a tensor that is not on the "
                                     f"input's path ({func}): a parameter, buffer or kept value")
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
            if id(a) not in self.constants:
                self.constants[id(a)] = a.clone()  # a snapshot, one per tensor
            return self.constants[id(a)]

        step_args, step_kwargs = pytree.tree_map(placeholder, args), pytree.tree_map(placeholder, kwargs)
        outputs = []  # (after the arguments: an in-place op's output is its input, under a new slot)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.keep.append(t)
                self.slots[id(t)] = self.count
                outputs.append(self.count)
                self.count += 1
            else:
                outputs.append(None)
        self.steps.append((func, step_args, step_kwargs, outputs))
        return out


class _Plan:
    """The recorded steps of one input's forward, replayed on a new input of the same kind."""

    def __init__(self, recorder: _Recorder, output: Any) -> None:
        self.size = recorder.count
        self.steps: list[tuple[Any, Callable[[list], tuple], Callable[[list], dict], list[int | None]]] = []
        for func, args, kwargs, outputs in recorder.steps:
            self.steps.append((func, _filler(args), _filler(kwargs), outputs))
        leaves, self.spec = pytree.tree_flatten(output)
        self.output = [recorder.slots[id(t)] if isinstance(t, torch.Tensor) and id(t) in recorder.slots
                       else (t.clone() if isinstance(t, torch.Tensor) else t) for t in leaves]
        self.output_slots = [isinstance(t, torch.Tensor) and id(t) in recorder.slots for t in leaves]

    def __call__(self, x: torch.Tensor) -> Any:
        env: list = [None] * self.size
        env[0] = x
        for func, args, kwargs, outputs in self.steps:
            out = func(*args(env), **kwargs(env))
            if len(outputs) == 1:
                env[outputs[0]] = out
            else:
                for slot, t in zip(outputs, pytree.tree_leaves(out)):
                    if slot is not None:
                        env[slot] = t
        leaves = [env[v] if is_slot else v for v, is_slot in zip(self.output, self.output_slots)]
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
        model: the module; it is switched to eval mode. The session keeps a reference to it (to record new kinds of
            input) and copies of every tensor it reads.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
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
        key = self._key(x)
        plan = self._plans.get(key)
        with torch.inference_mode():
            if plan is None:
                plan = self._plans[key] = self._record(x)
            return plan(x)

    def _record(self, x: torch.Tensor) -> _Plan:
        from torch.nn.modules import module as module_impl

        if (module_impl._global_forward_hooks or module_impl._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in self.model.modules())):
            raise ValueError("InferenceSession: the model has forward hooks, which must see each call; remove them "
                             "or call the model itself")
        self.model.eval()
        self.model(x)  # a first call builds what the layers keep between calls (stacked weights, encodings)
        x = x.clone()  # the recording's input: its own tensor, which nothing else holds
        recorder = _Recorder(x)
        with recorder:
            output = self.model(x)
        return _Plan(recorder, output)
