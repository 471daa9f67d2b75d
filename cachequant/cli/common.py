"""What the CLI's commands share: loading a pipeline, the bit-width choices, kernel options."""

from __future__ import annotations

from pathlib import Path

BITS = {"w8a8": (8, 8), "w4a8": (4, 8), "fp": (None, None)}


def load_pipeline(spec: str, device: str, scheduler: str | None):
    from ..models.tiny import TINY, make_scheduler
    from ..zoo import MODELS, load_pipeline as load_zoo

    if spec in MODELS:
        return load_zoo(spec, scheduler=scheduler or "ddim").to(device)
    if spec in TINY:
        pipe = TINY[spec]() if scheduler is None else TINY[spec](scheduler=scheduler)
    else:
        path = Path(spec)
        if not path.exists():
            raise SystemExit(f"error: --model {spec!r} is neither a built-in model "
                             f"({', '.join(list(MODELS) + list(TINY))}) nor a local diffusers pipeline folder")
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(path))
        if scheduler is not None:
            pipe.scheduler = make_scheduler(scheduler)
    return pipe.to(device)


def kernel_options(args):
    """The ``--backend`` / ``--kernel-attention`` / ``--drop-float-weights`` arguments as options."""
    from ..backends.options import KernelOptions

    return KernelOptions(backend=args.backend, attention=args.kernel_attention,
                         keep_float_weights=not args.drop_float_weights)
