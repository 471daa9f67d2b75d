"""Which operand of the 8-bit attention matmuls costs the quality: q, k, the softmax
probabilities p, or v.

A calibrated plan quantizes all four operands of QKᵀ and softmax·V with their per-step ranges.
This samples the same images with the plan's layers quantized and, in turn, only one attention
operand quantized (the other three in float), none, all four, and all four with the
probabilities on an e4m3 grid instead of their uniform 8-bit range (what a plan calibrated with
``attention_probs="e4m3"`` computes, from the same ranges), and reports the PSNR / SSIM of
each against full precision from the same sampling seeds. The selection exists only inside this
process (the operand quantizer is wrapped here, nothing in the package changes)::

    python benchmarks/attention_operands.py --model cifar10-mmdit --steps 28 --guidance-scale 1.5 \\
        --plan /tmp/mmdit-seeds/seed0/mmdit-euler28/w8a8/plan.cqplan --num-samples 16 \\
        --out results/quality/attention-operands-mmdit-cpu.json

The plan must quantize the attention matmuls (``quant_attention=True``, the default) and belong to
the model and sampler given here (``cq.accelerate`` refuses it otherwise).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness.env import environment  # noqa: E402
from harness.io import write_json  # noqa: E402

import cachequant as cq  # noqa: E402
from cachequant.cli.common import add_weights_option  # noqa: E402
from cachequant.metrics import psnr, ssim  # noqa: E402
from cachequant.metrics.sampling import sample_indices  # noqa: E402
from cachequant.plan import ATTENTION_OPERANDS  # noqa: E402
from cachequant.quant import attention  # noqa: E402

SETTINGS = {"none": (), **{f"only {o}": (o,) for o in ATTENTION_OPERANDS}, "all": ATTENTION_OPERANDS,
            "q, k, v 8-bit, p e4m3": ("q", "k", "v", "p:e4m3")}
"""Which operands go through the plan's quantizer; ``"p:e4m3"`` rounds the probabilities to e4m3 at
the fixed scale 1/448 instead (p ≤ 1 maps into e4m3's range; what an FP8 attention kernel does with
them), a float grid whose relative step is the same for small and large probabilities."""


def sample(pipe, n: int, steps: int, guidance_scale: float | None) -> np.ndarray:
    kw = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    with torch.inference_mode():
        images, _ = sample_indices(pipe, list(range(n)), 0, steps, kw)
    return images.astype(np.float64) / 255


def operand_images(pipe, plan, draw: Callable[[], np.ndarray],
                   settings: dict[str, tuple[str, ...]] = SETTINGS) -> dict[str, np.ndarray]:
    """``draw()``'s images with ``plan`` applied and, per setting, only the named attention operands
    quantized; the pipeline is restored and the operand quantizer put back, whatever happens."""
    cq.accelerate(pipe, plan)
    real_call = attention._OperandQuant.__call__
    out = {}
    try:
        for name, quantized in settings.items():
            def call(self, operand, x, quantized=quantized):
                if f"{operand}:e4m3" in quantized:
                    return attention.e4m3_probabilities(x)  # attention_probs="e4m3"
                return real_call(self, operand, x) if operand in quantized else x
            attention._OperandQuant.__call__ = call
            out[name] = draw()
    finally:
        attention._OperandQuant.__call__ = real_call
        cq.restore(pipe)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar10-mmdit", help="a zoo model (cq.zoo.load_pipeline)")
    p.add_argument("--scheduler", default=None, help="the zoo sampler (default: the model's first)")
    add_weights_option(p)
    p.add_argument("--plan", required=True, help="a .cqplan calibrated for this model and sampler")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance-scale", type=lambda v: None if v.lower() == "none" else float(v), default=1.5,
                   help="classifier-free guidance; 'none' for pipelines without it (the CIFAR UNet's DDIMPipeline)")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    plan = cq.load_plan(a.plan)
    if plan.quant is None or not plan.quant.attention:
        raise SystemExit(f"{a.plan} does not quantize attention matmuls: calibrate with quant_attention=True")
    pipe = cq.zoo.load_pipeline(a.model, scheduler=a.scheduler, weights=a.weights)
    fp = sample(pipe, a.num_samples, a.steps, a.guidance_scale)
    rows = {}
    for name, im in operand_images(pipe, plan, lambda: sample(pipe, a.num_samples, a.steps, a.guidance_scale)).items():
        rows[name] = {"quantized_operands": list(SETTINGS[name]), "psnr_vs_fp": psnr(im, fp), "ssim_vs_fp": ssim(im, fp)}
        print(f"| {name} | {rows[name]['psnr_vs_fp']:.2f} | {rows[name]['ssim_vs_fp']:.4f} |", flush=True)
    if a.out:
        write_json(Path(a.out), {"command": " ".join(sys.argv), "model": a.model,
                                 **cq.zoo.weights_record(a.model, a.weights), "plan": a.plan,
                                 "num_samples": a.num_samples, "steps": a.steps, "guidance_scale": a.guidance_scale,
                                 "environment": environment("cpu"), "rows": rows}, indent=1, default=None)
        print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
