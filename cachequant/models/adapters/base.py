"""What cachequant needs to know about one family of denoisers, as a small description.

An :class:`Adapter` says where the cache sits (a JSON *site* stored in the plan, and the
:class:`~cachequant.cache.hooks.CacheLayout` of modules it touches), which layers keep 8-bit
weights when the others go to 4 bits (first and last), which layers read a two-part
concatenated input (one activation quantizer per part), and which layers first consume the cached
feature (quantization-DEC), and which layers stay in float unless the config asks otherwise
(adaLN modulation). Built-in families are listed in :mod:`cachequant.models.adapters.registry`;
``register`` adds one from user code. Transformers are usually described more briefly by a
:class:`~cachequant.models.adapters.transformer.TransformerDescription`, which makes the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ...cache.hooks import CacheLayout


def no_layers(model: nn.Module) -> set[str]:
    return set()


@dataclass(frozen=True)
class Adapter:
    name: str
    classes: tuple[str, ...]
    cache_kind: str
    """'unet' or 'transformer' (:class:`~cachequant.cache.hooks.CacheLayout`)."""
    resolve_site: Callable[[nn.Module, Any], dict]
    """(model, config) -> JSON-able description of the cache site; raises ValueError if invalid."""
    layout: Callable[[nn.Module, dict], CacheLayout]
    """(model, site) -> the modules the cache hooks go on."""
    keep_8bit: Callable[[nn.Module], set[str]]
    """Names of the first and last layers: left float unless ``CacheQuantConfig.quant_io``, then
    kept at 8-bit weights when weights go to 4 bits."""
    concat_splits: Callable[[nn.Module, dict], dict[str, int]]
    """Layer name -> number of leading input channels of a two-part concatenated input."""
    cache_consumers: Callable[[nn.Module, dict], dict[str, int]]
    """Layer name -> channels of the cached slice, for the first layers consuming the cache."""
    keep_float: Callable[[nn.Module], set[str]] = no_layers
    """Names of Linear / Conv2d layers left in float (adaLN modulation: a few small layers whose
    per-sample scales and shifts multiply every token; ``CacheQuantConfig.quant_modulation``
    quantizes them too)."""
