"""Output files are written atomically: a temporary file in the target folder, then a rename."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] float images (N, H, W, C) -> uint8."""
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_grid(rows: list[np.ndarray], path: str | os.PathLike, scale: int = 1) -> Path:
    """Saves rows of images (each (N, H, W, C) in [0, 1]) as one PNG grid, atomically."""
    from PIL import Image

    tiles = [np.concatenate(list(to_uint8(r)), axis=1) for r in rows]
    grid = np.concatenate(tiles, axis=0)
    img = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
