"""Per-GPU tile tables for the 8-bit GEMM: tile sizes measured on the GPU, not guessed.

Why: :func:`triton_gemm.block_config` picks tiles by a fixed rule (128 × 128, 4 stages). On the
H200 that rule left the 8-bit kernels at 25–46 % of fp16 cuBLAS on SD's batch-1 shapes and ~40 %
on its 64² convolutions (``results/speed/README.md``). Autotuning at start-up would compile
every config for SD's ~40 shapes each time a fresh machine starts. ``benchmarks/tune_tiles.py``
measures the configs once per GPU model on the real layer shapes of a pipeline and writes a table
into ``tile_tables/<gpu>.json``; a lookup is then a dict access.

A table is JSON: ``{"device": ..., "entries": {key: {"BM", "BN", "BK", "num_warps", "num_stages",
"split_k"}}}``, where ``key`` is :func:`shape_key`. Shapes missing from the table keep the rule.
A caller may name another table file, or ``off`` for the rule alone (``KernelOptions.tiles``).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

TILE_DIR = Path(__file__).parent / "tile_tables"
FIELDS = ("BM", "BN", "BK", "num_warps", "num_stages", "split_k")


def gpu_slug(device: torch.device) -> str:
    """File name of a GPU model's table, e.g. ``nvidia-h200``; ``interpreter`` on the CPU."""
    if device.type != "cuda":
        return "interpreter"
    return _cuda_slug(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_slug(index: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(index).lower()).strip("-")


def shape_key(kind: str, M: int, N: int, C: int, split: int, taps: int, w4: bool) -> str:
    return f"{kind}|M{M}|N{N}|C{C}|s{split}|t{taps}|w{int(w4)}"


def _check_entry(key: str, entry: dict, source: str) -> dict:
    missing = [f for f in FIELDS if f not in entry]
    if missing:
        raise ValueError(f"tile table {source}: entry {key!r} lacks {', '.join(missing)}; "
                         "regenerate it with benchmarks/tune_tiles.py")
    for f in FIELDS:
        v = entry[f]
        if not isinstance(v, int) or v < 1 or (f in ("BM", "BN", "BK") and v & (v - 1)):
            raise ValueError(f"tile table {source}: entry {key!r} has {f} = {v!r} (a positive integer, "
                             "a power of two for BM / BN / BK)")
    return {f: entry[f] for f in FIELDS}


@functools.lru_cache(maxsize=None)
def load_table(path: str) -> dict[str, dict]:
    """The entries of a table file, checked (a damaged table raises instead of being ignored)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"tile table {path} cannot be read ({e}); regenerate it with "
                         "benchmarks/tune_tiles.py or set CACHEQUANT_TILES=off") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), dict):
        raise ValueError(f"tile table {path} has no 'entries' object; regenerate it with benchmarks/tune_tiles.py")
    return {k: _check_entry(k, v, path) for k, v in raw["entries"].items()}


def table_path(device: torch.device, setting: str | None = None) -> str | None:
    """The table to use: ``setting`` (a file, or ``off``), else the GPU model's committed one, else
    None. Resolved once per (setting, GPU model): ``gemm`` asks on every call."""
    return _table_path(setting, gpu_slug(device))


@functools.lru_cache(maxsize=None)
def _table_path(setting: str | None, slug: str) -> str | None:
    if setting:
        if setting == "off":
            return None
        if not Path(setting).is_file():
            raise ValueError(f"tile table {setting!r}: no such file (give a table written by "
                             "benchmarks/tune_tiles.py, or 'off')")
        return setting
    path = TILE_DIR / f"{slug}.json"
    return str(path) if path.is_file() else None


def lookup(device: torch.device, kind: str, M: int, N: int, C: int, split: int, taps: int,
           w4: bool, setting: str | None = None) -> dict | None:
    """The measured tiles of this shape on this GPU model, or None (then the rule applies)."""
    path = table_path(device, setting)
    if path is None:
        return None
    return load_table(path).get(shape_key(kind, M, N, C, split, taps, w4))
