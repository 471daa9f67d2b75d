"""Cache half of DEC: per step and per channel, X_full ≈ a·X_cached + b (CacheQuant Eq. 8).

Fitted by least squares over batch × spatial positions on the full-precision, uncached trajectory
(open loop, as in the reference): for a cached step t whose cache was filled at full step s,
``a = cov(X_s, X_t) / var(X_s)`` and ``b = mean(X_t) − a·mean(X_s)``. Full steps get (1, 0).
Correcting the *input* channels of the re-entering feature removes the part of the cache error
that a later output-channel correction cannot (supplement §8: direct output correction is the
special case a1 = 1, b1 = 0).

A feature may come in parts — the image and text token streams of a joint transformer block,
whose token counts differ: each step's feature is then a tuple, each part is fitted on its own,
and the coefficients of the parts are concatenated along the channels in part order.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def _channels_first(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1).double()


def split_parts(features: Sequence[Any]) -> list[list[torch.Tensor]]:
    """Per part, the per-step tensors (a feature of plain tensors is one part)."""
    if features and isinstance(features[0], (tuple, list)):
        return [[f[k] for f in features] for k in range(len(features[0]))]
    return [list(features)]


def fit_cache_dec(features: Sequence[Any], full_steps: Sequence[int], channel_dim: int,
                  eps: float = 1e-12, slope: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (a, b), each ``(T, C)`` float32, for the recorded per-step ``features`` (tensors,
    or tuples of parts: C is then the parts' channels one after the other).

    ``slope=False`` keeps a = 1 and fits only b = mean(X_t) − mean(X_s), the least-squares shift
    (``CacheQuantConfig.cache_dec_slope`` says when that matters)."""
    parts = split_parts(features)
    if len(parts) > 1:
        fits = [fit_cache_dec(p, full_steps, channel_dim, eps, slope) for p in parts]
        return torch.cat([a for a, _ in fits], dim=1), torch.cat([b for _, b in fits], dim=1)
    features = parts[0]
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
        if slope:
            var = ((x - mx[:, None]) ** 2).mean(1)
            cov = ((x - mx[:, None]) * (y - my[:, None])).mean(1)
            a[t] = torch.where(var > eps, cov / var.clamp_min(eps), torch.ones_like(var))
        b[t] = my - a[t] * mx
    return a.float(), b.float()


def _reuse_pairs(features: Sequence[torch.Tensor], full_steps: Sequence[int],
                 dec: tuple[torch.Tensor, torch.Tensor] | None, channel_dim: int):
    """Yields ``(t, X_t, Y_t)`` for each cached step t, both ``(C, batch × positions)`` float64:
    the fresh feature and the reused one (the feeding full step's, corrected by ``dec`` if given)."""
    full = set(full_steps)
    if 0 not in full:
        raise ValueError(f"full_steps must contain step 0 (the first call has nothing to reuse), got {sorted(full)[:5]}")
    anchor = 0
    for t, x in enumerate(features):
        if t in full:
            anchor = t
            continue
        y = _channels_first(features[anchor], channel_dim)
        if dec is not None:
            y = y * dec[0][t].double()[:, None] + dec[1][t].double()[:, None]
        yield t, _channels_first(x, channel_dim), y


def _by_fifth(values: np.ndarray, reduce) -> list:
    """``reduce`` over each fifth of the trajectory's steps."""
    return [reduce(i) for i in np.array_split(np.arange(len(values)), 5)]


def relative_reuse_error(features: Sequence[Any], full_steps: Sequence[int],
                         dec: tuple[torch.Tensor, torch.Tensor] | None = None, channel_dim: int = 1) -> dict:
    """How far the reused feature is from the fresh one, relative to the fresh one's size.

    ``sum_t ||X_t - Y_t||_1 / sum_t ||X_t||_1`` over the cached steps t, where Y_t is the feature
    of the full step that feeds t (its numerator is the schedule's DPS cost, Σ D(i, j)), or that
    feature corrected by cache-DEC ``dec = (a, b)`` (Eq. 8). Being relative, it compares samplers,
    step counts and models; it is what the DPS schedule and cache-DEC exist to shrink. Returns the
    overall value and one per fifth of the trajectory (where in sampling the error sits), and the
    mean absolute and squared errors per element (the squared one is what Eq. 8's least-squares fit
    minimises).
    """
    T = len(features)
    num, den, sq = np.zeros(T), np.zeros(T), np.zeros(T)
    offset, numel = 0, 0
    for part in split_parts(features):  # parts: sums over all of them, each with its DEC channels
        c = part[0].shape[channel_dim]
        d = None if dec is None else (dec[0][:, offset: offset + c], dec[1][:, offset: offset + c])
        for t, x, y in _reuse_pairs(part, full_steps, d, channel_dim):
            num[t] += float((x - y).abs().sum())
            den[t] += float(x.abs().sum())
            sq[t] += float(((x - y) ** 2).sum())
        offset, numel = offset + c, numel + part[0].numel()
    cached = T - len(set(full_steps) & set(range(T)))
    return {"relative_l1": float(num.sum() / max(den.sum(), 1e-30)),
            "relative_l1_by_fifth": _by_fifth(num, lambda i: float(num[i].sum() / max(den[i].sum(), 1e-30))),
            "mean_l1": float(num.sum() / max(cached * numel, 1)),
            "mean_squared": float(sq.sum() / max(cached * numel, 1)), "cached_steps": cached}


def reuse_spread_ratio(features: Sequence[torch.Tensor], full_steps: Sequence[int],
                       dec: tuple[torch.Tensor, torch.Tensor] | None = None, channel_dim: int = 1) -> dict:
    """How much of the fresh feature's spread the reused feature keeps, per channel.

    For each cached step t and channel c: std(Y_tc) / std(X_tc) over batch × positions, where X_t is
    the fresh feature and Y_t the reused one (optionally corrected by cache-DEC ``dec``); returns the
    mean over cached steps and channels, overall and per fifth of the trajectory (None for a fifth
    with no cached step). Why: the least-squares slope of Eq. 8 is a = ρ·σ_X/σ_Y, so the corrected
    feature's spread is ρ·σ_X. When the reused feature predicts the fresh one poorly (low
    correlation ρ, e.g. under a stochastic sampler that injects fresh noise each step), cache-DEC
    shrinks the feature towards its per-channel mean by the factor ρ on every cached step: a
    systematic loss of variation, not a random error.
    """
    r = np.full(len(features), np.nan)
    for t, x, y in _reuse_pairs(features, full_steps, dec, channel_dim):
        sx = x.std(1)
        ok = sx > 1e-12
        r[t] = float((y.std(1)[ok] / sx[ok]).mean()) if bool(ok.any()) else 1.0
    # None for a fifth without cached steps (NaN would not survive JSON)
    return {"spread_ratio": float(np.nanmean(r)) if np.isfinite(r).any() else 1.0,
            "spread_ratio_by_fifth": _by_fifth(r, lambda i: float(np.nanmean(r[i])) if np.isfinite(r[i]).any() else None)}
