"""Transformers (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``): Δ-cache of a block span.

Full step: the blocks of the span ``[start, end)`` run and the deviation they add to their input,
``h_end − h_start``, is stored. Cached step: the span is skipped and the stored deviation (after
the cache-DEC correction, per hidden channel) is added to the span's fresh input. The default span
keeps the first and the last block live — like DeepCache's shallow branch, the cheap outer blocks
see the current input while the deep middle is reused (Δ-DiT / CacheQuant cache "the deviation
between two blocks").
"""

from __future__ import annotations

from torch import nn

from ...runtime import Runtime
from .base import Adapter, register


def _resolve_site(model: nn.Module, config) -> dict:
    n = len(model.transformer_blocks)
    span = getattr(config, "dit_span", None)
    start, end = (1, n - 1) if span is None else (int(span[0]), int(span[1]))
    if not 0 <= start < end <= n:
        raise ValueError(
            f"dit_span must satisfy 0 <= start < end <= {n} (this model has {n} transformer blocks), "
            f"got ({start}, {end})" + ("; use a model with at least 3 blocks or set dit_span" if span is None else "")
        )
    return {"span": [start, end], "feature": f"transformer_blocks[{start}:{end}] deviation"}


def _install(model: nn.Module, rt: Runtime, site: dict) -> list:
    start, end = site["span"]
    blocks = model.transformer_blocks
    state: dict = {}
    undo = []

    def make(i: int, block: nn.Module):
        original = block.forward

        def forward(hidden_states, *args, **kwargs):
            if i == start:
                state["h_in"] = hidden_states
            if not rt.is_full:
                # The first block of the span adds the reused deviation; the others pass through.
                return hidden_states + rt.reuse(2).to(hidden_states.dtype) if i == start else hidden_states
            out = original(hidden_states, *args, **kwargs)
            if i == end - 1:
                rt.store(out - state.pop("h_in"))
            return out

        block.forward = forward
        undo.append(lambda: block.__dict__.pop("forward", None))

    for i in range(start, end):
        make(i, blocks[i])
    return undo


def _cached_forward(model, rt: Runtime, site: dict, original_forward, args, kwargs):
    return original_forward(*args, **kwargs)


def _keep_8bit(model) -> set[str]:
    last = "proj_out_2" if hasattr(model, "proj_out_2") else "proj_out"
    return {"pos_embed.proj", last}


def _no_splits(model, site: dict) -> dict[str, int]:
    return {}


TRANSFORMER = register(Adapter(
    name="transformer2d", classes=("DiTTransformer2DModel", "PixArtTransformer2DModel"), channel_dim=2,
    resolve_site=_resolve_site, install=_install, cached_forward=_cached_forward, keep_8bit=_keep_8bit,
    concat_splits=_no_splits, cache_consumers=_no_splits,
))
