"""Swapping a model's Linear / Conv2d layers and attention processors for quantized ones, and back.

The layer list is *data* (a list of dicts stored in the plan), so that the same structure is
rebuilt from a plan file without re-running any search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Callable

import torch
from torch import nn

from ..runtime import Runtime
from .attention import OPERANDS, QuantAttnProcessor
from .layers import _QuantBase, wrap_module


def layer_specs(model: nn.Module, weight_bits: int, keep_8bit: set[str], splits: dict[str, int],
                w8_patterns: tuple[str, ...] = ()) -> list[dict]:
    """Every Linear and Conv2d of ``model`` with its weight bits and input split (if any). Layers in
    ``keep_8bit`` (the adapter's first / last) or matching a ``w8_patterns`` glob stay at 8 bits; a
    pattern that matches no layer is an error (a typo would otherwise silently quantize to 4 bits)."""
    specs, used = [], set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            hits = {p for p in w8_patterns if fnmatchcase(name, p)}
            used |= hits
            bits = 8 if name in keep_8bit or hits else weight_bits
            specs.append({"name": name, "weight_bits": bits, "split": splits.get(name)})
    unused = [p for p in w8_patterns if p not in used]
    if unused:
        raise ValueError(f"w8_layers pattern(s) {unused} match no Linear / Conv2d layer of {type(model).__name__}; "
                         f"names look like {specs[1]['name'] if len(specs) > 1 else '?'!r}")
    return specs


def attention_names(model: nn.Module) -> list[str]:
    from diffusers.models.attention_processor import Attention

    return [name for name, m in model.named_modules() if isinstance(m, Attention)]


@dataclass
class QuantState:
    layers: dict[str, _QuantBase] = field(default_factory=dict)
    processors: dict[str, QuantAttnProcessor] = field(default_factory=dict)
    undo: list[Callable[[], None]] = field(default_factory=list)

    def act_quantizers(self):
        for name, layer in self.layers.items():
            for i, q in enumerate(layer.act):
                yield f"act.{name}.{i}", q
        for name, proc in self.processors.items():
            for k in OPERANDS:
                yield f"attn.{name}.{k}", proc.quant[k]

    def finalize(self, fill_nearest: bool = False) -> None:
        for _, q in self.act_quantizers():
            q.finalize(fill_nearest)

    def export(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, q in self.act_quantizers():
            out[f"{key}.scale"] = q.scale.detach().cpu().float().contiguous()
            out[f"{key}.zero_point"] = q.zero_point.detach().cpu().float().contiguous()
            out[f"{key}.seen"] = q.seen.detach().cpu().to(torch.uint8).contiguous()
        for name, layer in self.layers.items():
            out[f"w.{name}.scale"] = layer.w_scale.detach().cpu().float().reshape(-1).contiguous()
            out[f"w.{name}.zero_point"] = layer.w_zero_point.detach().cpu().float().reshape(-1).contiguous()
            if layer.w_codes.numel():
                out[f"w.{name}.codes"] = layer.w_codes.detach().cpu().contiguous()
            if layer.has_dec:
                out[f"qdec.{name}.a"] = layer.dec_a.detach().cpu().float().contiguous()
                out[f"qdec.{name}.b"] = layer.dec_b.detach().cpu().float().contiguous()
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fills every quantizer from plan tensors; a missing or misshapen entry is an error."""
        def get(key: str, like: torch.Tensor) -> torch.Tensor:
            if key not in tensors:
                raise ValueError(f"the plan has no tensor {key!r}; it does not belong to this model/config")
            t = tensors[key]
            if t.numel() != like.numel():
                raise ValueError(f"plan tensor {key!r} has {t.numel()} values, the model needs {like.numel()}")
            return t.reshape(like.shape).to(device=like.device, dtype=like.dtype)

        for key, q in self.act_quantizers():
            q.scale.copy_(get(f"{key}.scale", q.scale))
            q.zero_point.copy_(get(f"{key}.zero_point", q.zero_point))
            q.seen.copy_(get(f"{key}.seen", q.seen))
            q._seen_host = None
        for name, layer in self.layers.items():
            layer.w_scale.copy_(get(f"w.{name}.scale", layer.w_scale))
            layer.w_zero_point.copy_(get(f"w.{name}.zero_point", layer.w_zero_point))
            if f"w.{name}.codes" in tensors:
                codes = tensors[f"w.{name}.codes"]
                if codes.dtype != torch.uint8:
                    raise ValueError(f"plan tensor 'w.{name}.codes' must be uint8, got {codes.dtype}")
                layer.set_weight_codes(codes)
            layer._w_dq = None
            if f"qdec.{name}.a" in tensors:
                dev = layer.w_scale.device
                layer.dec_a = tensors[f"qdec.{name}.a"].to(dev)
                layer.dec_b = tensors[f"qdec.{name}.b"].to(dev)

    def restore(self) -> None:
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def install_quant(model: nn.Module, rt: Runtime, specs: list[dict], attn: list[str], act_bits: int,
                  per_step: bool, search_weights: bool) -> QuantState:
    state = QuantState()
    for spec in specs:
        parent, child = _parent(model, spec["name"])
        original = getattr(parent, child)
        q = wrap_module(original, spec["weight_bits"], act_bits, rt, spec["split"], per_step).to(original.weight.device)
        if search_weights:
            q.init_weight_qparams()
        setattr(parent, child, q)
        state.layers[spec["name"]] = q
        state.undo.append(lambda p=parent, c=child, o=original: setattr(p, c, o))
    for name in attn:
        module = model.get_submodule(name)
        original = module.processor
        proc = QuantAttnProcessor(act_bits, rt, per_step).to(next(model.parameters()).device)
        module.set_processor(proc)
        state.processors[name] = proc
        state.undo.append(lambda m=module, o=original: m.set_processor(o))
    return state
