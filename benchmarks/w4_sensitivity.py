"""Why does W4A8 break the shipped CIFAR UNet, and which layers does it need at 8 bits?

`results/quality/README.md` measured quant-only W4A8 on `cifar10-unet` at FID 242 (W8A8: 48, full
precision: 42.5). This script finds where that error comes from, small enough for a CPU:

1. every Linear / Conv2d layer's weight error at 4 bits (the plan's quantizer: per output channel,
   L_p-searched range), relative to the weight's norm — a property of the weights alone;
2. end-to-end, against full precision from the same seeds: W8A8, W4A8, then W4A8 with one group of
   layers kept at 8-bit weights (``CacheQuantConfig.w8_layers``), PSNR / SSIM of the images;
3. with ``--gptq``: W4A8 with GPTQ rounding (``weight_rounding="gptq"``), alone and with the
   shortcut convs at 8 bits; with ``--joint N``: the whole method (cache N, DPS + DEC) at W8A8, W4A8
   and W4A8 with GPTQ; with ``--bias-correction``: a script-level bias-correction experiment.

    python benchmarks/w4_sensitivity.py --num-samples 16 --steps 100 --out results/w4/sensitivity-unet.json

On 2 CPU cores: ~1 minute per variant with the defaults (16 samples, DDIM 100, 16 calibration
trajectories). PSNR on 16 images is a proxy, not FID: it ranks the groups, it does not replace the table.
"""

from __future__ import annotations

import argparse
from fnmatch import fnmatchcase
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name → fnmatch patterns kept at 8-bit weights (on top of the adapter's conv_in / conv_out)
UNET_GROUPS: dict[str, list[str]] = {
    "time embedding MLP": ["time_embedding.*"],
    "resnet time projections": ["*.time_emb_proj"],
    "attention projections": ["*attentions.*"],
    "skip / shortcut 1x1 convs": ["*.conv_shortcut"],
    "down / up samplers": ["*samplers.*"],
    "down blocks": ["down_blocks.*"],
    "mid block": ["mid_block.*"],
    "up blocks": ["up_blocks.*"],
}


def weight_errors(model: torch.nn.Module, bits: int) -> list[dict]:
    """‖W − Q(W)‖ / ‖W‖ per layer with the plan's weight quantizer."""
    from cachequant.quant.quantizer import fake_quant, weight_qparams

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight.detach().float()
            s, z = weight_qparams(w, bits)
            err = (fake_quant(w, s, z, bits) - w).norm() / w.norm().clamp_min(1e-12)
            rows.append({"layer": name, "params": w.numel(), "rel_error": float(err)})
    return rows


def input_means(pipe, model: torch.nn.Module, steps: int, seed: int, n: int = 16) -> dict[str, torch.Tensor]:
    """Mean input per channel of every Linear / Conv2d, over full-precision trajectories of samples
    other than the evaluated ones (indices 10,000+), all steps pooled."""
    from cachequant.metrics.sampling import sample_indices

    sums: dict[str, list] = {}

    def hook(name):
        def f(mod, args):
            x = args[0].detach()
            mu = x.mean(dim=(0, 2, 3)) if x.dim() == 4 else x.reshape(-1, x.shape[-1]).mean(0)
            sums.setdefault(name, []).append(mu)
        return f

    hs = [m.register_forward_pre_hook(hook(nm)) for nm, m in model.named_modules()
          if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    try:
        sample_indices(pipe, list(range(10_000, 10_000 + n)), seed, steps)
    finally:
        for h in hs:
            h.remove()
    return {k: torch.stack(v).mean(0) for k, v in sums.items()}


def correct_biases(model: torch.nn.Module, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bias correction (Nagel et al., 2019, "Data-free quantization", sec. 4.2): a quantized layer's
    output is shifted in expectation by (W_q − W)·E[x]; subtract that from its bias. For a conv,
    E[x] per input channel is taken over positions, so the kernel's taps are summed (borders
    ignored). Returns the original biases for ``restore_biases``."""
    from cachequant.quant.layer import quant_hooks

    saved = {}
    for name, (m, hook) in quant_hooks(model).items():
        if m.bias is not None:
            dw = (hook.dequantized_weight(m).float() - m.weight.detach().float())
            dw = dw.sum(dim=(2, 3)) if dw.dim() == 4 else dw
            shift = dw @ means[name].float()
            saved[name] = m.bias.detach().clone()
            with torch.no_grad():
                m.bias.sub_(shift.to(m.bias.dtype))
    return saved


def restore_biases(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    mods = dict(model.named_modules())
    for name, b in saved.items():
        with torch.no_grad():
            mods[name].bias.copy_(b)


def main(argv: list[str] | None = None) -> int:
    from cachequant.cli.common import add_weights_option

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar10-unet")
    add_weights_option(p)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", default=None,
                   help="comma-separated group names to run (default: all; 'none' runs only W8A8 / W4A8)")
    p.add_argument("--gptq", action="store_true",
                   help="also W4A8 with GPTQ rounding (CacheQuantConfig.weight_rounding='gptq'), alone and with "
                        "the shortcut convs at 8 bits")
    p.add_argument("--joint", type=int, default=None, metavar="N",
                   help="also CacheQuant at interval N (DPS + DEC) with W8A8, W4A8 and W4A8 GPTQ + shortcut convs at 8 bits")
    p.add_argument("--bias-correction", action="store_true",
                   help="also W4A8 with each layer's bias corrected for the mean shift of its 4-bit weights")
    p.add_argument("--out", required=True, help="JSON output")
    args = p.parse_args(argv)
    if args.model != "cifar10-unet":
        raise SystemExit("the layer groups are written for UNet2DModel names; only --model cifar10-unet is supported")
    if args.groups is None:
        groups = UNET_GROUPS
    elif args.groups == "none":
        groups = {}
    else:
        unknown = [g for g in args.groups.split(",") if g not in UNET_GROUPS]
        if unknown:
            raise SystemExit(f"unknown --groups {unknown}; choose from: {', '.join(UNET_GROUPS)} (or 'none')")
        groups = {g: UNET_GROUPS[g] for g in args.groups.split(",")}

    import cachequant as cq
    from cachequant.metrics import psnr, ssim
    from cachequant.metrics.sampling import sample_indices
    from cachequant.pipecall import denoiser_of
    from cachequant.utils.io import atomic_path

    torch.manual_seed(0)
    pipe = cq.zoo.load_pipeline(args.model, weights=args.weights)
    _, model = denoiser_of(pipe)
    idx = list(range(args.num_samples))

    def images() -> np.ndarray:
        return sample_indices(pipe, idx, args.seed, args.steps)[0].astype(np.float64) / 255

    t0 = time.time()
    ref = images()
    print(f"full precision: {time.time() - t0:.1f} s")
    werr = weight_errors(model, 4)
    # (label, CacheQuantConfig fields over the quant-only base, bias-correction experiment?)
    variants: list[tuple[str, dict, bool]] = [("W8A8", {"weight_bits": 8}, False), ("W4A8", {"weight_bits": 4}, False)]
    variants += [(f"W4A8, {g} at 8 bits", {"weight_bits": 4, "w8_layers": tuple(pats)}, False)
                 for g, pats in groups.items()]
    shortcuts = tuple(UNET_GROUPS["skip / shortcut 1x1 convs"])
    if args.bias_correction:
        variants.append(("W4A8 + bias correction", {"weight_bits": 4}, True))
        in_means = input_means(pipe, model, args.steps, args.seed)
    if args.gptq:
        variants.append(("W4A8, GPTQ rounding", {"weight_bits": 4, "weight_rounding": "gptq"}, False))
        variants.append(("W4A8, GPTQ rounding, shortcut 1x1 convs at 8 bits",
                         {"weight_bits": 4, "weight_rounding": "gptq", "w8_layers": shortcuts}, False))
    if args.joint:
        joint = {"interval": args.joint, "schedule": "dps", "dec": True}
        variants += [(f"CacheQuant N={args.joint} (DPS + DEC), W8A8", {**joint, "weight_bits": 8}, False),
                     (f"CacheQuant N={args.joint} (DPS + DEC), W4A8", {**joint, "weight_bits": 4}, False),
                     (f"CacheQuant N={args.joint} (DPS + DEC), W4A8, GPTQ, shortcut 1x1 convs at 8 bits",
                      {**joint, "weight_bits": 4, "weight_rounding": "gptq", "w8_layers": shortcuts}, False)]
    rows = []
    for label, fields, bias_corr in variants:
        t0 = time.time()
        cfg = cq.CacheQuantConfig(**{"interval": 1, "schedule": "uniform", "act_bits": 8, "dec": False,
                                     "num_calib_samples": args.calib_samples, "calib_batch_size": args.calib_samples,
                                     "seed": args.seed, **fields})
        plan = cq.calibrate(pipe, cfg, num_inference_steps=args.steps)
        cq.accelerate(pipe, plan)
        saved = correct_biases(model, in_means) if bias_corr else {}
        try:
            out = images()
        finally:
            restore_biases(model, saved)
            cq.restore(pipe)
        pats = list(cfg.w8_layers)
        w8 = sum(r["params"] for r in werr if any(fnmatchcase(r["layer"], q) for q in pats))
        row = {"variant": label, "config": cfg.to_dict(), "weight_bits": cfg.weight_bits, "w8_layers": pats,
               "psnr_vs_fp": psnr(out, ref), "ssim_vs_fp": ssim(out, ref), "gptq_fit": plan.diagnostics.get("gptq"),
               "full_steps": len(plan.schedule), "params_kept_8bit": w8, "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{label:55s} PSNR {row['psnr_vs_fp']:6.2f} dB  SSIM {row['ssim_vs_fp']:.4f}  "
              f"({w8 / 1e6:.2f} M params kept at 8 bits, {row['seconds']} s)")
    total = sum(r["params"] for r in werr)
    worst = sorted(werr, key=lambda r: -r["rel_error"])[:12]
    print("\nlargest 4-bit weight errors (‖W − Q(W)‖ / ‖W‖):")
    for r in worst:
        print(f"  {r['layer']:50s} {r['rel_error']:.4f}  ({r['params']} params)")
    result = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "model": args.model, **cq.zoo.weights_record(args.model, args.weights), "steps": args.steps,
        "num_samples": args.num_samples,
        "calib_samples": args.calib_samples, "seed": args.seed, "total_params": total,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
                        "threads": torch.get_num_threads()},
        "variants": rows, "weight_errors_4bit": werr,
    }
    with atomic_path(Path(args.out)) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
