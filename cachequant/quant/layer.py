"""Quantized layers as hooks on the model's own ``nn.Linear`` / ``nn.Conv2d`` modules.

The module keeps its class, its ``weight`` / ``bias``, its ``in_features`` / ``kernel_size`` /
..., its ``state_dict`` and its place in the model; a :class:`QuantHook` named
``cachequant.quant`` replaces what its forward computes, and the quantization data ride on it as
non-persistent buffers (:mod:`cachequant.runtime.hooks`):

* ``act``   (parts, 2, T) activation scale and zero point per input part and position;
* ``w``     (2, N) per-output-channel weight scale and zero point;
* ``codes`` uint8 weight codes when the plan chose them (GPTQ); else the weight rounds to nearest;
* ``qdec``  (2, T, N) quantization-DEC slope and shift, for the first consumers of the cache.

How the data execute is the hook's *backend* (:mod:`cachequant.backends`): the float reference,
or an INT8 / FP8 kernel. A dtype move of the model changes the float weight the codes are rounded
from and the activations' dtype; the tables stay float32.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..plan import LayerSpec
from ..runtime.clock import StepClock, compiling
from ..runtime.hooks import add_hook, held, hold, release, remove_hook
from .quantizer import fake_quant, quantize_codes

QUANT_HOOK = "cachequant.quant"
ACT, WQ, CODES, QDEC = "_cachequant_act", "_cachequant_w", "_cachequant_codes", "_cachequant_qdec"
_PREFIX = "_cachequant_"


class QuantHook(ModelHook):
    def __init__(self, spec: LayerSpec, act_bits: int, clock: StepClock, backend: Any):
        super().__init__()
        self.name = spec.name
        self.weight_bits = spec.weight_bits
        self.act_bits = act_bits
        self.split = spec.split
        self.has_dec = spec.dec
        self.clock = clock
        self.backend = backend
        """An object with ``forward(module, hook, x)`` (see cachequant.backends)."""
        self._wdq: tuple[tuple, torch.Tensor] | None = None
        self.weight_numel = 0
        """Elements of the layer's weight (kept: the float weight may be dropped after packing)."""

    def new_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(module, self, x)

    # -- the quantization, shared by every backend ----------------------------------------------
    def act_params(self, module: nn.Module) -> torch.Tensor:
        """(parts, 2) scale and zero point at the current position (a device gather)."""
        return held(module, ACT).index_select(2, self.clock.step_tensor())[..., 0]

    def quantize_input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized input (in float32 arithmetic, returned in ``x``'s dtype)."""
        sz = self.act_params(module)
        xf = x.float()
        if self.split is None:
            return fake_quant(xf, sz[0, 0], sz[0, 1], self.act_bits).to(x.dtype)
        c = self.split
        return torch.cat([fake_quant(xf[:, :c], sz[0, 0], sz[0, 1], self.act_bits),
                          fake_quant(xf[:, c:], sz[1, 0], sz[1, 1], self.act_bits)], dim=1).to(x.dtype)

    def weight_codes(self, module: nn.Module) -> torch.Tensor:
        """Integer weight codes (as float32): the plan's, or the weight rounded to nearest."""
        codes = held(module, CODES)
        if codes is not None:
            return codes.float()
        s, z = self._w_scale_zero(module)
        return quantize_codes(module.weight.detach().float(), s, z, self.weight_bits)

    def _w_scale_zero(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        wt = held(module, WQ)
        shape = (-1,) + (1,) * (module.weight.dim() - 1 if module.weight.dim() else 3)
        return wt[0].view(shape), wt[1].view(shape)

    def dequantized_weight(self, module: nn.Module) -> torch.Tensor:
        """The weight the quantized layer computes with, in the weight's dtype. Eager calls reuse
        it while the weight tensor is unchanged; a compiled graph recomputes it (no host reads)."""
        w = module.weight
        if not compiling():
            key = (w.data_ptr(), w._version, w.dtype, w.device, held(module, WQ).data_ptr())
            if self._wdq is not None and self._wdq[0] == key:
                return self._wdq[1]
        s, z = self._w_scale_zero(module)
        dq = ((self.weight_codes(module) - z) * s).to(w.dtype)
        if not compiling():
            self._wdq = (key, dq)
        return dq

    def dec_params(self, module: nn.Module) -> torch.Tensor:
        """(2, N) quantization-DEC slope and shift at the current position."""
        return held(module, QDEC).index_select(1, self.clock.step_tensor())[:, 0]

    def dec_active(self) -> bool:
        """Quantization-DEC applies at every position with the coefficients fitted there, except a
        cached position forced to run in full (its coefficients were fitted on a cached input)."""
        return self.has_dec and not self.clock.forced


def linear_op(module: nn.Module, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, w, bias)
    return torch.nn.functional.linear(x, w, bias)


def hold_layer_data(module: nn.Module, spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> None:
    """Attaches a layer's plan tensors to its module (validated shapes: :meth:`Plan.from_meta`)."""
    dev = module.weight.device
    n = module.weight.shape[0]
    w = tensors[f"w.{spec.name}"]
    if w.shape[1] != n:
        raise ValueError(f"plan tensor 'w.{spec.name}' has {w.shape[1]} channels, the layer has {n}")
    hold(module, ACT, tensors[f"act.{spec.name}"].to(dev))
    hold(module, WQ, w.to(dev))
    codes = tensors.get(f"w.{spec.name}.codes")
    if codes is not None:
        if tuple(codes.shape) != tuple(module.weight.shape):
            raise ValueError(f"plan codes for {spec.name} are {tuple(codes.shape)}, the weight is "
                             f"{tuple(module.weight.shape)}")
        hold(module, CODES, codes.to(dev))
    if spec.dec:
        hold(module, QDEC, tensors[f"qdec.{spec.name}"].to(dev))


def attach_quant_layers(model: nn.Module, specs: list[LayerSpec], act_bits: int, tensors: dict[str, torch.Tensor],
                        clock: StepClock, backend: Any) -> tuple[dict[str, QuantHook], list[Callable[[], None]]]:
    """Hooks every layer of ``specs`` with its data; returns {name: hook} and the undo callables."""
    hooks: dict[str, QuantHook] = {}
    undo: list[Callable[[], None]] = []
    for spec in specs:
        module = model.get_submodule(spec.name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"the plan quantizes {spec.name}, which is a {type(module).__name__} in this model")
        hold_layer_data(module, spec, tensors)
        hook = QuantHook(spec, act_bits, clock, backend)
        hook.weight_numel = module.weight.numel()
        add_hook(module, hook, QUANT_HOOK)
        hooks[spec.name] = hook
        undo.append(lambda m=module: (remove_hook(m, QUANT_HOOK), release(m, _PREFIX)))
    return hooks, undo


def quant_hooks(model: nn.Module) -> dict[str, tuple[nn.Module, QuantHook]]:
    """The quantized layers of a model: {name: (module, hook)}."""
    out = {}
    for name, m in model.named_modules():
        reg = getattr(m, "_diffusers_hook", None)
        hook = None if reg is None else reg.hooks.get(QUANT_HOOK)
        if hook is not None:
            out[name] = (m, hook)
    return out
