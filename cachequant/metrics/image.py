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


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, chunk: int = 1000) -> float:
    """Mean SSIM (Wang et al., 2004) over images (N, H, W, C): Gaussian window σ = 1.5, K1 = 0.01,
    K2 = 0.03, per channel, population statistics — the usual reference settings."""
    from scipy.ndimage import gaussian_filter

    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs same-shape (N, H, W, C) inputs, got {a.shape} and {b.shape}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def f(z: np.ndarray) -> np.ndarray:  # the 2-D window over H and W of every image and channel
        return gaussian_filter(z, sigma=1.5, truncate=3.5, axes=(1, 2))

    total, count = 0.0, 0
    for i in range(0, len(a), chunk):  # chunks bound the memory (~25 float64 copies of a chunk)
        x, y = np.asarray(a[i : i + chunk], np.float64), np.asarray(b[i : i + chunk], np.float64)
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        if min(s.shape[1:3]) > 6:  # drop the border where the window runs off the image
            s = s[:, 3:-3, 3:-3, :]
        # Mean over pixels per (image, channel), then channels, then images: all equal-sized, so
        # one running mean.
        total += float(s.sum())
        count += s.size
    return total / count
