"""Pretrained models shipped inside the package (offline): ``cachequant.zoo.load_pipeline(name)``.

Model cards: ``cachequant/zoo/README.md``; training script: ``scripts/train_cifar.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS = Path(__file__).parent / "weights"
MODELS = {"cifar10-unet": "UNet2DModel", "cifar10-dit": "DiTTransformer2DModel"}


def available() -> list[str]:
    return sorted(MODELS)


def load_pipeline(name: str, scheduler: str = "ddim", dtype: torch.dtype = torch.float32):
    """A ready diffusers pipeline: ``cifar10-unet`` -> DDIMPipeline (DDPMPipeline for another
    sampler), ``cifar10-dit`` -> :class:`DiTPixelPipeline` (class labels, CFG)."""
    import diffusers

    from ..models.tiny import make_scheduler, unconditional_pipeline

    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(available())}")
    folder = WEIGHTS / name
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} has no weights; reinstall cachequant")
    model = getattr(diffusers, MODELS[name]).from_pretrained(folder, torch_dtype=dtype).eval()
    sched = make_scheduler(scheduler, steps_offset=0) if scheduler != "pndm" else make_scheduler(scheduler)
    if name == "cifar10-unet":
        pipe = unconditional_pipeline(model, sched)
    else:
        from .pipelines import DiTPixelPipeline

        pipe = DiTPixelPipeline(transformer=model, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe
