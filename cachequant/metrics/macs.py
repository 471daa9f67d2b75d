"""Counting the multiply-accumulates that actually execute (cached steps skip the deep path), and
the bits the weights are stored in.

Forward hooks on every Linear / Conv2d add up ``output elements × inputs per output``; Bops weight
each MAC by weight bits × activation bits (32 × 32 for float layers). Attention's two batched
matmuls are not counted (they are a small share at the sizes cachequant targets); the count is
the same for every variant, so ratios stay comparable.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from ..quant.layer import quant_hooks


@dataclass
class OpCount:
    macs: int = 0
    bops: int = 0


def _macs(layer: nn.Module, out) -> int:
    if isinstance(layer, nn.Linear):
        return out.numel() * layer.in_features
    kh, kw = layer.kernel_size
    return out.numel() * (layer.in_channels // layer.groups) * kh * kw


@contextmanager
def count_ops(model: nn.Module) -> Iterator[OpCount]:
    count = OpCount()
    bits = {id(m): h.weight_bits * h.act_bits for m, h in quant_hooks(model).values()}
    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            def hook(mod, inp, out, b=bits.get(id(m), 32 * 32)):
                n = _macs(mod, out)
                count.macs += n
                count.bops += n * b
            handles.append(m.register_forward_hook(hook))
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


def weight_storage_bits(model: nn.Module) -> int:
    """Bits needed to store the denoiser's weights at the precisions it runs at."""
    total = 0
    counted: set[int] = set()
    for m, h in quant_hooks(model).values():
        total += h.weight_numel * h.weight_bits
        counted.add(id(m.weight))
    for p in model.parameters():
        if id(p) not in counted:
            total += p.numel() * p.element_size() * 8
    return total
