"""Counting the multiply-accumulates that actually execute (cached steps skip the deep blocks).

Forward hooks on every Linear / Conv2d (and quantized wrapper) add up ``output elements × inputs per
output``; Bops weight each MAC by weight bits × activation bits (32 × 32 for float layers).
Attention's two batched matmuls are not counted (they are a small share at the sizes cachequant
targets); the count is the same for every variant, so ratios stay comparable.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from ..quant.layers import _QuantBase


@dataclass
class OpCount:
    macs: int = 0
    bops: int = 0


def _macs(inner: nn.Module, out) -> int:
    if isinstance(inner, nn.Linear):
        return out.numel() * inner.in_features
    kh, kw = inner.kernel_size
    return out.numel() * (inner.in_channels // inner.groups) * kh * kw


@contextmanager
def count_ops(model: nn.Module) -> Iterator[OpCount]:
    count = OpCount()
    handles = []
    wrapped = {id(m.inner) for m in model.modules() if isinstance(m, _QuantBase)}
    for m in model.modules():
        if isinstance(m, _QuantBase):
            def hook(mod, inp, out):
                n = _macs(mod.inner, out)
                quant = mod.runtime.quant_mode == "quant"
                count.macs += n
                count.bops += n * (mod.weight_bits * mod.act_bits if quant else 32 * 32)
            handles.append(m.register_forward_hook(hook))
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in wrapped:
            def hook(mod, inp, out):
                n = _macs(mod, out)
                count.macs += n
                count.bops += n * 32 * 32
            handles.append(m.register_forward_hook(hook))
    try:
        yield count
    finally:
        for h in handles:
            h.remove()
