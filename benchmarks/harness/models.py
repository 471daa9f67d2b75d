"""The pipelines the speed studies time: SD 1.5's UNet + VAE (512², CFG 7.5, PNDM), DiT-XL/2 +
VAE (256², CFG 4.0, DDPM / DDIM), and the transformers alone of Flux.1-dev (1024², guidance
embedded, 28 flow-matching Euler steps) and SD3-medium (1024², CFG 7.0, 28 steps), built from their
configs with random weights (speed does not depend on weight values), or on small configs
(``tiny``) for CPU smoke tests; their call arguments; plans calibrated once per process; the Linears
torchao's rows quantize."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import cachequant as cq
from cachequant.models.adapters import adapter_for
from cachequant.pipecall import call_pipeline, denoiser_of

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
DIT_XL2 = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, patch_size=2,
    sample_size=32, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
)

FLUX_DEV = dict(  # FluxTransformer2DModel of FLUX.1-dev: 19 joint + 38 single-stream blocks, 11.9 B parameters
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
SD3_MEDIUM = dict(  # SD3Transformer2DModel of stable-diffusion-3-medium: 24 joint blocks, 2.0 B parameters
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
TRANSFORMER_ONLY = ("flux", "sd3")
"""Workloads timed without text encoders and VAE: random fixed text embeddings in, latents out."""
CFG_CALLS = {"sd15": 2, "dit-xl2": 2, "flux": 1, "sd3": 2}
"""Images per image in a model call: classifier-free guidance doubles the batch; Flux.1-dev embeds
its guidance instead."""
TEXT = {"flux": (512, 4096, 768), "sd3": (333, 4096, 2048)}
"""(tokens, width, pooled width) of the transformer-only workloads' random text embeddings: T5 (512
tokens) and CLIP-L pooled for Flux; CLIP-L + CLIP-G (77) and T5 (256) tokens, pooled 2048, for SD3."""


TINY = {  # --tiny: same code paths on small configs, for a CPU smoke test of this script
    "unet": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "vae": dict(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, sample_size=16),
    "dit": dict(num_attention_heads=2, attention_head_dim=16, num_layers=4, sample_size=8),
    "flux": dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
    "sd3": dict(sample_size=8, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                pos_embed_max_size=8),
}
TINY_TEXT = {"flux": (8, 32, 32), "sd3": (8, 32, 32)}


def build(model: str, sampler: str, device: str, tiny: bool = False):
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel,
                           PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel)

    torch.manual_seed(0)
    dt = torch.float16 if device == "cuda" else torch.float32
    cross = 32 if tiny else 768
    if model == "sd15":
        unet = UNet2DConditionModel(**{**SD15_UNET, **(TINY["unet"] if tiny else {})})
        vae = AutoencoderKL(**{**SD_VAE, **(TINY["vae"] if tiny else {})})
        sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        g = torch.Generator().manual_seed(1)
        emb = (torch.randn(1, 77, cross, generator=g) * 0.5).to(device, dt)
        neg = (torch.randn(1, 77, cross, generator=g) * 0.5).to(device, dt)

        def encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance, *a, **k):
            n = (len(prompt) if isinstance(prompt, list) else 1) * num_images_per_prompt
            return emb.expand(n, -1, -1), (neg.expand(n, -1, -1) if do_classifier_free_guidance else None)

        pipe.encode_prompt = encode_prompt
    elif model in TRANSFORMER_ONLY:
        pipe = transformer_pipeline(model, device, dt, tiny)
    else:
        tr = DiTTransformer2DModel(**{**DIT_XL2, **(TINY["dit"] if tiny else {})})
        vae = AutoencoderKL(**{**SD_VAE, "sample_size": 256, **(TINY["vae"] if tiny else {})})
        kw = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
        sched = DDPMScheduler(**kw) if sampler == "ddpm" else DDIMScheduler(**kw)
        pipe = DiTPipeline(transformer=tr, vae=vae, scheduler=sched)
    pipe = pipe.to(device, dt)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fuse_qkv(pipe) -> int:
    """Fuses each attention module's q, k, v projections into one ``to_qkv`` GEMM (k, v into one
    ``to_kv`` for cross-attention) as diffusers' ``fuse_qkv_projections()`` does; DiT's transformer
    has no such method, so its modules are fused one by one with the processor that method would
    set. Every row of a ``speed.py --fuse-qkv`` run then runs fused, fp16 included. Returns the
    number of fused projection layers."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    model = denoiser(pipe)
    if hasattr(model, "fuse_qkv_projections"):
        model.fuse_qkv_projections()
    else:
        for m in model.modules():
            if isinstance(m, Attention) and not m.fused_projections:
                m.fuse_projections()
                m.set_processor(FusedAttnProcessor2_0())
    return sum(n.endswith((".to_qkv", ".to_kv", ".to_added_qkv")) for n, _ in model.named_modules())


def _embeddings(model: str, device: str, dt, tiny: bool) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, width, pooled = (TINY_TEXT if tiny else TEXT)[model]
    g = torch.Generator().manual_seed(1)
    emb = (torch.randn(1, tokens, width, generator=g) * 0.5).to(device, dt)
    return emb, (torch.randn(1, pooled, generator=g) * 0.5).to(device, dt)


def transformer_pipeline(model: str, device: str, dt, tiny: bool):
    """FluxPipeline / StableDiffusion3Pipeline with no text encoders and no VAE: ``encode_prompt``
    returns fixed random embeddings of the real shapes (the negative ones for SD3's CFG drawn
    separately), and runs stop at the latents. The transformer is built on ``device`` in ``dt``
    (Flux.1-dev's 11.9 B parameters would take minutes to initialise on the CPU)."""
    from diffusers import (FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)

    cls, cfg = (FluxTransformer2DModel, FLUX_DEV) if model == "flux" else (SD3Transformer2DModel, SD3_MEDIUM)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(device):
            tr = cls(**{**cfg, **(TINY[model] if tiny else {})}).eval()
    finally:
        torch.set_default_dtype(old)
    emb, pool = _embeddings(model, device, dt, tiny)
    if model == "flux":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=tr)

        def encode_prompt(prompt, prompt_2=None, device=None, num_images_per_prompt=1, *a, **k):
            n = (len(prompt) if isinstance(prompt, list) else 1) * num_images_per_prompt
            ids = torch.zeros(emb.shape[1], 3, device=emb.device, dtype=emb.dtype)
            return emb.expand(n, -1, -1), pool.expand(n, -1), ids
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                                        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        neg, neg_pool = emb.flip(1), pool.flip(1)

        def encode_prompt(prompt, prompt_2=None, prompt_3=None, device=None, num_images_per_prompt=1,
                          do_classifier_free_guidance=True, *a, **k):
            n = (len(prompt) if isinstance(prompt, list) else 1) * num_images_per_prompt
            negs = (neg.expand(n, -1, -1), neg_pool.expand(n, -1)) if do_classifier_free_guidance else (None, None)
            return emb.expand(n, -1, -1), negs[0], pool.expand(n, -1), negs[1]

    pipe.encode_prompt = encode_prompt
    return pipe


def call_kwargs(model: str, batch: int, steps: int, tiny: bool = False) -> dict:
    """The arguments of ``cachequant.pipecall.call_pipeline`` for one timed pipeline run."""
    if model in TRANSFORMER_ONLY:
        side = 32 if tiny else 1024
        return dict(batch=["a photo"] * batch, num_inference_steps=steps, height=side, width=side,
                    guidance_scale=3.5 if model == "flux" else 7.0, output_type="latent")
    if model == "sd15":
        side = 16 if tiny else 512
        return dict(batch=["a photo"] * batch, num_inference_steps=steps, guidance_scale=7.5, height=side,
                    width=side, output_type="np")
    return dict(batch=list(range(batch)), num_inference_steps=steps, guidance_scale=4.0, output_type="np")


class PlanCache:
    """Plans calibrated once per process, and with ``--plan-dir`` kept on disk for the next device
    call of a warm machine: a 250-step DiT-XL/2 plan takes ~70 s to calibrate on an H200. A stored
    plan is used only if it was calibrated for this very model (architecture and weights SHA-256;
    ``build`` seeds the random weights), else it is calibrated again."""

    def __init__(self, folder: str | None = None, tiny: bool = False, tag: str = "", quant_io: bool = False):
        self.folder = Path(folder) if folder else None
        self.quant_io = quant_io  # CacheQuantConfig.quant_io: first and last layers quantized too
        self.tiny = tiny
        self.tag = f"-{tag}" if tag else ""  # a fused model's plans beside the unfused model's
        self.plans: dict = {}

    def get(self, pipe, model: str, steps: int, interval: int, wbits: int | None):
        """A plan with ``wbits``-bit weights and 8-bit activations (None: cache only)."""
        key = (interval, wbits)
        if key in self.plans:
            return self.plans[key]
        bits = wbits is not None
        cfg = cq.CacheQuantConfig(interval=interval, schedule="uniform", weight_bits=wbits,
                                  act_bits=8 if bits else None, quant_attention=False, num_calib_samples=1,
                                  calib_batch_size=1, dps_samples=1, quant_io=self.quant_io and bits)
        path = None
        if self.folder is not None:
            io = "-io" if self.quant_io and bits else ""
            name = f"{model}{self.tag}-{type(pipe.scheduler).__name__}-{steps}-n{interval}-w{wbits or 'fp'}{io}.cqplan"
            path = self.folder / name
            if path.is_file():
                try:
                    plan = cq.load_plan(path)
                    plan.fingerprint.check(denoiser(pipe))
                    # a plan without caching (interval 1) has no cache site
                    site = adapter_for(denoiser(pipe)).resolve_site(denoiser(pipe), cfg) if interval > 1 else {}
                    if plan.cache.site != site:
                        raise cq.PlanError(f"its cache site {plan.cache.site} is not this version's {site}")
                    if bits and plan.config.quant_io != cfg.quant_io:  # stored before quant_io existed
                        raise cq.PlanError(f"it has quant_io={plan.config.quant_io}, this run {cfg.quant_io}")
                    plan.info["bench_plan_loaded"] = str(path)
                    self.plans[key] = plan
                    return plan
                except (cq.PlanError, cq.PlanMismatchError) as e:
                    print(f"stored plan {path} not used ({e}); calibrating", file=sys.stderr)
        inputs = {"class_labels": [0]} if model.startswith("dit") else {"prompts": ["a photo"]}
        kw = {k: v for k, v in call_kwargs(model, 1, steps, self.tiny).items()
              if k in ("height", "width", "guidance_scale")} if model in TRANSFORMER_ONLY else {}
        t0 = time.perf_counter()
        plan = cq.calibrate(pipe, cfg, num_inference_steps=steps, progress=False, pipeline_kwargs=kw, **inputs)
        plan.info["bench_calib_s"] = time.perf_counter() - t0
        if path is not None:
            plan.save(path)
        self.plans[key] = plan
        return plan


def denoiser(pipe):
    return denoiser_of(pipe)[1]


def set_denoiser(pipe, m) -> None:
    setattr(pipe, denoiser_of(pipe)[0], m)


TORCHAO_MIN_ROWS = 17  # torch._int_mm, under torchao's int8 dynamic path, refuses M ≤ 16


def linear_rows(pipe, model: str, batch: int, tiny: bool) -> dict[str, int]:
    """Rows (M) each ``nn.Linear`` of the denoiser sees in a model call at this batch, from one short
    run (the time-embedding MLPs and adaLN projections see only the CFG batch, e.g. M = 2)."""
    rows: dict[str, int] = {}

    def seen(name: str, x: torch.Tensor) -> None:
        rows[name] = max(rows.get(name, 0), x.numel() // x.shape[-1])

    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen(n, a[0]))
             for n, m in denoiser(pipe).named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            call_pipeline(pipe, **{**call_kwargs(model, batch, 2, tiny), "output_type": "latent"})
    finally:
        for h in hooks:
            h.remove()
    return rows


def torchao_filter(pipe, model: str, batch: int, tiny: bool):
    """(filter_fn for torchao's ``quantize_``, what it keeps in fp16): Linears with more than 16 rows."""
    rows = linear_rows(pipe, model, batch, tiny)
    small = sorted(n for n, r in rows.items() if r < TORCHAO_MIN_ROWS)
    mods = dict(denoiser(pipe).named_modules())
    macs = {n: r * mods[n].in_features * mods[n].out_features for n, r in rows.items()}
    info = {"torchao_linears_quantized": len(rows) - len(small), "torchao_linears_kept_fp16": len(small),
            "torchao_kept_examples": small[:4],
            "torchao_kept_linear_mac_share": sum(macs[n] for n in small) / max(1, sum(macs.values()))}
    return (lambda m, fqn: isinstance(m, torch.nn.Linear) and rows.get(fqn, 0) >= TORCHAO_MIN_ROWS), info
