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


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al., 2004) over images (N, H, W, C): Gaussian window σ = 1.5, K1 = 0.01,
    K2 = 0.03, per channel, population statistics — the usual reference settings."""
    from scipy.ndimage import gaussian_filter

    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs same-shape (N, H, W, C) inputs, got {a.shape} and {b.shape}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for x, y in zip(np.asarray(a, np.float64), np.asarray(b, np.float64)):
        per_c = []
        for c in range(x.shape[-1]):
            f = lambda z: gaussian_filter(z, sigma=1.5, truncate=3.5)  # noqa: E731
            xc, yc = x[..., c], y[..., c]
            mx, my = f(xc), f(yc)
            vx, vy, cxy = f(xc * xc) - mx * mx, f(yc * yc) - my * my, f(xc * yc) - mx * my
            s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
            per_c.append(s[3:-3, 3:-3].mean() if min(s.shape) > 6 else s.mean())
        vals.append(np.mean(per_c))
    return float(np.mean(vals))
