"""Activation-range observers: what calibration records while the cached model runs in float.

Each observer keeps, per (position, calibration batch), the [lo, hi] range its L_p search chose
(:func:`~cachequant.quant.quantizer.activation_range`). :meth:`RangeObserver.table` combines them
into the per-position (scale, zero point) table a plan stores: batches by an exponential moving
average in batch order (so any split of the batches across processes gives the same result),
positions never observed from the nearest observed one. The branches of a step (a pipeline that
calls the model twice per step, conditional then unconditional) share one range per position: a
later branch's call widens the range its step's first branch recorded for the same batch (their
union), so the shared range covers both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .quantizer import activation_range, params_from_range

_EMA = 0.9


@dataclass
class RangeObserver:
    bits: int
    history: list[tuple[int, int, float, float]] = field(default_factory=list)
    """(position, batch, lo, hi) per observed call."""

    def observe(self, x: torch.Tensor, position: int, batch: int, branch: int = 0) -> None:
        """Records the range of ``x``; ``branch`` > 0 (a step's later call) merges it into the
        entry its step's first branch made."""
        lo, hi = activation_range(x, self.bits)
        if branch and self.history and self.history[-1][:2] == (position, batch):
            _, _, lo0, hi0 = self.history[-1]
            self.history[-1] = (position, batch, min(lo0, lo), max(hi0, hi))
            return
        self.history.append((position, batch, lo, hi))

    @property
    def positions(self) -> set[int]:
        return {h[0] for h in self.history}

    def table(self, num_positions: int, begin: int = 0, per_step: bool = True) -> torch.Tensor:
        """(2, T) scale and zero point per position. ``per_step=False`` gives every position the union
        of all ranges (the timestep-agnostic baseline). Positions before ``begin`` are never run and
        get (1, 0); other positions not observed (a layer of the deep path at a cached position,
        which runs there only when a run starts at it) take the nearest observed position's range."""
        by_pos: dict[int, list[tuple[float, float]]] = {}
        for pos, _, lo, hi in sorted(self.history, key=lambda h: h[1]):
            by_pos.setdefault(pos, []).append((lo, hi))
        if not by_pos:
            raise ValueError("no activation was observed")
        if not per_step:
            allr = [r for rs in by_pos.values() for r in rs]
            union = (min(r[0] for r in allr), max(r[1] for r in allr))
            by_pos = {t: [union] for t in range(begin, num_positions)}
        lo_t = torch.zeros(num_positions)
        hi_t = torch.zeros(num_positions)
        for pos, ranges in by_pos.items():
            lo, hi = ranges[0]
            for l2, h2 in ranges[1:]:
                lo, hi = _EMA * lo + (1 - _EMA) * l2, _EMA * hi + (1 - _EMA) * h2
            lo_t[pos], hi_t[pos] = lo, hi
        seen = sorted(by_pos)
        for t in range(begin, num_positions):
            if t not in by_pos:
                j = min(seen, key=lambda s: (abs(s - t), s))
                lo_t[t], hi_t[t] = lo_t[j], hi_t[j]
        s, z = params_from_range(lo_t, hi_t, self.bits)
        s[:begin], z[:begin] = 1.0, 0.0
        return torch.stack([s, z])
