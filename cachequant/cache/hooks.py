"""The cache as named hooks on the model's own modules; the model's ``forward`` stays the driver.

UNets (DeepCache): every module a cached call skips gets a :class:`SkipHook`. On a full call it
runs and keeps its output; on a cached call it returns that output without running. The UNet's
own forward still calls every block, so ControlNet residuals, SDXL's added conditions, IP-Adapter,
GLIGEN or FreeU flow through unchanged; only the skipped modules' arithmetic is gone. The last
skipped module before the live up layers is the *boundary*: its stored output is the cached deep
feature X, and on cached calls it returns the cache-DEC correction a_t·X + b_t per channel (Eq. 8).

Transformers: the blocks of a span get a :class:`SpanHook`. A full call stores the deviation
Δ = h_end − h_start the span adds; on a cached call the first block returns h_start + a_t·Δ + b_t
and the other blocks of the span return their input. A block may carry several token streams
(Flux's and SD3's joint blocks update image and text tokens): each stream gets its own deviation,
and cache-DEC's channels are the streams' hidden channels one after the other.

Each branch of a step (the clock's ``branch``: guidance as separate calls, conditional then
unconditional) stores and reuses its own entries: a full step refreshes every branch's feature, a
cached step reuses each branch's own. Cache-DEC's coefficients are per position, shared by the
branches (fitted on both, see :mod:`cachequant.calibration.passes`).

Hooks read the clock's ``mode`` and ``branch`` (host attributes) and the position buffer (on the
device); they never read a tensor on the host, so a compiled model has one graph per (mode,
branch) and no breaks.
"""

from __future__ import annotations

import inspect
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
    streams: tuple[str, ...] = ("hidden_states",)
    """Transformer: the block arguments that carry token streams through the span (by name)."""
    returns: tuple[tuple[str, ...] | None, ...] = ()
    """Transformer, per block of ``modules``: the streams in the order the block returns them as a
    tuple, or None where the block returns its one stream as a tensor (empty: every block does)."""

    @property
    def feature_key(self) -> str:
        """Store key of the cached feature (what DPS and cache-DEC are fitted on)."""
        return self.boundary if self.kind == "unet" else SPAN_DELTA

    def feature_parts(self, store: FeatureCache, branch: int = 0) -> tuple[torch.Tensor, ...]:
        """The cached feature as ``branch`` last stored it, one tensor per part: the UNet's boundary
        output, or the span's deviation per stream (a stream the span drops, such as the text
        stream of SD3's last block, has none). Cache-DEC's channels follow this order."""
        if self.kind == "unet":
            return (store.feature(self.boundary, branch),)
        return tuple(d for d in store.get(SPAN_DELTA, branch) if d is not None)


def _apply_dec(module: nn.Module, x: torch.Tensor, step: torch.Tensor, channel_dim: int,
               offset: int = 0) -> torch.Tensor:
    """a_t·x + b_t per channel; ``offset``: where x's channels start in the table (later streams)."""
    table = held(module, CACHE_DEC)
    if table is None:
        return x
    ab = table.index_select(1, step)  # (2, 1, C): this position's slope and shift
    if offset or ab.shape[2] != x.shape[channel_dim]:
        ab = ab[:, :, offset: offset + x.shape[channel_dim]]
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
            out = self.store.get(self.key, self.clock.branch)
            if self.channel_dim is not None:
                step = self.clock.step_tensor()
                out = _first(out, lambda x: _apply_dec(module, x, step, self.channel_dim))
            return out
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.store.put(self.key, out, self.clock.branch)
        return out


class SpanHook(ModelHook):
    """A block of the cached transformer span.

    The streams are read from the block's arguments by name (keyword, or the position of that
    parameter in the block's ``forward``) and returned the way the block returns them, so the
    model's own forward keeps driving the blocks."""

    def __init__(self, clock: StepClock, store: FeatureCache, first: bool, last: bool, channel_dim: int,
                 streams: tuple[str, ...] = ("hidden_states",), returns: tuple[str, ...] | None = None,
                 params: tuple[str, ...] = ("hidden_states",)):
        super().__init__()
        self.clock, self.store = clock, store
        self.first, self.last, self.channel_dim = first, last, channel_dim
        self.streams, self.returns = streams, returns
        self.where = tuple(params.index(s) if s in params else None for s in streams)
        """Positional index of each stream's parameter in the block's forward."""

    def _inputs(self, args: tuple, kwargs: dict) -> tuple:
        return tuple(kwargs[s] if s in kwargs else (args[i] if i is not None and i < len(args) else None)
                     for s, i in zip(self.streams, self.where))

    def _outputs(self, out: Any) -> tuple:
        """The block's output as one value per stream, in ``streams`` order."""
        if self.returns is None:
            return (out[0] if isinstance(out, tuple) else out,)
        by_name = dict(zip(self.returns, out))
        return tuple(by_name[s] for s in self.streams)

    def _pack(self, values: tuple) -> Any:
        if self.returns is None:
            return values[0]
        by_name = dict(zip(self.streams, values))
        return tuple(by_name[s] for s in self.returns)

    def new_forward(self, module: nn.Module, *args, **kwargs):
        hs = self._inputs(args, kwargs)
        branch = self.clock.branch
        if self.clock.mode == "cached":
            if not self.first:
                return self._pack(hs)
            step = self.clock.step_tensor()
            out, offset = [], 0
            for h, delta in zip(hs, self.store.get(SPAN_DELTA, branch)):
                if delta is None or h is None:
                    out.append(None)
                    continue
                out.append(h + _apply_dec(module, delta, step, self.channel_dim, offset).to(h.dtype))
                offset += delta.shape[self.channel_dim]
            return self._pack(tuple(out))
        if self.first:
            self.store.put("span.input", hs, branch)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            deltas = tuple(None if o is None or h is None else o - h
                           for o, h in zip(self._outputs(out), self.store.get("span.input", branch)))
            self.store.put(SPAN_DELTA, deltas, branch)
        return out


def block_params(module: nn.Module) -> tuple[str, ...]:
    """The parameter names of a block's ``forward``, in positional order (where a stream passed
    positionally is found)."""
    return tuple(p for p in inspect.signature(type(module).forward).parameters if p != "self")


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
            returns = layout.returns[i] if layout.returns else None
            hook = SpanHook(clock, store, first=i == 0, last=i == len(mods) - 1, channel_dim=layout.channel_dim,
                            streams=layout.streams, returns=returns, params=block_params(mod))
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
