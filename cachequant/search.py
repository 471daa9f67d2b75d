"""``cq.autotune``: the cheapest plan over cache interval and bit widths that meets a quality budget.

Why a search: which (N, bits) a model tolerates depends on the model, the sampler and the step
count — a well-trained UNet keeps its images at N = 10, an under-trained one does not; 4-bit
weights may cost nothing or a lot. The search calibrates every candidate of a small grid, runs it
on held-out inputs (seeds and inputs calibration never saw) next to full precision, and keeps the
cheapest candidate whose images stay within the budget. Cost is what executes per image, counted
during those runs: ``bops`` (MACs weighted by weight × activation bits, the papers' measure, which
credits 8-bit arithmetic) or ``macs`` (ignores bit widths: use it where 8-bit kernels do not pay
on your GPU, see ``cq.kernel_report``). Quality is the PSNR of the accelerated images against the
full-precision ones from the same seeds.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .api import accelerate, restore
from .calibration.calibrate import calibrate
from .config import CacheQuantConfig
from .metrics.image import psnr
from .metrics.macs import count_ops
from .pipecall import call_pipeline, check_inputs, conditioning, default_inputs, denoiser_of
from .plan import Plan

BITS = {"fp": (None, None), "w8a8": (8, 8), "w4a8": (4, 8)}
"""Bit-width choices: no quantization (cache only), W8A8, W4A8 (GPTQ rounding, as 4-bit weights need)."""
COSTS = ("bops", "macs")


@dataclass
class Candidate:
    interval: int
    bits: str
    psnr: float
    """dB against full precision on the held-out inputs (inf: identical images)."""
    macs: float
    bops: float
    """Executed per image on the held-out runs."""
    calib_s: float
    plan: Plan = field(repr=False)

    def cost(self, kind: str) -> float:
        return self.bops if kind == "bops" else self.macs


@dataclass
class AutotuneResult:
    candidates: list[Candidate]
    min_psnr: float
    cost: str
    fp_macs: float
    fp_bops: float

    @property
    def best(self) -> Candidate | None:
        """The cheapest candidate meeting the budget (ties: the higher PSNR), or None."""
        ok = [c for c in self.candidates if c.psnr >= self.min_psnr]
        return min(ok, key=lambda c: (c.cost(self.cost), -c.psnr)) if ok else None

    @property
    def plan(self) -> Plan | None:
        best = self.best
        return None if best is None else best.plan

    @property
    def frontier(self) -> list[Candidate]:
        """The candidates no other beats on both cost and PSNR, cheapest first."""
        cs = sorted(self.candidates, key=lambda c: (c.cost(self.cost), -c.psnr))
        out: list[Candidate] = []
        for c in cs:
            if not out or c.psnr > out[-1].psnr:
                out.append(c)
        return out

    @property
    def fp_cost(self) -> float:
        """Full precision's cost per image, in the unit of ``cost``."""
        return self.fp_bops if self.cost == "bops" else self.fp_macs

    def table(self) -> list[dict]:
        fp = self.fp_cost
        front = {id(c) for c in self.frontier}
        return [{"interval": c.interval, "bits": c.bits, "psnr_db": round(c.psnr, 2),
                 f"{self.cost}_reduction": round(fp / c.cost(self.cost), 3), "gmacs_per_image": round(c.macs / 1e9, 4),
                 "gbops_per_image": round(c.bops / 1e9, 3), "calib_s": round(c.calib_s, 1),
                 "on_frontier": id(c) in front, "meets_budget": c.psnr >= self.min_psnr}
                for c in sorted(self.candidates, key=lambda c: c.cost(self.cost))]

    def plot(self, path: str | os.PathLike) -> Path:
        """The speed / quality frontier: cost reduction against PSNR, the budget as a line."""
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from .utils.io import atomic_path

        fp = self.fp_cost
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in self.candidates:
            ax.scatter(fp / c.cost(self.cost), min(c.psnr, 99.0), color="C0" if c.psnr >= self.min_psnr else "C3")
            ax.annotate(f"N={c.interval} {c.bits}", (fp / c.cost(self.cost), min(c.psnr, 99.0)), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        front = self.frontier
        ax.plot([fp / c.cost(self.cost) for c in front], [min(c.psnr, 99.0) for c in front], "-", color="C0",
                label="frontier")
        ax.axhline(self.min_psnr, color="C3", linestyle="--", label=f"budget {self.min_psnr:g} dB")
        ax.set_xscale("log")
        xs = [fp / c.cost(self.cost) for c in self.candidates]
        ticks = [v for v in (1, 1.5, 2, 3, 5, 10, 15, 20, 30, 50, 100, 200, 500) if min(xs) / 1.2 <= v <= max(xs) * 1.2]
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"{self.cost.upper()} reduction vs full precision (x)")
        ax.set_ylabel("PSNR vs full precision (dB)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)
        plt.close(fig)
        return path


def autotune(pipe: Any, num_inference_steps: int, *, min_psnr: float, intervals: Sequence[int] = (2, 3, 5, 10),
             bits: Sequence[str] = ("fp", "w8a8", "w4a8"), cost: str = "bops", prompts: Sequence[str] | None = None,
             class_labels: Sequence[int] | None = None, num_samples: int | None = None,
             eval_inputs: Sequence | None = None, eval_images: int = 4, eval_seed: int = 10_000,
             config: CacheQuantConfig | None = None, progress: bool = True) -> AutotuneResult:
    """Calibrates each (interval, bits) of the grid on ``prompts`` / ``class_labels`` /
    ``num_samples`` (as :func:`cq.calibrate`), measures it on ``eval_images`` held-out images
    (``eval_inputs``, default: the first class labels or unconditional samples; text pipelines need
    them) from seeds ``eval_seed``... against full precision, and returns every candidate with
    :attr:`AutotuneResult.best` (the cheapest with PSNR >= ``min_psnr``), ``.frontier``, ``.table()``
    and ``.plot(path)``. ``config`` gives every other field (schedule, DEC, calibration sizes);
    its interval and bits are overridden per candidate. The pipeline is left as it was."""
    grid = _check_grid(min_psnr, intervals, bits, cost, eval_images)
    base = config if config is not None else CacheQuantConfig(schedule="dps", dec=True)
    if not isinstance(base, CacheQuantConfig):
        raise TypeError(f"config must be a cachequant.CacheQuantConfig, got {type(base).__name__}")
    if eval_inputs is None:
        if conditioning(pipe) == "prompt":
            raise ValueError(f"{type(pipe).__name__} is text-conditioned: give eval_inputs (held-out prompts)")
        eval_inputs = default_inputs(pipe, eval_images)
    held_out = check_inputs(pipe, eval_inputs)
    model = denoiser_of(pipe)[1]

    def sample() -> tuple[np.ndarray, Any]:
        with count_ops(model) as ops:
            out = call_pipeline(pipe, held_out, num_inference_steps=num_inference_steps,
                                generator=torch.Generator("cpu").manual_seed(eval_seed), output_type="np")
        return np.asarray(out.images, dtype=np.float64), ops

    from tqdm.auto import tqdm

    reference, fp_ops = sample()
    n = len(held_out)
    candidates = []
    for interval, name in tqdm(grid, desc="cachequant autotune", disable=not progress):
        wb, ab = BITS[name]
        cfg = replace(base, interval=interval, weight_bits=wb, act_bits=ab,
                      weight_rounding="gptq" if wb == 4 else "nearest", dec=base.dec and (interval > 1 or wb is not None))
        t0 = time.perf_counter()
        plan = calibrate(pipe, cfg, num_inference_steps, prompts, class_labels, num_samples=num_samples,
                         progress=False)
        calib_s = time.perf_counter() - t0
        accelerate(pipe, plan)
        try:
            images, ops = sample()
        finally:
            restore(pipe)
        candidates.append(Candidate(interval, name, psnr(images, reference), ops.macs / n, ops.bops / n, calib_s, plan))
    return AutotuneResult(candidates, float(min_psnr), cost, fp_ops.macs / n, fp_ops.bops / n)


def _check_grid(min_psnr: Any, intervals: Sequence[int], bits: Sequence[str], cost: str,
                eval_images: int) -> list[tuple[int, str]]:
    if isinstance(min_psnr, bool) or not isinstance(min_psnr, (int, float)) or not math.isfinite(min_psnr) \
            or min_psnr <= 0:
        raise ValueError(f"min_psnr must be a positive number of dB, got {min_psnr!r}")
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}; got {cost!r}")
    if isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images < 1:
        raise ValueError(f"eval_images must be a positive integer, got {eval_images!r}")
    intervals, bits = list(intervals), list(bits)
    bad = [i for i in intervals if isinstance(i, bool) or not isinstance(i, int) or i < 1]
    if not intervals or bad:
        raise ValueError(f"intervals must be positive integers (1: no cache); got {intervals!r}")
    unknown = [b for b in bits if b not in BITS]
    if not bits or unknown:
        raise ValueError(f"bits must be among {', '.join(BITS)}; got {bits!r}")
    grid = [(i, b) for i, b in itertools.product(dict.fromkeys(intervals), dict.fromkeys(bits))
            if not (i == 1 and b == "fp")]  # that one is full precision itself
    if not grid:
        raise ValueError("the grid holds only full precision (interval 1, 'fp'): add an interval > 1 or 8-bit")
    return grid
