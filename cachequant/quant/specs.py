"""Which layers and attention modules a plan quantizes, from the model and the config."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from ..plan import LayerSpec

STOCK_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
"""Attention processors whose arithmetic the 8-bit attention processor reproduces; modules with
any other processor (sliced, fused, IP-Adapter, custom) keep theirs and float attention."""


def layer_specs(model: nn.Module, weight_bits: int, keep_8bit: set[str], splits: dict[str, int],
                w8_patterns: tuple[str, ...] = (), dec_layers: frozenset[str] = frozenset()) -> list[LayerSpec]:
    """Every Linear and Conv2d of ``model`` with its weight bits and input split (if any). Layers in
    ``keep_8bit`` (the adapter's first / last) or matching a ``w8_patterns`` glob stay at 8 bits; a
    pattern that matches no layer is an error (a typo would otherwise silently quantize to 4 bits)."""
    specs, used = [], set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            hits = {p for p in w8_patterns if fnmatchcase(name, p)}
            used |= hits
            bits = 8 if name in keep_8bit or hits else weight_bits
            specs.append(LayerSpec(name, bits, splits.get(name), name in dec_layers))
    unused = [p for p in w8_patterns if p not in used]
    if unused:
        raise ValueError(f"w8_layers pattern(s) {unused} match no Linear / Conv2d layer of {type(model).__name__}; "
                         f"names look like {specs[1].name if len(specs) > 1 else '?'!r}")
    return specs


def attention_modules(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """(modules whose attention matmuls can be quantized, {module: processor class} of the others)."""
    from diffusers.models.attention_processor import Attention

    ok, other = [], {}
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            proc = type(m.processor).__name__
            if proc in STOCK_PROCESSORS:
                ok.append(name)
            else:
                other[name] = proc
    return ok, other
