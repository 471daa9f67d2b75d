"""Transformers (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``): Δ-cache of a block span.

Full call: the blocks of the span ``[start, end)`` run and the deviation they add to their input,
``h_end − h_start``, is stored. Cached call: the span is skipped and the stored deviation (after
the cache-DEC correction, per hidden channel) is added to the span's fresh input. The default span
keeps the first and the last block live — like DeepCache's shallow branch, the cheap outer blocks
see the current input while the deep middle is reused (Δ-DiT / CacheQuant cache "the deviation
between two blocks").
"""

from __future__ import annotations

from torch import nn

from ...cache.hooks import CacheLayout
from .base import Adapter


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


def _layout(model: nn.Module, site: dict) -> CacheLayout:
    start, end = site["span"]
    blocks = tuple(f"transformer_blocks.{i}" for i in range(start, end))
    return CacheLayout("transformer", blocks, boundary=blocks[0], channel_dim=2)


def _keep_8bit(model) -> set[str]:
    last = "proj_out_2" if hasattr(model, "proj_out_2") else "proj_out"
    return {"pos_embed.proj", last}


def _none(model, site: dict) -> dict[str, int]:
    return {}


TRANSFORMER = Adapter(
    name="transformer2d", classes=("DiTTransformer2DModel", "PixArtTransformer2DModel"), cache_kind="transformer",
    resolve_site=_resolve_site, layout=_layout, keep_8bit=_keep_8bit, concat_splits=_none, cache_consumers=_none,
)
