"""Calibration inputs: prompts, class labels or a sample count, checked against the pipeline."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from ..pipecall import check_inputs, conditioning, default_inputs


def calibration_inputs(pipe: Any, prompts: Sequence[str] | None, class_labels: Sequence[int] | None,
                       num_samples: int) -> list:
    """One item per calibration trajectory: a prompt, a class label, or None (unconditional)."""
    if prompts is not None and class_labels is not None:
        raise ValueError("give either prompts or class_labels, not both")
    kind = conditioning(pipe)
    if prompts is not None:
        if kind != "prompt":
            raise ValueError(f"{type(pipe).__name__} takes no text prompts; pass class_labels or neither")
        return check_inputs(pipe, prompts)
    if class_labels is not None:
        if kind != "class":
            raise ValueError(f"{type(pipe).__name__} is not class-conditional; pass prompts or neither")
        return check_inputs(pipe, [int(c) for c in class_labels])
    if kind == "prompt":
        raise ValueError(f"{type(pipe).__name__} is text-conditioned: pass prompts=[...] for calibration "
                         "(the reference work uses PartiPrompts)")
    return default_inputs(pipe, num_samples)


def batches(items: list, batch_size: int, limit: int | None = None) -> list[list]:
    items = items if limit is None else items[:limit]
    return [items[i: i + batch_size] for i in range(0, len(items), batch_size)]


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
