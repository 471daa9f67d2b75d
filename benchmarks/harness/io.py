"""JSON results written atomically (a crash never leaves a half-written file), read back, and the
SHA-1 of a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def write_json(path: Path, obj: Any, indent: int = 2, default: Any = _json_default) -> None:
    """Atomic JSON write (temporary file + rename): a crash never leaves a half-written file.
    ``default=None``: objects JSON cannot hold raise instead of being converted."""
    write_text(path, json.dumps(obj, indent=indent, default=default))


def write_text(path: Path, text: str) -> None:
    """Atomic text write (temporary file + rename)."""
    from cachequant.utils.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def file_hash(path: Path) -> str:
    """SHA-1 of a file (the samples' and reference statistics' identity in the metrics keys)."""
    from cachequant.utils.io import file_sha1

    return file_sha1(path)
