"""Output files are written atomically: a temporary file in the target folder, then a rename; and
the SHA-1 that names a file's content in run records."""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; it replaces ``path`` only if the block succeeds.
    The file gets the permissions the user's umask gives a new file (a temporary file is 0600)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    except PermissionError:
        raise PermissionError(f"cannot write {path}: permission denied in {path.parent}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] float images (N, H, W, C) -> uint8."""
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def save_grid(rows: list[np.ndarray], path: str | os.PathLike, scale: int = 1) -> Path:
    """Saves rows of images (each (N, H, W, C) in [0, 1]) as one grid, atomically, in the format
    the file name's suffix names (PNG, JPEG or WebP)."""
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{Path(path).name}: give a file name ending in {', '.join(IMAGE_FORMATS)}")
    from PIL import Image

    tiles = [np.concatenate(list(to_uint8(r)), axis=1) for r in rows]
    grid = np.concatenate(tiles, axis=0)
    img = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)
    return Path(path)


def file_sha1(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes, read in 4 MiB blocks: the identity of weights, samples and reference
    statistics in run records."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
