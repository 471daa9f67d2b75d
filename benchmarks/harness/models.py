"""The pipelines the speed studies time: SD 1.5's UNet + VAE (512², CFG 7.5, PNDM) and DiT-XL/2 +
VAE (256², CFG 4.0, DDPM / DDIM) built from their configs with random weights (speed does not
depend on weight values), or on small configs (``tiny``) for CPU smoke tests; their call
arguments; plans calibrated once per process; the Linears torchao's rows quantize."""

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


TINY = {  # --tiny: same code paths on small configs, for a CPU smoke test of this script
    "unet": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "vae": dict(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, sample_size=16),
    "dit": dict(num_attention_heads=2, attention_head_dim=16, num_layers=4, sample_size=8),
}


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
    else:
        tr = DiTTransformer2DModel(**{**DIT_XL2, **(TINY["dit"] if tiny else {})})
        vae = AutoencoderKL(**{**SD_VAE, "sample_size": 256, **(TINY["vae"] if tiny else {})})
        kw = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
        sched = DDPMScheduler(**kw) if sampler == "ddpm" else DDIMScheduler(**kw)
        pipe = DiTPipeline(transformer=tr, vae=vae, scheduler=sched)
    pipe = pipe.to(device, dt)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(model: str, batch: int, steps: int, tiny: bool = False) -> dict:
    """The arguments of ``cachequant.pipecall.call_pipeline`` for one timed pipeline run."""
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

    def __init__(self, folder: str | None = None):
        self.folder = Path(folder) if folder else None
        self.plans: dict = {}

    def get(self, pipe, model: str, steps: int, interval: int, wbits: int | None):
        """A plan with ``wbits``-bit weights and 8-bit activations (None: cache only)."""
        key = (interval, wbits)
        if key in self.plans:
            return self.plans[key]
        bits = wbits is not None
        cfg = cq.CacheQuantConfig(interval=interval, schedule="uniform", weight_bits=wbits,
                                  act_bits=8 if bits else None, quant_attention=False, num_calib_samples=1,
                                  calib_batch_size=1, dps_samples=1)
        path = None
        if self.folder is not None:
            name = f"{model}-{type(pipe.scheduler).__name__}-{steps}-n{interval}-w{wbits or 'fp'}.cqplan"
            path = self.folder / name
            if path.is_file():
                try:
                    plan = cq.load_plan(path)
                    plan.fingerprint.check(denoiser(pipe))
                    site = adapter_for(denoiser(pipe)).resolve_site(denoiser(pipe), cfg)
                    if plan.cache.site != site:
                        raise cq.PlanError(f"its cache site {plan.cache.site} is not this version's {site}")
                    plan.info["bench_plan_loaded"] = str(path)
                    self.plans[key] = plan
                    return plan
                except (cq.PlanError, cq.PlanMismatchError) as e:
                    print(f"stored plan {path} not used ({e}); calibrating", file=sys.stderr)
        inputs = {"prompts": ["a photo"]} if model == "sd15" else {"class_labels": [0]}
        t0 = time.perf_counter()
        plan = cq.calibrate(pipe, cfg, num_inference_steps=steps, progress=False, **inputs)
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
