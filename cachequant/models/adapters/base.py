"""The small interface every architecture adapter implements, and the adapter registry.

An adapter knows three things about one architecture family: where the cached feature is
produced and where it re-enters (``install`` / ``cached_forward``), which layers must stay at 8-bit
weights (first and last), and which layers read a skip concatenation (split quantizers, and the
quantization-DEC consumers of the cached slice). Adding an architecture is one new file that
defines an :class:`Adapter` and calls :func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ...runtime import Runtime


@dataclass
class Adapter:
    name: str
    classes: tuple[str, ...]
    channel_dim: int
    """Channel axis of the cached feature (cache DEC is per channel)."""
    resolve_site: Callable[[nn.Module, Any], dict]
    """(model, config) -> JSON-able description of the cache site; raises ValueError if invalid."""
    install: Callable[[nn.Module, Runtime, dict], list[Callable[[], None]]]
    """Installs the feature-storing / reusing hooks; returns undo callables."""
    cached_forward: Callable[..., Any]
    """(model, runtime, site, original_forward, args, kwargs) -> output on a cached step."""
    keep_8bit: Callable[[nn.Module], set[str]]
    """Names of the first and last layers (kept at 8-bit weights when weights go to 4 bits)."""
    concat_splits: Callable[[nn.Module, dict], dict[str, int]]
    """Layer name -> number of leading input channels of a two-part concatenated input."""
    cache_consumers: Callable[[nn.Module, dict], dict[str, int]]
    """Layer name -> channels of the cached slice, for the first layers consuming the cache."""


_REGISTRY: list[Adapter] = []


def register(adapter: Adapter) -> Adapter:
    _REGISTRY.append(adapter)
    return adapter


def supported_classes() -> list[str]:
    return [c for a in _REGISTRY for c in a.classes]


def adapter_for(model: nn.Module) -> Adapter:
    cls = type(model).__name__
    for a in _REGISTRY:
        if cls in a.classes:
            return a
    raise TypeError(
        f"cachequant does not support {cls}. Supported denoisers: {', '.join(supported_classes())}. "
        "Support for a new architecture is one adapter file in cachequant/models/adapters/."
    )


def denoiser_of(pipe: Any) -> tuple[str, nn.Module]:
    """The pipeline component that is called once per step (``unet`` or ``transformer``)."""
    for attr in ("unet", "transformer"):
        m = getattr(pipe, attr, None)
        if isinstance(m, nn.Module):
            return attr, m
    raise TypeError(
        f"{type(pipe).__name__} has no `unet` or `transformer` component; cachequant accelerates "
        f"diffusers pipelines whose denoiser is one of: {', '.join(supported_classes())}"
    )
