"""How to call a diffusers pipeline: its denoiser, what conditions it, one batch of samples.

The one place that knows these conventions; calibration, the CLI, the metrics and the benchmarks
call pipelines through it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

DENOISER_ATTRS = ("unet", "transformer")


def unwrap(model: nn.Module) -> nn.Module:
    """The module behind ``torch.compile(model)`` (an ``OptimizedModule``), or ``model`` itself."""
    return getattr(model, "_orig_mod", model)


def denoiser_of(pipe: Any) -> tuple[str, nn.Module]:
    """The pipeline component called once per step (``unet`` or ``transformer``), unwrapped from
    ``torch.compile`` so that ``pipe.unet = torch.compile(pipe.unet)`` still finds the model."""
    for attr in DENOISER_ATTRS:
        m = getattr(pipe, attr, None)
        if isinstance(m, nn.Module):
            return attr, unwrap(m)
    raise TypeError(f"{type(pipe).__name__} has no `unet` or `transformer` component: cachequant accelerates "
                    "diffusers pipelines built around one of those")


def _call_params(pipe: Any) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)


def conditioning(pipe: Any) -> str:
    """'prompt' (text-to-image), 'class' (class labels, as DiT) or 'uncond', from the call signature."""
    params = _call_params(pipe)
    if "prompt" in params:
        return "prompt"
    if "class_labels" in params:
        return "class"
    return "uncond"


def num_classes(pipe: Any) -> int:
    """Class labels a class-conditional pipeline accepts: the pipeline's ``num_classes`` where it
    has one (the zoo's MMDiT), else its model's label table (DiT's 1000 unless its config says)."""
    if isinstance(getattr(pipe, "num_classes", None), int):
        return pipe.num_classes
    cfg = denoiser_of(pipe)[1].config
    return int(getattr(cfg, "num_embeds_ada_norm", None) or getattr(cfg, "num_class_embeds", None) or 1000)


def default_inputs(pipe: Any, n: int) -> list:
    """Inputs for ``n`` samples when the caller gives none: labels 0, 1, ... (cycled) or nothing."""
    kind = conditioning(pipe)
    if kind == "prompt":
        raise ValueError(f"{type(pipe).__name__} is text-conditioned: give prompts")
    if kind == "class":
        return [i % num_classes(pipe) for i in range(n)]
    return [None] * n


def check_inputs(pipe: Any, inputs: Sequence) -> list:
    """The inputs as a list, after checking they fit the pipeline's conditioning."""
    kind = conditioning(pipe)
    items = [inputs] if isinstance(inputs, str) else list(inputs)
    if not items:
        raise ValueError("no inputs: give at least one prompt, class label or sample")
    if kind == "prompt":
        if not all(isinstance(p, str) for p in items):
            raise ValueError(f"{type(pipe).__name__} takes text prompts; got {items[:3]!r}")
    elif kind == "class":
        n = num_classes(pipe)
        bad = [c for c in items if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < n]
        if bad:
            raise ValueError(f"class labels must be integers in [0, {n - 1}] for this model; got {bad[:3]!r}")
    elif any(x is not None for x in items):
        raise ValueError(f"{type(pipe).__name__} is unconditional: it takes no prompts or class labels")
    return items


@torch.no_grad()
def call_pipeline(pipe: Any, batch: Sequence, *, num_inference_steps: int, generator: Any = None,
                  output_type: str = "np", **kwargs) -> Any:
    """One pipeline call for ``batch`` (prompts, class labels, or one None per unconditional sample)."""
    kind = conditioning(pipe)
    kw = dict(num_inference_steps=num_inference_steps, generator=generator, output_type=output_type, **kwargs)
    if kind == "prompt":
        return pipe(prompt=list(batch), **kw)
    if kind == "class":
        return pipe(class_labels=list(batch), **kw)
    return pipe(batch_size=len(batch), **kw)


# -- denoiser outputs ---------------------------------------------------------------------------


def sample_of(out: Any) -> torch.Tensor:
    """The predicted tensor of a denoiser output (a ``*Output`` dataclass or a tuple)."""
    return out[0] if isinstance(out, tuple) else out.sample


def map_sample(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The output with ``fn`` applied to its sample: a new object, the original left as it was (a
    CUDA graph returns the same output object at every replay)."""
    if isinstance(out, tuple):
        return (fn(out[0]),) + tuple(out[1:])
    return type(out)(**{**out, "sample": fn(out.sample)})


def timestep_of(args: tuple, kwargs: dict) -> Any:
    """The ``timestep`` argument of a denoiser call (second positional or keyword)."""
    if "timestep" in kwargs:
        return kwargs["timestep"]
    return args[1] if len(args) > 1 else None
