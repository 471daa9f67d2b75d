"""``cachequant`` command line: calibrate, generate, info, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..backends.options import ATTENTION, BACKENDS
from ..config import CALIBRATION_MODES, SCHEDULES, WEIGHT_ROUNDINGS
from ..models.tiny import SCHEDULERS
from .common import BITS, kernel_options, load_pipeline


def _inputs(args) -> dict:
    if args.prompts and args.class_labels:
        raise SystemExit("error: give --prompts or --class-labels, not both")
    if args.prompts:
        p = Path(args.prompts)
        if not p.is_file():
            raise SystemExit(f"error: prompts file not found: {p}")
        lines = [l.split("\t")[0].strip() for l in p.read_text().splitlines()]
        lines = [l for l in lines if l and l != "Prompt"]  # PartiPrompts.tsv has a header row
        if not lines:
            raise SystemExit(f"error: no prompts in {p}")
        return {"prompts": lines[: args.num_samples] if args.num_samples else lines}
    if args.class_labels:
        try:
            return {"class_labels": [int(c) for c in args.class_labels.split(",")]}
        except ValueError:
            raise SystemExit(f"error: --class-labels must be comma-separated integers, got {args.class_labels!r}")
    return {"num_samples": args.num_samples} if args.num_samples else {}


def cmd_calibrate(args) -> int:
    import cachequant as cq

    wb, ab = BITS[args.bits]
    cfg = cq.CacheQuantConfig(interval=args.interval, schedule=args.schedule, weight_bits=wb, act_bits=ab,
                              dec=not args.no_dec, cache_dec_slope=not args.cache_dec_shift_only,
                              calib_batch_size=args.batch_size, seed=args.seed,
                              calibration=args.calibration, calib_select=args.calib_select,
                              tap_lambda=args.tap_lambda, vc=args.vc,
                              w8_layers=tuple(p.strip() for p in args.w8_layers.split(",") if p.strip()),
                              weight_rounding=args.weight_rounding, cache_branch=args.cache_branch,
                              cache_layers=args.cache_layers)
    from ..distributed import barrier, init_from_env

    rank, world, device = init_from_env(args.device)
    pipe = load_pipeline(args.model, device, args.scheduler)
    t = time.time()
    plan = cq.calibrate(pipe, cfg, num_inference_steps=args.steps, progress=rank == 0, **_inputs(args))
    if rank == 0:
        plan.save(args.out)
        print(f"plan written to {args.out} in {time.time() - t:.1f} s ({world} process{'es' if world > 1 else ''}); "
              f"full steps: {plan.schedule}")
        reuse = plan.diagnostics.get("cache_reuse")
        if reuse:
            after = reuse.get("relative_l1_after_cache_dec")
            print(f"reused feature vs fresh one on the calibration trajectories: {100 * reuse['relative_l1']:.1f} % "
                  "relative L1" + (f", {100 * after:.1f} % after cache-DEC" if after is not None else ""))
    barrier()
    return 0


def _generate_images(pipe, args, seed: int):
    import numpy as np
    import torch

    from ..pipecall import call_pipeline, check_inputs, conditioning

    kind = conditioning(pipe)
    if kind == "prompt":
        if not args.prompt:
            raise SystemExit("error: this pipeline is text-conditioned: pass --prompt")
        batch = [args.prompt] * args.num_images
    elif kind == "class":
        labels = [int(c) for c in (args.class_labels or "0").split(",")]
        batch = (labels * args.num_images)[: args.num_images]
    else:
        batch = [None] * args.num_images
    out = call_pipeline(pipe, check_inputs(pipe, batch), num_inference_steps=args.steps,
                        generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return np.asarray(out.images)


def cmd_generate(args) -> int:
    import cachequant as cq
    from ..utils.io import save_grid

    pipe = load_pipeline(args.model, args.device, args.scheduler)
    if args.plan:
        cq.accelerate(pipe, cq.load_plan(args.plan), kernel_options(args))
    images = _generate_images(pipe, args, args.seed)
    save_grid([images], args.out, scale=args.scale)
    print(f"{len(images)} images written to {args.out}")
    return 0


def cmd_info(args) -> int:
    import cachequant as cq

    plan = cq.load_plan(args.plan)
    if args.json:
        print(json.dumps(plan.to_meta(), indent=2))
        return 0
    c, s, q = plan.config, plan.sampler, plan.quant
    bits = "full precision" if q is None else f"W{c.weight_bits}A{q.act_bits}"
    fp = plan.fingerprint
    print(f"cachequant plan {args.plan} (made by cachequant {plan.info.get('cachequant_version', '?')})")
    print(f"  model      {fp.cls} ({fp.dtype}, adapter {plan.info.get('adapter', '?')}), weights sha256 "
          f"{fp.weights_sha256[:16]}...")
    print(f"  sampler    {s.scheduler}, {s.num_inference_steps} steps = {s.num_calls} model calls"
          + (f", runs start at position {s.begin}" if s.begin else ""))
    print(f"  cache      {plan.cache.kind}, interval {c.interval}, schedule {c.schedule}, site {plan.cache.site}")
    print(f"  full steps {list(plan.cache.schedule)} ({len(plan.cache.schedule)}/{s.num_calls - s.begin})")
    print(f"  quant      {bits}" + ("" if q is None else f", {len(q.layers)} layers, {len(q.attention)} attention modules"))
    print(f"  DEC        cache {'on' if 'cache_dec' in plan.tensors else 'off'}, quant layers "
          f"{[layer.name for layer in q.layers if layer.dec] if q else []}")
    print(f"  VC         {'on' if plan.vc else 'off'}")
    for k, v in plan.diagnostics.items():
        print(f"  {k}: {json.dumps(v)}")
    print(f"  tensors    {len(plan.tensors)}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachequant", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(sp):
        sp.add_argument("--model", default="cifar10-unet",
                        help="cifar10-unet | cifar10-dit | tiny-ddim | tiny-sd | tiny-dit | a diffusers pipeline folder")
        sp.add_argument("--scheduler", choices=list(SCHEDULERS), default=None,
                        help="replace the pipeline's scheduler (default: keep it)")
        sp.add_argument("--steps", type=int, default=50, help="num_inference_steps")
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--seed", type=int, default=0)

    def backend_arg(sp):
        sp.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="how quantized layers run: fake-quant reference, Triton INT8/FP8 kernels (CUDA), "
                             "or auto (int8 on a CUDA GPU, else fake)")
        sp.add_argument("--kernel-attention", choices=ATTENTION, default="sdpa",
                        help="with a kernel backend: fused float SDPA attention (fast), or the plan's 8-bit "
                             "attention matmuls (what the fake-quant reference computes)")
        sp.add_argument("--drop-float-weights", action="store_true",
                        help="with a kernel backend: free the float weights of the layers the kernels run "
                             "(8-bit weights only in memory)")

    c = sub.add_parser("calibrate", help="calibrate a plan and save it")
    model_args(c)
    c.add_argument("--interval", type=int, default=5)
    c.add_argument("--schedule", choices=SCHEDULES, default="dps")
    c.add_argument("--bits", choices=list(BITS), default="w8a8")
    c.add_argument("--no-dec", action="store_true", help="disable decoupled error correction")
    c.add_argument("--cache-dec-shift-only", action="store_true",
                   help="cache-DEC fits a per-channel shift only (slope fixed to 1): for stochastic samplers "
                        "such as DDPM, where the fitted slope shrinks the reused feature (results/ablation.md)")
    site = c.add_mutually_exclusive_group()
    site.add_argument("--cache-layers", type=int, default=None,
                      help="UNets: up layers run on cached steps (default: 1 for SD-style UNets, DeepCache's "
                           "shallowest branch; the whole last up block for UNet2DModel)")
    site.add_argument("--cache-branch", type=int, default=None, help="UNets: whole up blocks run on cached steps")
    c.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS, default="nearest",
                   help="gptq: round weights with GPTQ (input-Hessian error feedback; needed for usable W4A8)")
    c.add_argument("--w8-layers", default="",
                   help="with --bits w4a8: comma-separated module-name globs kept at 8-bit weights "
                        "(e.g. 'time_embedding.*,*.time_emb_proj'); conv_in / conv_out always are")
    c.add_argument("--calibration", default="trajectory",
                   choices=CALIBRATION_MODES,
                   help="which intermediate inputs calibrate the activation ranges (Q&C: tap)")
    c.add_argument("--calib-select", type=int, default=256, help="entries selected from the pool (not 'trajectory')")
    c.add_argument("--tap-lambda", type=float, default=0.5)
    c.add_argument("--vc", action="store_true", help="variance compensation (Q&C)")
    c.add_argument("--prompts", help="text file (one prompt per line) or PartiPrompts.tsv")
    c.add_argument("--class-labels", help="comma-separated class ids")
    c.add_argument("--num-samples", type=int, default=None, help="calibration trajectories")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--out", required=True, help="plan file to write (.cqplan)")
    c.set_defaults(fn=cmd_calibrate)

    g = sub.add_parser("generate", help="generate images (with a plan, or full precision without)")
    model_args(g)
    g.add_argument("--plan")
    backend_arg(g)
    g.add_argument("--prompt")
    g.add_argument("--class-labels")
    g.add_argument("--num-images", type=int, default=4)
    g.add_argument("--scale", type=int, default=1, help="upscale factor of the saved grid")
    g.add_argument("--out", required=True, help="PNG grid to write")
    g.set_defaults(fn=cmd_generate)

    i = sub.add_parser("info", help="describe a plan file")
    i.add_argument("plan")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    e = sub.add_parser("evaluate", help="sample N images (seeded shards, resumable, torchrun-aware) and compute metrics")
    model_args(e)
    e.add_argument("--plan", help="plan file; without it, full precision")
    backend_arg(e)
    e.add_argument("--num-samples", type=int, required=True)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--shard-size", type=int, default=500)
    e.add_argument("--guidance-scale", type=float, default=None)
    e.add_argument("--ref-stats", help=".npz from `cachequant ref-stats` (FID, precision, recall)")
    e.add_argument("--fp-dir", help="out-dir of a full-precision evaluate run with the same seeds (PSNR, SSIM)")
    e.add_argument("--out-dir", required=True)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(fn=lambda a: __import__("cachequant.cli.evaluate", fromlist=["x"]).run_evaluate(a))

    r = sub.add_parser("ref-stats", help="Inception reference statistics of a dataset (zip, folder or .npz)")
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--limit", type=int, default=None)
    r.add_argument("--device", default="cpu")
    r.set_defaults(fn=lambda a: __import__("cachequant.cli.evaluate", fromlist=["x"]).run_ref_stats(a))

    d = sub.add_parser("demo", help="the README's main job: calibrate, compare with full precision, save a grid")
    d.add_argument("--model", default="cifar10-unet")
    d.add_argument("--steps", type=int, default=100)
    d.add_argument("--interval", type=int, default=10)
    d.add_argument("--bits", choices=list(BITS), default="w8a8")
    d.add_argument("--weight-rounding", choices=["auto", "nearest", "gptq"], default="auto",
                   help="auto: gptq for 4-bit weights (nearest-rounded W4A8 collapses the CIFAR UNet), else nearest")
    d.add_argument("--num-images", type=int, default=8)
    d.add_argument("--out", default="cachequant-demo.png")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import PlanError, PlanMismatchError

    try:
        return args.fn(args)
    except (PlanError, PlanMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
