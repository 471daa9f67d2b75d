"""8-bit attention matmuls (QKᵀ and softmax·V) for diffusers attention modules.

The projections (to_q / to_k / to_v / to_out) are ordinary Linear layers, quantized by their own
hooks; this processor computes attention explicitly so that the four operands of its two matmuls
pass through ``operand(name, x)``: a per-position fake quantizer when accelerated, a range
observer during calibration. With an identity ``operand`` it reproduces diffusers'
``AttnProcessor2_0`` (same reshapes, norms, residual and rescale). It is a plain object, not a
module, so nothing of it enters the model's ``state_dict``. The transformer families' own processors
(Flux, SD3, Sana's cross-attention, Wan) are wrapped instead (:mod:`cachequant.quant.sdpa`);
:func:`quant_processor` picks one or the other.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..plan import ATTENTION_OPERANDS as OPERANDS
from ..runtime.hooks import held, hold, release
from .quantizer import E4M3_MAX, e4m3_round, fake_quant
from .sdpa import explicit_attention, sdpa_operand_processor
from .specs import STOCK_PROCESSORS, attention_support

__all__ = ["OPERANDS", "QuantAttnProcessor", "attach_quant_attention", "quant_processor", "set_processor"]


class QuantAttnProcessor:
    def __init__(self, operand: Callable[[str, torch.Tensor], torch.Tensor]):
        self.operand = operand

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        channel = height = width = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = explicit_attention(self.operand, query, key, value, attention_mask, scale=head_dim**-0.5,
                                           max_scores=getattr(self.operand, "max_scores", None))

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def quant_processor(module, operand: Callable[[str, torch.Tensor], torch.Tensor]):
    """The 8-bit attention processor for ``module`` with its current processor: diffusers' stock
    processor re-implemented, a family's processor wrapped."""
    why = attention_support(module)
    if why is not None:
        raise ValueError(f"the attention matmuls of this {type(module).__name__} cannot be quantized: {why}")
    if type(module.processor).__name__ in STOCK_PROCESSORS:
        return QuantAttnProcessor(operand)
    return sdpa_operand_processor(module.processor, operand)


ATTN = "_cachequant_attn"


def e4m3_probabilities(p: torch.Tensor) -> torch.Tensor:
    """The softmax probabilities on e4m3 at the fixed scale 1/448 (P ∈ [0, 1] onto e4m3's
    [0, 448]): ``CacheQuantConfig.attention_probs = "e4m3"``."""
    return e4m3_round(p.float(), 1.0 / E4M3_MAX).to(p.dtype)


class _OperandQuant:
    """The accelerated operand function: fake-quantize operand ``k`` with its range at the
    current position, read from the (4, 2, T) table held on the attention module; with
    ``probs="e4m3"`` the softmax probabilities ``p`` are rounded to e4m3 at the fixed scale 1/448
    instead (``CacheQuantConfig.attention_probs``)."""

    max_scores = 1 << 28
    """Score elements computed at once (``explicit_attention``): 512 MiB of fp16 scores. The
    quantizer is elementwise with a static range, so blocking over queries changes nothing."""

    def __init__(self, module, clock, bits: int, probs: str = "uniform"):
        self.module, self.clock, self.bits, self.probs = module, clock, bits, probs

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "p" and self.probs == "e4m3":
            return e4m3_probabilities(x)
        sz = held(self.module, ATTN)[OPERANDS.index(name)].index_select(1, self.clock.step_tensor())[:, 0]
        return fake_quant(x.float(), sz[0], sz[1], self.bits).to(x.dtype)


def set_processor(module, processor) -> Callable[[], None]:
    """Installs ``processor`` on an ``Attention`` module; the undo puts the previous one back only
    if ours is still there (a processor the user set since is theirs to keep)."""
    previous = module.processor
    module.set_processor(processor)

    def undo():
        if module.processor is processor:
            module.set_processor(previous)
    return undo


def attach_quant_attention(model, names, tensors: dict[str, torch.Tensor], clock, bits: int,
                           probs: str = "uniform") -> tuple[dict, list]:
    """8-bit attention on the named modules (``probs``: the grid of the softmax probabilities, see
    ``CacheQuantConfig.attention_probs``); returns {name: processor} and the undo callables."""
    procs, undo = {}, []
    for name in names:
        module = model.get_submodule(name)
        dev = next(module.parameters()).device
        hold(module, ATTN, tensors[f"attn.{name}"].to(dev))
        procs[name] = quant_processor(module, _OperandQuant(module, clock, bits, probs))
        undo.append(set_processor(module, procs[name]))
        undo.append(lambda m=module: release(m, ATTN))
    return procs, undo
