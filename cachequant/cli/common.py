"""What the CLI's commands share: argument types, early checks of inputs and output paths, loading
a pipeline, kernel options, and quieting other libraries' load-time noise.

Every check here runs before any expensive work and raises :class:`UsageError` with one line that
says what was wrong and what to do; ``main`` prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path

from ..utils.io import IMAGE_FORMATS

BITS = {"w8a8": (8, 8), "w4a8": (4, 8), "fp": (None, None)}
IMAGE_SUFFIXES = tuple(IMAGE_FORMATS)  # what utils.io.save_grid writes


class UsageError(ValueError):
    """A bad command-line input, found before any work started."""


# -- argparse types ------------------------------------------------------------------------------


def _number(parse, ok, want: str):
    """An argparse type: ``parse(text)`` that must satisfy ``ok``; errors say ``expected {want}``."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value
    return convert


positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
unit_interval = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
positive_float = _number(float, lambda v: v > 0, "a number > 0")


def int_list(text: str) -> list[int]:
    try:
        values = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 0,3,7, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one whole number")
    return values


# -- paths -------------------------------------------------------------------------------------


def _writable_folder(folder: Path, option: str) -> None:
    probe = folder
    while not probe.exists():  # the nearest existing ancestor decides whether the folders can be made
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{option}: {probe} is a file, so {folder} cannot be a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: cannot write into {probe} (permission denied); choose another location")


def check_output_file(path: str, option: str, suffixes: tuple[str, ...]) -> Path:
    """``path`` can be written as one of ``suffixes``: not a folder, its folder writable."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option}: {p} is a folder; give a file name such as {p / ('out' + suffixes[0])}")
    if p.suffix.lower() not in suffixes:
        raise UsageError(f"{option}: {p.name} should end in {' or '.join(suffixes)}")
    _writable_folder(p.parent if str(p.parent) else Path("."), option)
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{option}: {p} exists and cannot be overwritten (permission denied)")
    return p


def check_output_folder(path: str, option: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option}: {p} is a file, not a folder")
    _writable_folder(p, option)
    return p


def check_input_file(path: str | None, option: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{option}: {p} " + ("is a folder, not a file" if p.is_dir() else "does not exist"))
    return p


def check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this PyTorch build sees no CUDA GPU; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    return device


# -- pipelines -----------------------------------------------------------------------------------


def add_weights_option(parser: argparse.ArgumentParser) -> None:
    """``--weights DIR``, as the CLI and the benchmark scripts that load a zoo model take it; the
    value goes to :func:`load_pipeline` / ``cq.zoo.load_pipeline(weights=...)``."""
    parser.add_argument("--weights", default=None,
                        help="with a shipped model: a folder of other weights for it (config.json + safetensors, "
                             "e.g. a retraining checkpoint in results/training/weights/, or cifar10-dit-1.6M there, "
                             "the first DiT) instead of the shipped ones")


def check_model(spec: str, weights: str | None = None) -> None:
    from ..models.tiny import TINY
    from ..zoo import MODELS, check_weights

    if weights is not None:
        if spec not in MODELS:
            raise UsageError(f"--weights replaces a shipped model's weights ({', '.join(MODELS)}); --model {spec} "
                             "is not one")
        try:
            check_weights(spec, weights)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--weights {e}") from None
    if spec in MODELS or spec in TINY:
        return
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--model {spec!r} is neither a built-in model ({', '.join(list(MODELS) + list(TINY))}) "
                         "nor a folder")
    if not (path / "model_index.json").is_file():
        raise UsageError(f"--model {spec}: not a saved diffusers pipeline (no model_index.json in it)")


def load_pipeline(spec: str, device: str, scheduler: str | None, weights: str | None = None):
    """A built-in model or a saved pipeline folder on ``device``; ``scheduler`` swaps the sampler
    (a built-in model gets its training noise schedule, a folder keeps its own); ``weights``
    replaces a shipped model's weights (``cq.zoo.load_pipeline``)."""
    from ..models.tiny import SCHEDULERS, TINY, unconditional_pipeline
    from ..zoo import MODELS, load_pipeline as load_zoo

    check_model(spec, weights)
    if spec in MODELS:
        from ..zoo import SAMPLERS

        if scheduler is not None and scheduler not in SAMPLERS[spec]:
            raise UsageError(f"--scheduler {scheduler}: {spec} was trained for {', '.join(SAMPLERS[spec])}; "
                             "choose one of those")
        pipe = load_zoo(spec, scheduler=scheduler, weights=weights)
    elif spec in TINY:
        pipe = TINY[spec]() if scheduler is None else TINY[spec](scheduler=scheduler)
    else:
        from diffusers import DiffusionPipeline

        quiet_libraries()
        pipe = DiffusionPipeline.from_pretrained(spec)
        if scheduler is not None:
            import diffusers

            new = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
            if type(pipe).__name__ in ("DDIMPipeline", "DDPMPipeline", "PNDMPipeline"):
                pipe = unconditional_pipeline(pipe.unet, new)
            else:
                pipe.scheduler = new
    if scheduler is not None and type(pipe.scheduler).__name__ != SCHEDULERS[scheduler]:
        raise UsageError(f"--scheduler {scheduler}: {type(pipe).__name__} runs {type(pipe.scheduler).__name__} "
                         "instead; choose a sampler this pipeline supports")
    return pipe.to(device)


def kernel_options(args):
    """The ``--backend`` / ``--kernel-attention`` / ``--drop-float-weights`` arguments as options."""
    from ..backends.options import KernelOptions

    return KernelOptions(backend=args.backend, attention=args.kernel_attention,
                         keep_float_weights=not args.drop_float_weights)


def quiet_libraries() -> None:
    """Other libraries' load-time messages that are noise on a command line: diffusers' and
    transformers' notes about optional packages, torchao's extension loading and PyTorch's pytree
    deprecation notes (torchao is imported by diffusers when installed). Real errors still surface."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree", "transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchao")
