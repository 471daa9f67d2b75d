"""Cache half of DEC: per step and per channel, X_full ≈ a·X_cached + b (CacheQuant Eq. 8).

Fitted by least squares over batch × spatial positions on the full-precision, uncached trajectory
(open loop, as in the reference): for a cached step t whose cache was filled at full step s,
``a = cov(X_s, X_t) / var(X_s)`` and ``b = mean(X_t) − a·mean(X_s)``. Full steps get (1, 0).
Correcting the *input* channels of the re-entering feature removes the part of the cache error
that a later output-channel correction cannot (supplement §8: direct output correction is the
special case a1 = 1, b1 = 0).
"""

from __future__ import annotations

from typing import Sequence

import torch


def _channels_first(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1).double()


def fit_cache_dec(features: Sequence[torch.Tensor], full_steps: Sequence[int], channel_dim: int,
                  eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (a, b), each ``(T, C)`` float32, for the recorded per-step ``features``."""
    T = len(features)
    C = features[0].shape[channel_dim]
    a = torch.ones(T, C, dtype=torch.float64)
    b = torch.zeros(T, C, dtype=torch.float64)
    full = set(full_steps)
    anchor = -1
    for t in range(T):
        if t in full:
            anchor = t
            continue
        x = _channels_first(features[anchor], channel_dim)
        y = _channels_first(features[t], channel_dim)
        mx, my = x.mean(1), y.mean(1)
        var = ((x - mx[:, None]) ** 2).mean(1)
        cov = ((x - mx[:, None]) * (y - my[:, None])).mean(1)
        a[t] = torch.where(var > eps, cov / var.clamp_min(eps), torch.ones_like(var))
        b[t] = my - a[t] * mx
    return a.float(), b.float()
