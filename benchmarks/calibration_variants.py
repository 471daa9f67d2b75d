"""The papers' calibration against one of cachequant's improvements on a shipped model, same
everything else, on the CPU: ``--compare cache-dec-fit`` (open-loop vs closed-loop cache-DEC) or
``--compare dps-cost`` (DPS on the float feature's drift vs quantization-aware DPS).

For each setting, calibrates the demo's plan (DPS, DEC, W8A8 unless --bits says otherwise), samples
--num-images images from the same seeds as full precision, and records the PSNR against full
precision, the schedule, the calibration diagnostics (reuse errors, the closed-loop fit's squared
errors, the DPS costs) and the calibration time.

    python benchmarks/calibration_variants.py --compare cache-dec-fit --model cifar10-unet --steps 100 \\
        --interval 10 --out results/quality/closed-loop-dec-cifar10-unet.json
    python benchmarks/calibration_variants.py --compare dps-cost --model cifar10-unet --steps 100 \\
        --interval 10 --out results/quality/quant-dps-cifar10-unet.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import cachequant as cq
from cachequant.cli.common import BITS, add_weights_option, load_pipeline
from cachequant.metrics import psnr
from cachequant.pipecall import call_pipeline, default_inputs
from cachequant.utils.io import atomic_path


COMPARISONS = {"cache-dec-fit": ("cache_dec_fit", ("open", "closed")), "dps-cost": ("dps_cost", ("float", "quant"))}
"""--compare: (CacheQuantConfig field, (the papers' value, the improvement))."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", choices=list(COMPARISONS), required=True)
    ap.add_argument("--model", default="cifar10-unet")
    add_weights_option(ap)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--bits", choices=list(BITS), default="w8a8")
    ap.add_argument("--num-images", type=int, default=8)
    ap.add_argument("--calib-seeds", type=int, nargs="+", default=[0], help="calibration seeds (one row each)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    wb, ab = BITS[args.bits]
    pipe = load_pipeline(args.model, "cpu", None, args.weights)
    inputs = default_inputs(pipe, args.num_images)

    def sample() -> np.ndarray:
        out = call_pipeline(pipe, inputs, num_inference_steps=args.steps,
                            generator=torch.Generator("cpu").manual_seed(1234), output_type="np")
        return np.asarray(out.images, dtype=np.float64)

    ref = sample()
    rows = []
    field, values = COMPARISONS[args.compare]
    for seed in args.calib_seeds:
        for value in values:
            cfg = cq.CacheQuantConfig(interval=args.interval, schedule="dps", weight_bits=wb, act_bits=ab, dec=True,
                                      calib_batch_size=8, num_calib_samples=16, seed=seed, **{field: value})
            t0 = time.perf_counter()
            plan = cq.calibrate(pipe, cfg, args.steps, progress=False)
            calib_s = time.perf_counter() - t0
            cq.accelerate(pipe, plan)
            try:
                out = sample()
            finally:
                cq.restore(pipe)
            row = {field: value, "calib_seed": seed, "psnr_db": psnr(out, ref), "calib_s": calib_s,
                   "full_steps": list(plan.schedule), "cache_reuse": plan.diagnostics.get("cache_reuse"),
                   "closed_loop": plan.diagnostics.get("cache_dec_closed_loop"),
                   "dps_quant": plan.diagnostics.get("dps_quant")}
            rows.append(row)
            print(json.dumps({k: row[k] for k in (field, "calib_seed", "psnr_db", "calib_s")}), flush=True)
    result = {"compare": args.compare, "model": args.model, **cq.zoo.weights_record(args.model, args.weights),
              "steps": args.steps, "interval": args.interval,
              "bits": args.bits,
              "num_images": args.num_images, "sample_seed": 1234, "device": "cpu",
              "versions": {"torch": torch.__version__, "python": platform.python_version(),
                           "cachequant": cq.__version__}, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
