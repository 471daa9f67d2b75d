"""Per-image fidelity of an accelerated sample against the full-precision sample from the same seed."""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean PSNR in dB over images (first axis) of two same-shape arrays in [0, data_range]."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs same-shape inputs, got {a.shape} and {b.shape}")
    a = np.asarray(a, dtype=np.float64).reshape(a.shape[0], -1)
    b = np.asarray(b, dtype=np.float64).reshape(b.shape[0], -1)
    mse = ((a - b) ** 2).mean(axis=1)
    with np.errstate(divide="ignore"):
        vals = 10.0 * np.log10(data_range**2 / mse)
    return float(np.mean(np.minimum(vals, 100.0)))  # identical images count as 100 dB
