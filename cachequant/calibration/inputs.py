"""Calibration inputs: turning prompts / class labels / a sample count into pipeline calls."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch


@dataclass
class CalibInputs:
    kind: str  # "prompt" | "class" | "uncond"
    items: list  # prompts, class labels, or None placeholders (one per trajectory)

    def batches(self, batch_size: int, limit: int | None = None) -> list[list]:
        items = self.items if limit is None else self.items[:limit]
        return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def make_inputs(pipe: Any, prompts: Sequence[str] | None, class_labels: Sequence[int] | None,
                num_samples: int) -> CalibInputs:
    # A text pipeline may come without its text encoder (prompts encoded elsewhere): ask its signature.
    wants_prompt = "prompt" in inspect.signature(pipe.__call__).parameters
    from ..metrics.sampling import is_class_conditional, num_classes

    wants_class = is_class_conditional(pipe)
    if prompts is not None and class_labels is not None:
        raise ValueError("give either prompts or class_labels, not both")
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        if not wants_prompt:
            raise ValueError(f"{type(pipe).__name__} takes no text prompts; pass class_labels or neither")
        return CalibInputs("prompt", prompts)
    if class_labels is not None:
        labels = [int(c) for c in class_labels]
        if not labels:
            raise ValueError("class_labels must be a non-empty list of integers")
        if not wants_class:
            raise ValueError(f"{type(pipe).__name__} is not class-conditional; pass prompts or neither")
        return CalibInputs("class", labels)
    if wants_prompt:
        raise ValueError(f"{type(pipe).__name__} is text-conditioned: pass prompts=[...] for calibration "
                         "(the reference work uses PartiPrompts)")
    if wants_class:
        n_cls = num_classes(pipe)
        return CalibInputs("class", [i % n_cls for i in range(num_samples)])
    return CalibInputs("uncond", [None] * num_samples)


@contextmanager
def quiet(pipe: Any) -> Iterator[None]:
    """Silences the pipeline's own per-run progress bar (ours covers the whole calibration)."""
    saved = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = saved


@torch.no_grad()
def run_batch(pipe: Any, kind: str, batch: list, num_inference_steps: int, seed: int, pipeline_kwargs: dict) -> None:
    gen = torch.Generator("cpu").manual_seed(seed)
    kw = dict(num_inference_steps=num_inference_steps, generator=gen, **pipeline_kwargs)
    if kind == "prompt":
        pipe(prompt=list(batch), output_type="latent", **kw)
    elif kind == "class":
        pipe(class_labels=list(batch), output_type="np", **kw)
    else:
        pipe(batch_size=len(batch), output_type="np", **kw)
