"""The hooks calibration installs while the model runs in float, and removes afterwards:
activation-range observers on the quantized layers and attention operands, GPTQ's input
Hessians, and quantization-DEC statistics on the first consumers of the cached feature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..correction.quant_dec import QuantDecStats
from ..plan import ATTENTION_OPERANDS, LayerSpec
from ..quant.attention import quant_processor, set_processor
from ..quant.layer import QuantHook, linear_op
from ..quant.observers import RangeObserver
from ..runtime.clock import StepClock


@dataclass
class ObserveState:
    batch: int = 0
    """Global index of the calibration batch being run (orders per-batch statistics)."""
    enabled: bool = True


def attach_range_observers(model: nn.Module, specs: list[LayerSpec], bits: int, clock: StepClock,
                           state: ObserveState) -> tuple[dict[str, list[RangeObserver]], list[Callable[[], None]]]:
    """One observer per input part of every layer (a concatenated input has two)."""
    observers: dict[str, list[RangeObserver]] = {}
    undo = []
    for spec in specs:
        module = model.get_submodule(spec.name)
        obs = observers[spec.name] = [RangeObserver(bits) for _ in range(1 if spec.split is None else 2)]

        def pre(mod, args, obs=obs, c=spec.split):
            if not state.enabled:
                return
            x = args[0]
            parts = [x] if c is None else [x[:, :c], x[:, c:]]
            for o, p in zip(obs, parts):
                o.observe(p, clock.position, state.batch, clock.branch)

        undo.append(module.register_forward_pre_hook(pre).remove)
    return observers, undo


def attach_attention_observers(model: nn.Module, names: list[str], bits: int, clock: StepClock,
                               state: ObserveState) -> tuple[dict[str, dict[str, RangeObserver]], list]:
    """The 8-bit attention processor with observing operands (the arithmetic stays float)."""
    observers: dict[str, dict[str, RangeObserver]] = {}
    undo = []
    for name in names:
        obs = observers[name] = {k: RangeObserver(bits) for k in ATTENTION_OPERANDS}

        def operand(k, x, obs=obs):
            if state.enabled:
                obs[k].observe(x, clock.position, state.batch, clock.branch)
            return x

        module = model.get_submodule(name)
        undo.append(set_processor(module, quant_processor(module, operand)))
    return observers, undo


def attach_hessians(model: nn.Module, specs: list[LayerSpec], seed: int, max_bytes: int) -> tuple[dict, list]:
    """Accumulates every layer's input Hessian (X Xᵀ) for GPTQ. H is K × K per layer (K = input
    channels × kernel taps), kept in float64 on the layer's device; a model whose Hessians together
    exceed ``max_bytes`` is refused rather than run out of memory."""
    from ..quant.gptq import HessianAccumulator

    need = sum(model.get_submodule(s.name).weight[0].numel() ** 2 * 8 for s in specs)
    if need > max_bytes:
        raise ValueError(f"weight_rounding='gptq' would hold {need / 2**30:.1f} GiB of input Hessians for this model "
                         f"(limit {max_bytes / 2**30:.0f} GiB); use weight_rounding='nearest'")
    acc, undo = {}, []
    for i, spec in enumerate(specs):
        module = model.get_submodule(spec.name)
        acc[spec.name] = HessianAccumulator(module, seed=seed * 7919 + i)
        undo.append(module.register_forward_pre_hook(lambda mod, a, a_=acc[spec.name]: a_.add(a[0])).remove)
    return acc, undo


def attach_quant_dec_stats(model: nn.Module, consumers: dict[str, int], hooks: dict[str, QuantHook], clock: StepClock,
                           state: ObserveState) -> tuple[dict[str, dict[int, QuantDecStats]], list]:
    """Per consumer layer and batch, the least-squares statistics of Eq. 9 on the cached slice:
    O_c = W_c·X_c (float) against O_cq = Ŵ_c·Q(X_c) (quantized), per position and output channel."""
    stats: dict[str, dict[int, QuantDecStats]] = {}
    undo = []
    for name, c in consumers.items():
        module, hook = model.get_submodule(name), hooks[name]
        per_batch = stats[name] = {}

        def pre(mod, args, hook=hook, per_batch=per_batch, c=c):
            x = args[0]
            xq = hook.quantize_input(mod, x)
            with torch.no_grad():
                target = linear_op(mod, x[:, :c], mod.weight[:, :c], None)
                pred = linear_op(mod, xq[:, :c], hook.dequantized_weight(mod)[:, :c], None)
            if state.batch not in per_batch:
                per_batch[state.batch] = QuantDecStats(clock.num_positions, mod.weight.shape[0])
            per_batch[state.batch].update(clock.position, pred, target)

        undo.append(module.register_forward_pre_hook(pre).remove)
    return stats, undo
