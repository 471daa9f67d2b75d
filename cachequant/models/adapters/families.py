"""Built-in descriptions of the flow-matching transformer families: Flux, SD3, Sana, Wan.

Each is a :class:`~cachequant.models.adapters.transformer.TransformerDescription`; what the
fields mean, and how a user describes another family, is said there and in
``docs/architecture.md``. The modulation layers kept in float are the adaLN projections of the
blocks and of the output norm, and the timestep / guidance / pooled-text embedders that feed them.
"""

from __future__ import annotations

from .transformer import BlockStack, TransformerDescription

_JOINT = BlockStack("transformer_blocks", streams=("hidden_states", "encoder_hidden_states"),
                    returns=("encoder_hidden_states", "hidden_states"))
"""Flux's and SD3's joint (MMDiT) blocks: image and text tokens, returned as (text, image)."""

FLUX = TransformerDescription(
    name="flux", classes=("FluxTransformer2DModel",),
    # single-stream blocks concatenate the text tokens in front of the image tokens inside the
    # block and return both streams again, so both lists carry the same two streams
    stacks=(_JOINT, BlockStack("single_transformer_blocks", streams=("hidden_states", "encoder_hidden_states"),
                               returns=("encoder_hidden_states", "hidden_states"))),
    conditioning=("temb", "image_rotary_emb"),
    first_layers=("x_embedder", "context_embedder"), last_layers=("proj_out",),
    float_layers=("time_text_embed.*", "transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm1_context.linear",
                  "single_transformer_blocks.*.norm.linear", "norm_out.linear"),
)

SD3 = TransformerDescription(
    name="sd3", classes=("SD3Transformer2DModel",),
    # the last block is text-pre-only: it returns None for the text stream (a span ending there
    # caches the image stream only)
    stacks=(_JOINT,),
    conditioning=("temb",),
    first_layers=("pos_embed.proj", "context_embedder"), last_layers=("proj_out",),
    float_layers=("time_text_embed.*", "transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm1_context.linear",
                  "norm_out.linear"),
)

SANA = TransformerDescription(
    name="sana", classes=("SanaTransformer2DModel",),
    stacks=(BlockStack("transformer_blocks"),),
    conditioning=("timestep", "encoder_hidden_states"),
    first_layers=("patch_embed.proj",), last_layers=("proj_out",),
    float_layers=("time_embed.*",),
)

WAN = TransformerDescription(
    name="wan", classes=("WanTransformer3DModel",),
    stacks=(BlockStack("blocks"),),
    conditioning=("temb", "encoder_hidden_states", "rotary_emb"),
    # the patch embedding is a Conv3d, which stays in float
    first_layers=(), last_layers=("proj_out",),
    float_layers=("condition_embedder.time_embedder.*", "condition_embedder.time_proj"),
)

FAMILIES = (FLUX, SD3, SANA, WAN)
