"""Tiny Flux, SD3, Sana and Wan pipelines built from configs in code (random weights, offline).

The real diffusers pipelines (``FluxPipeline``, ``StableDiffusion3Pipeline``, ``SanaPipeline``,
``WanPipeline``) with their real text encoders and VAEs, shrunk to one or two layers and a few
dozen channels so that a whole calibration runs in seconds on a CPU. Tokenizers are byte-level
BPE vocabularies without merges, made in code: no tokenizer file is downloaded. Quality means
nothing here; structure, conditioning paths and the flow-matching samplers are the real ones.

Each builder returns ``(pipe, call_kwargs)``: the keyword arguments every call needs at this size
(the resolution, a short text length, no resolution binning), to pass to the pipeline and to
``cq.calibrate(..., pipeline_kwargs=call_kwargs)``.
"""

from __future__ import annotations

from typing import Any

import torch

from .tiny import _byte_chars, _tiny_clip_tokenizer

_TEXT_LEN = 16


def tiny_t5_tokenizer(max_length: int = 64, pad: str = "<pad>", eos: str = "</s>", bos: str | None = None):
    """A fast tokenizer over single bytes (T5 / UMT5 / Gemma stand-in): every prompt is tokenized
    differently, ids stay below 600 and an end-of-sequence token closes each text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [pad, eos, "<unk>"] + ([bos] if bos else [])
    vocab = {s: i for i, s in enumerate(specials)}
    for c in _byte_chars():
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    single = (f"{bos} " if bos else "") + f"$A {eos}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(s, vocab[s]) for s in specials if s in (eos, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token="<unk>",
                                   bos_token=bos, model_max_length=max_length)


def _clip_config(tokenizer, hidden: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.eos_token_id, **extra)


def _t5(tokenizer, d_model: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg = dict(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
               relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return (UMT5EncoderModel(UMT5Config(**cfg)) if umt5 else T5EncoderModel(T5Config(**cfg))).eval()


def _vae_kl(latent_channels: int = 4, flux: bool = False):
    from diffusers import AutoencoderKL

    extra = dict(shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False) if flux else {}
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, **extra).eval()


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, num_layers: int = 1, num_single_layers: int = 2) -> tuple[Any, dict]:
    """``FluxPipeline``: dual-stream then single-stream blocks, FlowMatchEuler with dynamic shifting;
    16×16 images, 8×8 latents (4×4 packed tokens)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok = _tiny_clip_tokenizer()
    tok2 = tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                max_image_seq_len=64, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae_kl(4, flux=True), text_encoder=CLIPTextModel(_clip_config(tok, 32)).eval(),
                        tokenizer=tok, text_encoder_2=_t5(tok2), tokenizer_2=tok2, transformer=transformer)
    return _quiet(pipe), dict(height=16, width=16, max_sequence_length=_TEXT_LEN, guidance_scale=1.0)


def tiny_sd3_pipeline(seed: int = 0, num_layers: int = 3) -> tuple[Any, dict]:
    """``StableDiffusion3Pipeline``: MMDiT joint blocks (the last one text-pre-only), two CLIP
    encoders with projection and a T5 encoder, FlowMatchEuler (shift 3); 8×8 latents."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, tok2, tok3 = _tiny_clip_tokenizer(), _tiny_clip_tokenizer(), tiny_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=8).eval()
    enc = lambda t: CLIPTextModelWithProjection(_clip_config(t, 16, projection_dim=16)).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae_kl(4, flux=True),
        text_encoder=enc(tok), tokenizer=tok, text_encoder_2=enc(tok2), tokenizer_2=tok2,
        text_encoder_3=_t5(tok3), tokenizer_3=tok3)
    return _quiet(pipe), dict(height=16, width=16, max_sequence_length=_TEXT_LEN, guidance_scale=2.0)


def tiny_sana_pipeline(seed: int = 0, num_layers: int = 3) -> tuple[Any, dict]:
    """``SanaPipeline``: linear-attention blocks with cross-attention to Gemma-2 features and a
    conv (GLUMBConv) feed-forward, DC-AE, FlowMatchEuler; 32×32 images (Sana needs multiples of 32),
    8×8 latents."""
    from diffusers import (
        AutoencoderDC,
        FlowMatchEulerDiscreteScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tok = tiny_t5_tokenizer(pad="<pad>", eos="<eos>", bos="<bos>")
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=32, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=num_layers,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        sample_size=8, patch_size=1).eval()
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8), encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)), encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407).eval()
    pipe = SanaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return _quiet(pipe), dict(height=32, width=32, max_sequence_length=_TEXT_LEN, use_resolution_binning=False,
                              complex_human_instruction=None, guidance_scale=2.0)


def tiny_wan_pipeline(seed: int = 0, num_layers: int = 3) -> tuple[Any, dict]:
    """``WanPipeline`` (text-to-video): Wan blocks with self- and cross-attention, UMT5 encoder,
    Wan VAE, FlowMatchEuler (shift 3); 5 frames of 64×64 give 2×8×8 latents. The call kwargs use
    guidance scale 1 (one transformer call per step, the cheapest); with ``guidance_scale > 1``
    WanPipeline calls the transformer twice per step (conditional, then unconditional), which
    cachequant supports with one cache per branch: calibrate with the guidance you run
    (``tests/test_families.py`` runs it at 2)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(seed)
    tok = tiny_t5_tokenizer()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=48, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=tok, text_encoder=_t5(tok, umt5=True), vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return _quiet(pipe), dict(height=64, width=64, num_frames=5, max_sequence_length=_TEXT_LEN, guidance_scale=1.0)


TINY_FAMILIES = {"tiny-flux": tiny_flux_pipeline, "tiny-sd3": tiny_sd3_pipeline, "tiny-sana": tiny_sana_pipeline,
                 "tiny-wan": tiny_wan_pipeline}
