"""Pretrained models shipped inside the package (offline): ``cachequant.zoo.load_pipeline(name)``.

Model cards: ``cachequant/zoo/README.md``; training script: ``scripts/train_cifar.py``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

WEIGHTS = Path(__file__).parent / "weights"
MODELS = {"cifar10-unet": "UNet2DModel", "cifar10-dit": "DiTTransformer2DModel",
          "cifar10-mmdit": "SD3Transformer2DModel"}
SAMPLERS = {"cifar10-unet": ("ddim", "ddpm", "pndm", "dpm", "euler"),
            "cifar10-dit": ("ddim", "ddpm", "pndm", "dpm", "euler"),
            "cifar10-mmdit": ("flow-euler",)}
"""The samplers each model was trained for, the first its default: the ε-prediction models take the
DDPM-family samplers of their training β schedule, the flow-matching MMDiT its Euler sampler."""


FIRST_WEIGHTS_SHA1 = {"cifar10-unet": "756200662b4bcc779ee598efb2041f8832a965ba",
                      "cifar10-dit": "16749184908bd028b20a6bf68993798bb2987853",
                      "cifar10-mmdit": "ac42129b051aac32bc0b772c9a6a66cf92f602c9"}
"""SHA-1 of the weights file each model first shipped with. Records of earlier runs (the
benchmarks' sample keys, ``cachequant evaluate``'s run) name no weights and meant these;
:func:`weights_record` names the weights only when they differ, so those records stay valid and a
run on newer shipped weights is never taken for one of them. The first ``cifar10-dit`` (1.6 M
training images) is kept in ``results/training/weights/cifar10-dit-1.6M``."""


def available() -> list[str]:
    return sorted(MODELS)


def check_weights(name: str, folder: str | Path) -> Path:
    """``folder`` as weights for the zoo model ``name``: a diffusers model folder (``config.json``
    and ``diffusion_pytorch_model.safetensors``, as ``save_pretrained`` and ``scripts/train_cifar.py
    --export`` write them) of the model's class. Raises ``FileNotFoundError`` / ``ValueError``
    saying what is wrong."""
    import json

    path = Path(folder)
    if not (path / "config.json").is_file() or not (path / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: expected config.json and diffusion_pytorch_model.safetensors (a folder "
                                "written by save_pretrained or scripts/train_cifar.py --export)")
    cls = json.loads((path / "config.json").read_text()).get("_class_name")
    if cls != MODELS[name]:
        raise ValueError(f"{path} holds a {cls}, but {name} is a {MODELS[name]}")
    return path


@functools.lru_cache(maxsize=16)
def _file_sha1(path: str, mtime_ns: int) -> str:  # keyed by mtime too: a rewritten file is hashed again
    from ..utils.io import file_sha1

    return file_sha1(path)


def weights_sha1(name: str, weights: str | Path | None = None) -> str:
    """SHA-1 of the weights file ``load_pipeline(name, weights=weights)`` loads."""
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(available())}")
    path = (check_weights(name, weights) if weights is not None else WEIGHTS / name) / \
        "diffusion_pytorch_model.safetensors"
    return _file_sha1(str(path.resolve()), path.stat().st_mtime_ns)


def weights_record(name: str, weights: str | Path | None = None) -> dict[str, str]:
    """What a run record adds to say which weights of zoo model ``name`` it used:
    ``{"weights_sha1": ...}``, or nothing for the weights it first shipped with
    (:data:`FIRST_WEIGHTS_SHA1`: earlier records meant those). Models outside the zoo (tiny
    models, saved pipeline folders) add nothing: they have no shipped weights to tell apart."""
    if name not in MODELS:
        return {}
    sha = weights_sha1(name, weights)
    return {} if sha == FIRST_WEIGHTS_SHA1.get(name) else {"weights_sha1": sha}


def load_pipeline(name: str, scheduler: str | None = None, dtype: torch.dtype = torch.float32,
                  weights: str | Path | None = None):
    """A ready diffusers pipeline: ``cifar10-unet`` -> DDIMPipeline (DDPMPipeline for another
    sampler), ``cifar10-dit`` -> :class:`DiTPixelPipeline`, ``cifar10-mmdit`` ->
    :class:`MMDiTPixelPipeline` (both class labels, CFG). ``scheduler``: one of ``SAMPLERS[name]``
    (default: the first). ``weights``: a folder of other weights for the same model (e.g. a
    retraining checkpoint in ``results/training/weights/``) instead of the shipped ones; the
    pipeline, sampler and conditioning stay the zoo model's."""
    import diffusers

    from ..models.tiny import make_scheduler, unconditional_pipeline

    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(available())}")
    scheduler = scheduler or SAMPLERS[name][0]
    if scheduler not in SAMPLERS[name]:
        raise ValueError(f"{name} was trained for the {', '.join(SAMPLERS[name])} sampler(s), not {scheduler!r}")
    folder = check_weights(name, weights) if weights is not None else WEIGHTS / name
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} has no weights; reinstall cachequant")
    model = getattr(diffusers, MODELS[name]).from_pretrained(folder, torch_dtype=dtype).eval()
    sched = make_scheduler(scheduler, steps_offset=0) if scheduler not in ("pndm", "flow-euler") \
        else make_scheduler(scheduler)
    if name == "cifar10-unet":
        pipe = unconditional_pipeline(model, sched)
    elif name == "cifar10-mmdit":
        from .pipelines import MMDiTPixelPipeline

        pipe = MMDiTPixelPipeline(transformer=model, scheduler=sched)
    else:
        from .pipelines import DiTPixelPipeline

        pipe = DiTPixelPipeline(transformer=model, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe
