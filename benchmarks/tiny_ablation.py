"""Error of each acceleration variant against full precision on the tiny (random-weight) models.

    python benchmarks/tiny_ablation.py --out results/tiny/README.md

For every variant: the denoiser's output error along the full-precision trajectory (each model call
gets exactly the inputs the full-precision run gave it; relative L2 error, averaged over calls),
PSNR of the final images against the full-precision images from the same seeds, and the executed
MAC reduction. Random weights: the numbers test the machinery and
show relative effects, not image quality (trained models come with the models-and-metrics work).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
import torch

import cachequant as cq
from cachequant.metrics import psnr
from cachequant.metrics.macs import count_ops
from cachequant.pipecall import call_pipeline
from cachequant.pipecall import denoiser_of
from cachequant.models.tiny import tiny_ddim_pipeline, tiny_dit_pipeline
from cachequant.utils.io import atomic_path

VARIANTS = [
    ("cache only (uniform)", dict(schedule="uniform", weight_bits=None, act_bits=None, dec=False)),
    ("quant only W8A8", dict(interval=1, schedule="uniform", dec=False)),
    ("quant only W4A8", dict(interval=1, schedule="uniform", weight_bits=4, dec=False)),
    ("naive cache + W8A8", dict(schedule="uniform", dec=False)),
    ("+ DPS", dict(schedule="dps", dec=False)),
    ("+ DPS + DEC", dict(schedule="dps", dec=True)),
]


def sample(pipe, kind, n, steps, seed):
    g = torch.Generator("cpu").manual_seed(seed)
    out = call_pipeline(pipe, [i % 10 for i in range(n)] if kind == "dit" else [None] * n, num_inference_steps=steps,
                        generator=g, output_type="np")
    return np.asarray(out.images, dtype=np.float64)


def record_calls(pipe, model, kind, n, steps, seed):
    calls = []
    h = model.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    images = sample(pipe, kind, n, steps, seed)
    h.remove()
    with torch.no_grad():
        outs = [model(*a, **k)[0] for a, k in calls]
    return images, calls, outs


@torch.no_grad()
def teacher_forced_error(pipe, model, calls, outs) -> float:
    errs = []
    for position, ((a, k), r) in enumerate(zip(calls, outs)):
        cq.set_step(pipe, position)  # call i of the full-precision run is position i of the plan
        errs.append(float((model(*a, **k)[0] - r).norm() / r.norm()))
    return float(np.mean(errs))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--num-images", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--out", default="results/tiny/README.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for kind, make in (("ddim", tiny_ddim_pipeline), ("dit", tiny_dit_pipeline)):
        pipe = make()
        _, model = denoiser_of(pipe)
        with count_ops(model) as fp_ops:
            sample(pipe, kind, 1, args.steps, seed=1)
        ref, calls, outs = record_calls(pipe, model, kind, args.num_images, args.steps, seed=1)
        for name, over in VARIANTS:
            kw = dict(interval=args.interval, calib_batch_size=8, num_calib_samples=args.calib_samples, dps_samples=8)
            kw.update(over)
            cfg = cq.CacheQuantConfig(**kw)
            calib = {"class_labels": [i % 10 for i in range(args.calib_samples)]} if kind == "dit" else {}
            t = time.time()
            plan = cq.calibrate(pipe, cfg, num_inference_steps=args.steps, progress=False, **calib)
            t_cal = time.time() - t
            cq.accelerate(pipe, plan)
            with count_ops(model) as ops:
                sample(pipe, kind, 1, args.steps, seed=1)
            out = sample(pipe, kind, args.num_images, args.steps, seed=1)
            tf = teacher_forced_error(pipe, model, calls, outs)
            cq.restore(pipe)
            rows.append((f"tiny-{kind}", name, tf, psnr(out, ref), fp_ops.macs / ops.macs, t_cal))
            print(f"{rows[-1][0]:10s} {name:22s} denoiser err {tf:.4f}  PSNR {rows[-1][3]:6.2f} dB  "
                  f"MACs {rows[-1][4]:.2f}x  calib {t_cal:.0f}s", flush=True)
    lines = [
        "# Tiny-model ablation (random weights)", "",
        f"Command: `python benchmarks/tiny_ablation.py --steps {args.steps} --interval {args.interval} "
        f"--num-images {args.num_images} --calib-samples {args.calib_samples}`", "",
        f"Device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"cachequant {cq.__version__}, Python {sys.version.split()[0]}. DDIM {args.steps} steps, N = {args.interval}; "
        f"{args.num_images} images per variant from the same seeds as full precision; "
        f"{args.calib_samples} calibration trajectories (8 for DPS / cache-DEC features).", "",
        "The models have random weights: these numbers check that each part does what it should relative "
        "to the others, they say nothing about image quality. *Denoiser error* = relative L2 error of the "
        "denoiser's output when every call gets the inputs of the full-precision run (cached steps reuse "
        "what the accelerated model stored on its own full steps), averaged over calls: it isolates each "
        "variant's per-step error. A random network's sampling trajectory is chaotic, so final-image PSNR "
        "collapses to that of unrelated images (~9 dB) as soon as anything perturbs it.", "",
        "| model | variant | denoiser error vs FP | final-image PSNR vs FP (dB) | executed MACs reduction | calibration (s) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {v} | {e:.4f} | {p:.2f} | {x:.2f}x | {c:.0f} |" for m, v, e, p, x, c in rows]
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
