"""Which layers' 8-bit inputs cost the most, and what keeping them float buys back.

A better-trained model spreads its activations wider, so one per-tensor 8-bit range per step fits
some layer inputs worse. This script ranks every quantized Linear / Conv2d of a W8A8 plan by what
its input quantization does to its output, then checks the ranking end to end:

1. calibrate a quant-only W8A8 plan (the method's per-step, per-tensor activation ranges) and
   sample with it; at every call of every quantized layer, measure the output SQNR of the input's
   quantization error alone: ‖op(x)‖² / ‖op(Q(x) − x)‖² with the float weights (``op`` the layer's
   own conv / linear; weights are not quantized in this measurement), in dB, averaged over the
   calls, and the input SQNR ‖x‖² / ‖Q(x) − x‖²;
2. with ``--keep K1,K2,...``: W8A8 with the K lowest-ranked layers left float
   (``CacheQuantConfig.float_layers``), PSNR / SSIM against full precision from the same seeds;
3. with ``--split``: one part of W8A8 at a time — the plan's 8-bit weights alone, its 8-bit layer
   inputs alone, its 8-bit attention matmuls alone (the other parts computed in float) — to say
   which part the PSNR loss comes from.

    python benchmarks/act_sensitivity.py --model cifar10-unet --num-samples 16 --keep 4,8,16 --out sens.json

``--model`` takes a zoo name or a saved pipeline folder. PSNR on a few images is a proxy: it ranks,
it does not replace a 10k-sample FID. On 2 CPU cores about a minute per sampled variant with the
defaults.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _db(signal: torch.Tensor, noise: torch.Tensor) -> float:
    return float(10 * torch.log10(signal.float().pow(2).sum() / noise.float().pow(2).sum().clamp_min(1e-30)))


def layer_sensitivity(model: torch.nn.Module, sample) -> list[dict]:
    """Per quantized layer of the plan applied to ``model``: mean output and input SQNR (dB) of the
    input quantization over all calls made while ``sample()`` runs, lowest output SQNR first."""
    from cachequant.quant.layer import linear_op, quant_hooks

    out_db, in_db = defaultdict(list), defaultdict(list)

    def pre(name, hook):
        def f(module, args):
            x = args[0].detach()
            err = hook.quantize_input(module, x).float() - x.float()
            w = module.weight.detach().float()
            b = None if module.bias is None else module.bias.detach().float()
            out_db[name].append(_db(linear_op(module, x.float(), w, b), linear_op(module, err, w, None)))
            in_db[name].append(_db(x, err))
        return f

    handles = [m.register_forward_pre_hook(pre(n, h)) for n, (m, h) in quant_hooks(model).items()]
    try:
        with torch.no_grad():
            sample()
    finally:
        for h in handles:
            h.remove()
    rows = [{"layer": n, "output_sqnr_db": float(np.mean(v)), "input_sqnr_db": float(np.mean(in_db[n])),
             "calls": len(v)} for n, v in out_db.items()]
    return sorted(rows, key=lambda r: r["output_sqnr_db"])


@contextmanager
def only_part(part: str | None):
    """Nothing for None; else W8A8 with one part quantized: ``weights`` (layer inputs float), ``inputs`` (weights float),
    ``attention`` (both float); the attention matmuls follow the plan, so the first two take a plan
    calibrated without them. Patches the reference path's per-layer quantizers, which is what runs
    on the CPU, where this script runs."""
    from cachequant.quant.layer import QuantHook

    if part is None:
        yield
        return
    saved = QuantHook.quantize_input, QuantHook.dequantized_weight
    if part in ("weights", "attention"):
        QuantHook.quantize_input = lambda self, module, x: x
    if part in ("inputs", "attention"):
        QuantHook.dequantized_weight = lambda self, module: module.weight
    try:
        yield
    finally:
        QuantHook.quantize_input, QuantHook.dequantized_weight = saved


def main(argv: list[str] | None = None) -> int:
    from cachequant.cli.common import add_weights_option

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar10-unet", help="zoo name or saved pipeline folder")
    add_weights_option(p)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default="", help="comma-separated K: W8A8 with the K most sensitive layers float")
    p.add_argument("--split", action="store_true",
                   help="also the plan's 8-bit weights, layer inputs and attention matmuls one at a time")
    p.add_argument("--out", required=True, help="JSON output")
    args = p.parse_args(argv)
    try:
        keeps = [int(k) for k in args.keep.split(",") if k.strip()]
    except ValueError:
        raise SystemExit(f"--keep takes comma-separated integers, got {args.keep!r}") from None
    if any(k < 1 for k in keeps):
        raise SystemExit(f"--keep values must be >= 1, got {keeps}")

    import cachequant as cq
    from cachequant.cli.common import UsageError, load_pipeline
    from cachequant.metrics import psnr, ssim
    from cachequant.metrics.sampling import sample_indices
    from cachequant.pipecall import denoiser_of
    from cachequant.utils.io import atomic_path

    torch.manual_seed(0)
    try:
        pipe = load_pipeline(args.model, "cpu", None, args.weights)
    except UsageError as e:
        raise SystemExit(str(e)) from None
    pipe.set_progress_bar_config(disable=True)
    _, model = denoiser_of(pipe)
    idx = list(range(args.num_samples))

    def images() -> np.ndarray:
        return sample_indices(pipe, idx, args.seed, args.steps)[0].astype(np.float64) / 255

    def sampled(plan, part: str | None = None) -> np.ndarray:
        """The images with ``plan`` applied (only ``part`` of it quantized, see :func:`only_part`)."""
        cq.accelerate(pipe, plan)
        try:
            with only_part(part):
                return images()
        finally:
            cq.restore(pipe)

    def config(**fields) -> "cq.CacheQuantConfig":
        return cq.CacheQuantConfig(interval=1, schedule="uniform", weight_bits=8, act_bits=8, dec=False,
                                   num_calib_samples=args.calib_samples, calib_batch_size=args.calib_samples,
                                   seed=args.seed, **fields)

    t0 = time.time()
    ref = images()
    print(f"full precision: {time.time() - t0:.1f} s")
    plan = cq.calibrate(pipe, config(), num_inference_steps=args.steps, progress=False)
    cq.accelerate(pipe, plan)
    try:
        outs: list[np.ndarray] = []
        ranking = layer_sensitivity(model, lambda: outs.append(images()))
    finally:
        cq.restore(pipe)
    rows = [{"variant": "W8A8", "float_layers": [], "config": plan.config.to_dict(),
             "psnr_vs_fp": psnr(outs[0], ref), "ssim_vs_fp": ssim(outs[0], ref)}]
    print(f"{'W8A8':28s} PSNR {rows[0]['psnr_vs_fp']:6.2f} dB")
    for r in ranking[:12]:
        print(f"  {r['layer']:48s} output SQNR {r['output_sqnr_db']:5.1f} dB, input {r['input_sqnr_db']:5.1f} dB")
    for k in keeps:
        t0 = time.time()
        floats = [r["layer"] for r in ranking[:k]]
        plan_k = cq.calibrate(pipe, config(float_layers=tuple(floats)), num_inference_steps=args.steps, progress=False)
        out = sampled(plan_k)
        row = {"variant": f"W8A8, {k} most sensitive layers float", "float_layers": floats,
               "config": plan_k.config.to_dict(),
               "psnr_vs_fp": psnr(out, ref), "ssim_vs_fp": ssim(out, ref),
               "float_params": sum(model.get_submodule(n).weight.numel() for n in floats),
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{row['variant']:28s} PSNR {row['psnr_vs_fp']:6.2f} dB ({row['float_params'] / 1e3:.0f} k params float)")
    if args.split:
        plan_no_attn = cq.calibrate(pipe, config(quant_attention=False), num_inference_steps=args.steps,
                                    progress=False)
        for part, label, part_plan in [("weights", "8-bit weights only", plan_no_attn),
                                       ("inputs", "8-bit layer inputs only", plan_no_attn),
                                       ("attention", "8-bit attention matmuls only", plan)]:
            out = sampled(part_plan, part)
            rows.append({"variant": label, "float_layers": [], "config": part_plan.config.to_dict(),
                         "psnr_vs_fp": psnr(out, ref), "ssim_vs_fp": ssim(out, ref)})
            print(f"{label:28s} PSNR {rows[-1]['psnr_vs_fp']:6.2f} dB")
    result = {"model": args.model, **cq.zoo.weights_record(args.model, args.weights), "steps": args.steps,
              "num_samples": args.num_samples, "seed": args.seed,
              "calib_samples": args.calib_samples, "rows": rows, "ranking": ranking,
              "total_params": sum(m.weight.numel() for m in model.modules()
                                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))),
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "machine": platform.machine(), "threads": torch.get_num_threads()},
              "command": "python benchmarks/act_sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
