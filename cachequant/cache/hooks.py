"""The cache as named hooks on the model's own modules; the model's ``forward`` stays the driver.

UNets (DeepCache): every module a cached call skips gets a :class:`SkipHook`. On a full call it
runs and keeps its output; on a cached call it returns that output without running. The UNet's
own forward still calls every block, so ControlNet residuals, SDXL's added conditions, IP-Adapter,
GLIGEN or FreeU flow through unchanged; only the skipped modules' arithmetic is gone. The last
skipped module before the live up layers is the *boundary*: its stored output is the cached deep
feature X, and on cached calls it returns the cache-DEC correction a_t·X + b_t per channel (Eq. 8).

Transformers: the blocks of a span get a :class:`SpanHook`. A full call stores the deviation
Δ = h_end − h_start the span adds; on a cached call the first block returns h_start + a_t·Δ + b_t
and the other blocks of the span return their input.

Hooks read the clock's ``mode`` (a host attribute) and the position buffer (on the device); they
never read a tensor on the host, so a compiled model has one graph per mode and no breaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..runtime.clock import StepClock
from ..runtime.hooks import add_hook, held, hold, release, remove_hook
from .store import FeatureCache

CACHE_HOOK = "cachequant.cache"
CACHE_DEC = "_cachequant_cache_dec"
SPAN_DELTA = "span.delta"


@dataclass(frozen=True)
class CacheLayout:
    """Which modules a cache site touches (made by a model adapter from the plan's site)."""
    kind: str
    """'unet' or 'transformer'."""
    modules: tuple[str, ...]
    """UNet: the modules cached calls skip, in execution order; transformer: the span's blocks."""
    boundary: str
    """The module whose hook applies cache-DEC: UNet, the last skipped module; transformer, the
    span's first block."""
    channel_dim: int
    """Channel axis of the cached feature (cache-DEC is per channel)."""

    @property
    def feature_key(self) -> str:
        """Store key of the cached feature (what DPS and cache-DEC are fitted on)."""
        return self.boundary if self.kind == "unet" else SPAN_DELTA


def _apply_dec(module: nn.Module, x: torch.Tensor, step: torch.Tensor, channel_dim: int) -> torch.Tensor:
    table = held(module, CACHE_DEC)
    if table is None:
        return x
    ab = table.index_select(1, step)  # (2, 1, C): this position's slope and shift
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return x * ab[0].view(shape).to(x.dtype) + ab[1].view(shape).to(x.dtype)


def _first(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)


class SkipHook(ModelHook):
    """A module cached calls do not run (DeepCache)."""

    def __init__(self, clock: StepClock, store: FeatureCache, key: str, channel_dim: int | None = None):
        super().__init__()
        self.clock, self.store, self.key = clock, store, key
        self.channel_dim = channel_dim
        """Set on the boundary module only: cache-DEC applies to what it returns."""

    def new_forward(self, module: nn.Module, *args, **kwargs):
        if self.clock.mode == "cached":
            out = self.store.get(self.key)
            if self.channel_dim is not None:
                step = self.clock.step_tensor()
                out = _first(out, lambda x: _apply_dec(module, x, step, self.channel_dim))
            return out
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.store.put(self.key, out)
        return out


class SpanHook(ModelHook):
    """A block of the cached transformer span."""

    def __init__(self, clock: StepClock, store: FeatureCache, first: bool, last: bool, channel_dim: int):
        super().__init__()
        self.clock, self.store = clock, store
        self.first, self.last, self.channel_dim = first, last, channel_dim

    def new_forward(self, module: nn.Module, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if self.clock.mode == "cached":
            if not self.first:
                return h
            delta = _apply_dec(module, self.store.get(SPAN_DELTA), self.clock.step_tensor(), self.channel_dim)
            return h + delta.to(h.dtype)
        if self.first:
            self.store.put("span.input", h)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            self.store.put(SPAN_DELTA, out - self.store.get("span.input"))
        return out


def attach_cache(model: nn.Module, layout: CacheLayout, clock: StepClock, store: FeatureCache,
                 cache_dec: torch.Tensor | None = None) -> list[Callable[[], None]]:
    """Installs the cache hooks of ``layout``; ``cache_dec`` (2, T, C) is held on the boundary
    module. Returns the undo callables."""
    undo: list[Callable[[], None]] = []
    mods = [model.get_submodule(name) for name in layout.modules]
    for i, (name, mod) in enumerate(zip(layout.modules, mods)):
        if layout.kind == "unet":
            hook = SkipHook(clock, store, name, layout.channel_dim if name == layout.boundary else None)
        else:
            hook = SpanHook(clock, store, first=i == 0, last=i == len(mods) - 1, channel_dim=layout.channel_dim)
        add_hook(mod, hook, CACHE_HOOK)
        undo.append(lambda m=mod: remove_hook(m, CACHE_HOOK))
    if cache_dec is not None:
        boundary = model.get_submodule(layout.boundary)
        hold(boundary, CACHE_DEC, cache_dec.to(_device_of(boundary)))
        undo.append(lambda: release(boundary, CACHE_DEC))
    return undo


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
