"""Logged model calls as a pool of per-sample intermediate inputs, and replays of them.

A pipeline run of B samples makes T model calls; with classifier-free guidance each call's batch
holds 2B rows (cond, uncond), so sample i of a call is rows {i, B + i, ...}. A pool entry is one
(call, sample) pair. Replaying an entry on a cached step first replays its trajectory's most recent
full step for the same rows (in full precision, as when the pool was logged) so that the cached
feature it reuses is the one it would have seen.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F


def to_device(obj: Any, device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def slice_rows(obj: Any, rows: list[int], m: int) -> Any:
    """Every tensor whose first dimension is the call's batch size ``m`` is cut to ``rows``."""
    if isinstance(obj, torch.Tensor):
        return obj[rows] if obj.dim() > 0 and obj.shape[0] == m else obj
    if isinstance(obj, dict):
        return {k: slice_rows(v, rows, m) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(slice_rows(v, rows, m) for v in obj)
    return obj


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() == 4:
            return v
    raise ValueError("no 4-D model input found in the logged call")


@dataclass
class Pool:
    log: list  # (step, args, kwargs, output) per model call, runs one after another
    run_sizes: list[int]  # samples per pipeline run
    num_calls: int
    entries: list[tuple[int, int]]  # (call index, sample index)
    steps: np.ndarray
    features: np.ndarray

    def rows(self, call: int, sample: int) -> tuple[list[int], int]:
        b = self.run_sizes[call // self.num_calls]
        m = _first_tensor(self.log[call][1], self.log[call][2]).shape[0]
        return [sample + j * b for j in range(m // b)], m


def build_pool(log: list, run_sizes: list[int], num_calls: int, max_dim: int = 1024) -> Pool:
    if len(log) != len(run_sizes) * num_calls:
        raise RuntimeError(f"logged {len(log)} model calls, expected {len(run_sizes)} runs x {num_calls}")
    entries, steps, feats = [], [], []
    for c, (step, args, kwargs, _) in enumerate(log):
        x = _first_tensor(args, kwargs).float()
        b = run_sizes[c // num_calls]
        side = max(1, int((max_dim / x.shape[1]) ** 0.5))
        if x.shape[-1] > side:
            x = F.adaptive_avg_pool2d(x, side)
        for i in range(b):
            entries.append((c, i))
            steps.append(step)
            feats.append(x[i].reshape(-1).numpy())
    return Pool(log, run_sizes, num_calls, entries, np.array(steps), np.stack(feats))


@torch.no_grad()
def replay_observe(call, full_steps: frozenset[int], pool: Pool, selected: np.ndarray, device,
                   observe: Callable[[bool], None]) -> dict[int, int]:
    """Runs the selected entries through the model with the observers on; returns the number of
    entries per position. ``call(position, args, kwargs)`` runs the model at a position;
    ``observe(on)`` switches the observers. An entry at a cached position first replays its
    trajectory's latest full position for the same rows (observers off), so that the cached
    feature it reuses is the one it would have seen."""
    groups: dict[int, list[int]] = defaultdict(list)
    for k in selected:
        c, i = pool.entries[int(k)]
        groups[c].append(i)
    full = sorted(full_steps)
    per_step: dict[int, int] = defaultdict(int)
    try:
        for c in sorted(groups, key=lambda c: (pool.log[c][0], c)):
            step, args, kwargs, _ = pool.log[c]
            rows: list[int] = []
            m = 0
            for i in groups[c]:
                r, m = pool.rows(c, i)
                rows += r
            if step not in full_steps:
                anchor = max(s for s in full if s <= step)
                _, a_args, a_kwargs, _ = pool.log[c - (step - anchor)]
                observe(False)
                call(anchor, to_device(slice_rows(a_args, rows, m), device), to_device(slice_rows(a_kwargs, rows, m), device))
            observe(True)
            call(step, to_device(slice_rows(args, rows, m), device), to_device(slice_rows(kwargs, rows, m), device))
            per_step[step] += len(groups[c])
    finally:
        observe(True)
    return dict(per_step)
