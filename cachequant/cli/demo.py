"""The README's main job: accelerate a model, compare against full precision from the same seeds.

Prints the executed-MAC and Bops reduction (counted by hooks during the real runs) and the PSNR of
the accelerated images against the full-precision ones, and writes a PNG grid (top row full
precision, bottom row cachequant).
"""

from __future__ import annotations

import time

import numpy as np
import torch


PROMPTS = ["a photograph of an astronaut riding a horse", "a bowl of fruit", "a red bicycle", "a lighthouse"]


def _inputs(pipe, n: int) -> list:
    from ..pipecall import conditioning, default_inputs

    return (PROMPTS * n)[:n] if conditioning(pipe) == "prompt" else default_inputs(pipe, n)


def _sample(pipe, n: int, steps: int, seed: int, desc: str, quiet: bool) -> np.ndarray:
    from ..pipecall import call_pipeline

    pipe.set_progress_bar_config(disable=quiet, desc=desc)
    out = call_pipeline(pipe, _inputs(pipe, n), num_inference_steps=steps,
                        generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return np.asarray(out.images, dtype=np.float64)


def run_demo(args) -> int:
    import cachequant as cq
    from ..metrics import psnr
    from ..metrics.macs import count_ops
    from ..pipecall import conditioning, denoiser_of
    from ..utils.io import save_grid
    from .common import BITS, IMAGE_SUFFIXES, UsageError, check_model, check_output_file, load_pipeline

    # everything that can be wrong is checked before the first sampling run
    out_path = check_output_file(args.out, "--out", IMAGE_SUFFIXES)
    check_model(args.model)
    wb, ab = BITS[args.bits]
    rounding = args.weight_rounding
    if rounding == "auto":
        rounding = "gptq" if wb == 4 else "nearest"
    try:
        cfg = cq.CacheQuantConfig(interval=args.interval, schedule="dps", weight_bits=wb, act_bits=ab, dec=True,
                                  calib_batch_size=8, num_calib_samples=16,
                                  weight_rounding=rounding if wb is not None else "nearest")
    except ValueError as e:
        raise UsageError(str(e)) from None
    torch.manual_seed(0)
    pipe = load_pipeline(args.model, "cpu", None)
    _, model = denoiser_of(pipe)
    seed = 1234
    t0 = time.time()
    with count_ops(model) as fp_ops:
        ref = _sample(pipe, args.num_images, args.steps, seed, "full precision", args.quiet)
    t_fp = time.time() - t0

    t0 = time.time()
    calib = {"prompts": PROMPTS} if conditioning(pipe) == "prompt" else {}
    plan = cq.calibrate(pipe, cfg, num_inference_steps=args.steps, progress=not args.quiet, **calib)
    t_cal = time.time() - t0

    cq.accelerate(pipe, plan)
    t0 = time.time()
    with count_ops(model) as cq_ops:
        out = _sample(pipe, args.num_images, args.steps, seed, "cachequant", args.quiet)
    t_cq = time.time() - t0
    cq.restore(pipe)

    save_grid([ref, out], out_path, scale=4)
    bits = "full precision" if wb is None else f"W{wb}A{ab}" + (", GPTQ rounding" if cfg.weight_rounding == "gptq" else "")
    print(f"model {args.model}: {args.steps} steps, interval {args.interval} (DPS), {bits}, DEC on")
    print(f"  full steps       {plan.schedule}")
    print(f"  calibration      {t_cal:.1f} s")
    print(f"  MACs / image     {fp_ops.macs / args.num_images / 1e6:.1f} M -> {cq_ops.macs / args.num_images / 1e6:.1f} M "
          f"({fp_ops.macs / cq_ops.macs:.2f}x fewer)")
    print(f"  Bops / image     {fp_ops.bops / args.num_images / 1e9:.1f} G -> {cq_ops.bops / args.num_images / 1e9:.2f} G "
          f"({fp_ops.bops / cq_ops.bops:.1f}x fewer)")
    print(f"  PSNR vs FP       {psnr(out, ref):.2f} dB over {args.num_images} images (same seeds)")
    print(f"  wall time (CPU, fake-quant reference path) FP {t_fp:.1f} s, cachequant {t_cq:.1f} s")
    print(f"  grid written to  {args.out} (top: full precision, bottom: cachequant)")
    return 0
