"""Results of a study kept per checkpoint in one JSON file, so that a stopped study resumes where it stopped."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ResultStore", "pack_bits", "result_settings", "unpack_bits"]

# The evaluation overrides that change what a study measures (which images, at which size). The others (threads,
# workers, batch size, device) change how it runs, not its result, and stay out of the result's key.
RESULT_OVERRIDES = ("data", "image_size", "val_subset")


def result_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides given (not None) that are part of a result's key (see ``RESULT_OVERRIDES``)."""
    return {k: v for k, v in overrides.items() if k in RESULT_OVERRIDES and v is not None}


def pack_bits(bits: list[bool]) -> str:
    """Per-image outcomes (hit or miss) as a compact string: base64 of the packed bits."""
    import base64

    data = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            data[i // 8] |= 1 << (i % 8)
    return base64.b64encode(bytes(data)).decode("ascii")


def unpack_bits(text: str, count: int) -> list[bool]:
    """The ``count`` outcomes :func:`pack_bits` stored."""
    import base64

    data = base64.b64decode(text)
    if len(data) != (count + 7) // 8:
        raise ValueError(f"a bit string of {len(data)} bytes cannot hold {count} outcomes")
    return [bool(data[i // 8] >> (i % 8) & 1) for i in range(count)]


class ResultStore:
    """``folder/name``: {checkpoint key: result}. A checkpoint's key is its path, size and modification time, so a
    new file under the same name is done again. The folder is made at the first write: a study that fails its
    checks leaves nothing behind."""

    def __init__(self, folder: str | os.PathLike[str], name: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        try:
            self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(self.path)!r} is not a readable result file ({err}); move it away to "
                             f"start again") from None

    @staticmethod
    def check_exist(checkpoints: list[str] | tuple[str, ...]) -> None:
        """FileNotFoundError naming the first checkpoint that does not exist (before any work or write)."""
        for checkpoint in checkpoints:
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")

    @staticmethod
    def key(checkpoint: str, **settings: Any) -> str:
        stat = os.stat(checkpoint)
        extra = json.dumps(settings, sort_keys=True) if settings else ""
        return f"{os.path.abspath(checkpoint)}|{stat.st_size}|{stat.st_mtime_ns}{extra}"

    def get_or_compute(self, checkpoint: str, compute: Callable[[], dict[str, Any]], **settings: Any) -> dict:
        """The stored result of ``checkpoint`` (with ``settings``), or ``compute()``'s, stored at once."""
        self.check_exist([checkpoint])
        key = self.key(checkpoint, **settings)
        if key not in self.results:
            self.results[key] = compute()
            self.write(self.path.name, json.dumps(self.results, indent=1))
        return self.results[key]

    def write(self, name: str, text: str) -> None:
        """``text`` into ``folder/name``, atomically (the folder made if needed)."""
        from ..train.checkpoint import write_text_atomic

        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.folder / name, text)
