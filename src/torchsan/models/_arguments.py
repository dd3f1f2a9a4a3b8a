"""Which constructor arguments a model accepts: model_kwargs from a file must not steer timm.

``timm.create_model(name, **kwargs)`` also reads control keys (``checkpoint_path`` opens a file,
``pretrained_cfg`` names one, ...). Keyword arguments that come from a config file or a
checkpoint are therefore checked against the model class's own ``__init__`` first.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["model_arguments", "check_model_kwargs"]

# Set by the caller from the data, never by model_kwargs.
_GIVEN_SEPARATELY = frozenset({"num_classes", "in_chans"})


@functools.cache
def model_arguments(name: str) -> tuple[frozenset[str], bool]:
    """(the constructor arguments of timm model ``name``'s class, whether it also takes ``**kwargs``).

    The class is found by building the model once on the meta device (no memory, no weights).
    """
    import timm

    import torchsan.models  # noqa: F401  (registers torchsan's models)

    with torch.device("meta"):
        model = timm.create_model(name)
    params = inspect.signature(type(model).__init__).parameters
    named = frozenset(p for p, v in params.items()
                      if p != "self" and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY))
    return named, any(v.kind is v.VAR_KEYWORD for v in params.values())


def check_model_kwargs(name: str, kwargs: Mapping[str, Any], source: str = "model_kwargs") -> None:
    """Raise ValueError unless every key of ``kwargs`` is a constructor argument of model ``name``.

    A class that takes ``**kwargs`` accepts any name except timm's own control keys.
    """
    named, open_ended = model_arguments(name)
    given = set(kwargs)
    separate = sorted(given & _GIVEN_SEPARATELY)
    if separate:
        raise ValueError(f"{source}: {' and '.join(separate)} {'is' if len(separate) == 1 else 'are'} set from the "
                         f"data; remove {'it' if len(separate) == 1 else 'them'} from {source}")
    unknown = sorted(given - named) if not open_ended else sorted(given & _TIMM_CONTROL_KEYS)
    if unknown:
        import difflib

        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, named, n=1)) else repr(k)
                 for k in unknown]
        known = ", ".join(sorted(named - _GIVEN_SEPARATELY))
        verb = "is not an argument" if len(unknown) == 1 else "are not arguments"
        raise ValueError(f"{source}: {', '.join(hints)} {verb} of {name} (its arguments: {known})")


# Keys timm.create_model and build_model_with_cfg consume themselves (files, URLs, feature extraction).
_TIMM_CONTROL_KEYS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "scriptable",
    "exportable", "no_jit", "features_only", "feature_cfg", "feature_cls", "out_indices", "pretrained_strict",
    "pretrained_filter_fn", "kwargs_filter", "model_cfg",
})
