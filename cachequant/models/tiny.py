"""Tiny diffusers pipelines built from configs in code (random weights, seeded, offline).

They exercise every adapter and sampler in the tests and in the README's demo without any
download. Quality numbers on them mean nothing; structure and step indexing are real.
"""

from __future__ import annotations

import torch


def unconditional_pipeline(unet, scheduler):
    """The diffusers pipeline that runs an unconditional ``UNet2DModel`` with ``scheduler`` correctly:
    ``DDIMPipeline`` for DDIM (it passes ``eta``, which only DDIM's ``step`` takes), ``PNDMPipeline``
    for PNDM (its ``step`` takes no generator), ``DDPMPipeline`` otherwise. None scales its inputs for
    Euler-type (sigma-space) schedulers, which are refused."""
    from diffusers import DDIMPipeline, DDPMPipeline, PNDMPipeline

    name = type(scheduler).__name__
    if getattr(scheduler, "init_noise_sigma", 1.0) != 1.0 or "Euler" in name or "Heun" in name:
        raise ValueError(f"{name} needs scaled model inputs, which the unconditional pipelines (DDIMPipeline, "
                         "DDPMPipeline) do not provide; use one of ddim, ddpm, pndm, dpm")
    cls = {"DDIMScheduler": DDIMPipeline, "PNDMScheduler": PNDMPipeline}.get(name, DDPMPipeline)
    pipe = cls(unet=unet, scheduler=scheduler)
    pipe.scheduler = scheduler  # DDIMPipeline's constructor would convert another scheduler to DDIM
    return pipe


def tiny_ddim_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """Unconditional ``UNet2DModel`` (3 levels, attention at the middle level) + DDIMPipeline (or
    DDPMPipeline for another sampler)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
    ).eval()
    pipe = unconditional_pipeline(unet, make_scheduler(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


SCHEDULERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
    "dpm": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}
"""Short names of the samplers the CLI and the tiny pipelines build."""


def make_scheduler(name: str, **overrides):
    """A scheduler of the given family with the linear-β DDPM training schedule (T = 1000)."""
    import diffusers

    classes = SCHEDULERS
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(classes)}")
    if name == "flow-euler":  # rectified flow: no β schedule, σ from 1 to 0 (shift 1 unless overridden)
        return getattr(diffusers, classes[name])(**{"num_train_timesteps": 1000, "shift": 1.0, **overrides})
    kw = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", steps_offset=1)
    if name == "pndm":
        kw["skip_prk_steps"] = True
    kw.update(overrides)
    return getattr(diffusers, classes[name])(**kw)


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2 / CLIP convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _tiny_clip_tokenizer():
    """A CLIP BPE tokenizer over single bytes (no merges): real CLIP tokenization, no download."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "pndm"):
    """Stable-Diffusion-shaped pipeline: tiny UNet2DConditionModel, CLIP text encoder and VAE."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    vae = _tiny_vae()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_scheduler(scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, scheduler: str = "euler"):
    """SDXL-shaped pipeline: a UNet with added text/time conditions, two CLIP text encoders (the second
    with a projection), a tiny VAE."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _tiny_clip_tokenizer()
    cfg = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg, projection_dim=32)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4, 8), norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        transformer_layers_per_block=(1, 1, 2),
    ).eval()
    vae = _tiny_vae()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=_tiny_clip_tokenizer(), unet=unet, scheduler=make_scheduler(scheduler),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit_pipeline(seed: int = 0, scheduler: str = "ddim", num_layers: int = 4):
    """Class-conditional ``DiTTransformer2DModel`` (learned σ) + tiny VAE in a DiTPipeline."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000,  # DiTPipeline hard-codes null class 1000
    ).eval()
    vae = _tiny_vae()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=make_scheduler(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY = {"tiny-ddim": tiny_ddim_pipeline, "tiny-sd": tiny_sd_pipeline, "tiny-sdxl": tiny_sdxl_pipeline,
        "tiny-dit": tiny_dit_pipeline}
