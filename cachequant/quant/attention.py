"""8-bit attention matmuls (QKᵀ and softmax·V) for diffusers ``Attention`` modules.

The projections (to_q / to_k / to_v / to_out) are ordinary Linear layers and are quantized by
:mod:`cachequant.quant.layers`; this processor additionally quantizes the four operands of the two
batched matmuls, each with its own per-timestep range. Its float path reproduces diffusers'
``AttnProcessor2_0`` (same reshapes, norms, residual and rescale) so that with quantization off the
outputs agree with the stock processor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import Runtime
from .layers import ActQuant

OPERANDS = ("q", "k", "p", "v")


class QuantAttnProcessor(nn.Module):
    def __init__(self, act_bits: int, runtime: Runtime, per_step: bool = True):
        super().__init__()
        self.runtime = runtime
        self.quant = nn.ModuleDict({k: ActQuant(act_bits, runtime.num_calls, per_step) for k in OPERANDS})

    def _q(self, name: str, x: torch.Tensor) -> torch.Tensor:
        mode = self.runtime.quant_mode
        if mode == "observe":
            self.quant[name].observe(x, self.runtime.step, self.runtime.batch)
        elif mode == "quant":
            return self.quant[name](x, self.runtime.step)
        return x

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        return self.forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
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

        if self.runtime.quant_mode == "quant" and self.runtime.attn_sdpa:
            # Kernel backends: fused fp16/bf16 attention (faster than any 8-bit matmul pair here).
            hidden_states = torch.nn.functional.scaled_dot_product_attention(query, key, value, attention_mask)
            return self._finish(attn, hidden_states, batch_size, head_dim, query.dtype, input_ndim, residual,
                                channel, height, width)
        # Explicit attention so that both matmul operands can be quantized.
        scores = self._q("q", query) @ self._q("k", key).transpose(-1, -2) * (head_dim**-0.5)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1)
        hidden_states = self._q("p", probs) @ self._q("v", value)
        return self._finish(attn, hidden_states, batch_size, head_dim, query.dtype, input_ndim, residual,
                            channel, height, width)

    @staticmethod
    def _finish(attn, hidden_states, batch_size, head_dim, dtype, input_ndim, residual, channel, height, width):
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
