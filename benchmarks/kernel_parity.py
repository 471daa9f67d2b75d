"""End-to-end parity of the kernel backends with the fake-quant reference, on the shipped models.

For each model one CacheQuant plan (DPS + DEC, W8A8) is calibrated twice — with 8-bit attention
matmuls (the reference method) and without — and images are generated from the same seeds with:
the reference path (``backend="fake"``), the INT8 kernels and the FP8 kernels. Reported: PSNR / SSIM
of each against the reference path of the same plan and against full precision, and sampling time.
Without attention quantization INT8 must reproduce the reference almost exactly (same integer
arithmetic); with it, the kernels run attention in fused fp16/fp32 SDPA, which is one source of
difference that this script measures.

    python benchmarks/kernel_parity.py --out parity.json            # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cachequant as cq  # noqa: E402
from cachequant.metrics import psnr, ssim  # noqa: E402
from cachequant.metrics.sampling import sample_indices  # noqa: E402
from cachequant.utils.io import atomic_path  # noqa: E402

SETTINGS = {
    "cifar10-unet": dict(scheduler="ddim", steps=100, interval=10, kw={}),
    "cifar10-dit": dict(scheduler="ddim", steps=50, interval=2, kw={"guidance_scale": 1.5}),
}


def images(pipe, n: int, steps: int, kw: dict) -> tuple[np.ndarray, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    im, _ = sample_indices(pipe, list(range(n)), 0, steps, kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return im.astype(np.float64) / 255, time.perf_counter() - t0


def perturb(pipe) -> list:
    """The floor: the reference path with 1e-6 relative noise on every quantized layer's output.
    A quantized network is discontinuous (a code flips when its input crosses a rounding boundary),
    so *any* float-level difference — accumulation order, a fused epilogue — grows into this much
    image difference; a kernel that matches the reference up to float rounding lands at this floor."""
    from cachequant.pipecall import denoiser_of
    from cachequant.quant.layer import quant_hooks

    g = torch.Generator(pipe.device).manual_seed(1)
    hooks = []
    for m, _ in quant_hooks(denoiser_of(pipe)[1]).values():
        hooks.append(m.register_forward_hook(
            lambda mod, i, o: o * (1 + 1e-6 * torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype))))
    return hooks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="cifar10-unet,cifar10-dit")
    ap.add_argument("--kinds", default="int8,fp8")
    ap.add_argument("--steps", type=int, default=None, help="override the sampler steps (CPU smoke test)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "num_images": args.num_images, "rows": []}
    for name in args.models.split(","):
        s = dict(SETTINGS[name])
        if args.steps:
            s["steps"], s["interval"] = args.steps, 2
        pipe = cq.zoo.load_pipeline(name, scheduler=s["scheduler"]).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        fp, t_fp = images(pipe, args.num_images, s["steps"], s["kw"])
        result["rows"].append({"model": name, "variant": "full precision", "seconds": t_fp})
        for attn in (True, False):
            cfg = cq.CacheQuantConfig(interval=s["interval"], schedule="dps", quant_attention=attn)
            plan = cq.calibrate(pipe, cfg, num_inference_steps=s["steps"], progress=False, pipeline_kwargs=s["kw"])
            ref = None
            for backend in ["fake", "fake+noise"] + [k for k in args.kinds.split(",") if k]:
                row = {"model": name, "quant_attention": attn, "backend": backend}
                try:
                    cq.accelerate(pipe, plan, backend=backend.split("+")[0])
                    row["kernel_layers"] = cq.kernel_report(pipe)["kernel_layers"]
                    hooks = perturb(pipe) if backend == "fake+noise" else []
                    im, row["seconds"] = images(pipe, args.num_images, s["steps"], s["kw"])
                    for h in hooks:
                        h.remove()
                    cq.restore(pipe)
                    if backend == "fake":
                        ref = im
                    row["psnr_vs_fake"] = psnr(im, ref) if backend != "fake" else None
                    row["ssim_vs_fake"] = ssim(im, ref) if backend != "fake" else None
                    row["psnr_vs_fp"] = psnr(im, fp)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    if cq.is_accelerated(pipe):
                        cq.restore(pipe)
                print(json.dumps(row), flush=True)
                result["rows"].append(row)
        with atomic_path(args.out) as tmp:  # rewritten after each model: a crash keeps the last whole file
            tmp.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
