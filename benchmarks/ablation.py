"""Ablation tables of the CacheQuant and Q&C issues on the shipped CIFAR-10 models.

Three steps, each resumable (every result is written atomically as soon as it exists, a rerun
skips what is done, a crash in one variant is recorded and the next variant runs):

    python benchmarks/ablation.py sample  --table unet --num-samples 5000 --batch-size 2500 --device cuda --work runs/ablation
    python benchmarks/ablation.py metrics --table unet --work runs/ablation --ref-stats cifar10-train.npz --device cuda
    python benchmarks/ablation.py report  --work runs/ablation --out results/

Tables: ``unet`` (cifar10-unet, DDIM 100), ``dit-ddpm250`` / ``dit-ddim50`` (cifar10-dit, guidance
1.5, labels = index % 10) and ``qandc`` (cifar10-dit, DDIM 50, N = 3, W8A8: the Q&C paper's
ablations on our model), ``qandc-unet`` (its main rows on cifar10-unet, N = 10).

Why it is built this way: GPU time is scarce, so (1) every variant samples the *same* seeds as
``cachequant evaluate`` (``cachequant.metrics.sampling``: sample *i* gets its own generator and
label ``i % num_classes`` whatever the batch size), which makes PSNR/SSIM against full precision
meaningful and lets two variants with the identical configuration — within a table or across
tables (``qandc``'s fp / baseline are ``dit-ddim50``'s fp / naive N = 3) — share one sampling run
(``same_as`` in info.json); (2) samples are written in seeded shards and the plan is saved before
sampling, so a killed run resumes mid-variant without recalibrating; (3) the metrics step does the
Inception forward passes and the precision/recall distance matrices on the GPU and the CPU-only
parts (Fréchet distance's ``sqrtm``, SSIM) in a process pool.

Layout of ``--work DIR``::

    DIR/<table>/<variant>/info.json       config, schedule, calibration / sampling seconds, MACs, Bops
    DIR/<table>/<variant>/samples.npz     uint8 images + labels (absent for a same_as variant)
    DIR/<table>/<variant>/plan.cqplan     the calibrated plan (reused on a rerun)
    DIR/<table>/<variant>/error.json      traceback of a failed attempt (removed once it succeeds)
    DIR/<table>/<variant>/metrics.json    FID, precision, recall, PSNR / SSIM vs the table's fp
    DIR/<table>/sample-status.json        what the last ``sample`` run did / skipped / failed
    DIR/<table>.json                      everything of the table + environment (written by ``metrics``)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------
# Table definitions
# --------------------------------------------------------------------------------------------

NO_QUANT = {"weight_bits": None, "act_bits": None}


@dataclass
class Variant:
    slug: str
    label: str
    config: dict | None
    """CacheQuantConfig overrides on top of the table's base; None = full precision (no plan)."""


@dataclass
class Table:
    name: str
    title: str
    model: str
    scheduler: str
    steps: int
    guidance_scale: float | None
    variants: list[Variant] = field(default_factory=list)

    def variant(self, slug: str) -> Variant:
        for v in self.variants:
            if v.slug == slug:
                return v
        raise KeyError(f"table {self.name} has no variant {slug!r}; variants: {', '.join(v.slug for v in self.variants)}")


def _cache_quant_variants(intervals_cache: list[int], intervals_joint: list[int], w4: bool,
                          dec_halves: tuple[int, ...] = (), shift_dec: tuple[int, ...] = ()) -> list[Variant]:
    """The CacheQuant issue's ablation rows: cache only, quant only, naive joint, +DPS, +DPS+DEC;
    then, at the intervals in ``dec_halves``, DPS with one half of DEC each (which half closes the
    gap to full precision: on the UNet, DPS + DEC at N = 10 beat quant-only W8A8 on FID); last, at
    the intervals in ``shift_dec``, DPS + DEC with a shift-only cache-DEC (does the fitted slope's
    shrinkage cost the FID that DEC loses under DDPM 250?)."""
    vs = [Variant("fp", "full precision", None)]
    for n in intervals_cache:
        vs.append(Variant(f"cache-n{n}", f"cache only, uniform N={n}",
                          dict(interval=n, schedule="uniform", dec=False, **NO_QUANT)))
    vs.append(Variant("w8a8", "quant only W8A8", dict(interval=1, schedule="uniform", dec=False)))
    if w4:
        vs.append(Variant("w4a8", "quant only W4A8", dict(interval=1, schedule="uniform", weight_bits=4, dec=False)))
        vs.append(Variant("w4a8-gptq", "quant only W4A8, GPTQ rounding",
                          dict(interval=1, schedule="uniform", weight_bits=4, dec=False, weight_rounding="gptq")))
        vs.append(Variant("w4a8-gptq-mixed", "quant only W4A8, GPTQ rounding, shortcut 1×1 convs at 8 bits",
                          dict(interval=1, schedule="uniform", weight_bits=4, dec=False, weight_rounding="gptq",
                               w8_layers=("*.conv_shortcut",))))
    for n in intervals_joint:
        vs.append(Variant(f"naive-n{n}", f"naive cache N={n} + W8A8", dict(interval=n, schedule="uniform", dec=False)))
    for n in intervals_joint:
        vs.append(Variant(f"dps-n{n}", f"+ DPS (N={n}, W8A8)", dict(interval=n, schedule="dps", dec=False)))
    for n in intervals_joint:
        vs.append(Variant(f"dps-dec-n{n}", f"+ DPS + DEC (N={n}, W8A8)", dict(interval=n, schedule="dps", dec=True)))
    for n in dec_halves:
        vs.append(Variant(f"dps-cachedec-n{n}", f"+ DPS + cache-DEC only (N={n}, W8A8)",
                          dict(interval=n, schedule="dps", dec=True, quant_dec=False)))
        vs.append(Variant(f"dps-quantdec-n{n}", f"+ DPS + quantization-DEC only (N={n}, W8A8)",
                          dict(interval=n, schedule="dps", dec=True, cache_dec=False)))
    for n in shift_dec:
        vs.append(Variant(f"dps-shiftdec-n{n}", f"+ DPS + DEC, shift-only cache-DEC (N={n}, W8A8)",
                          dict(interval=n, schedule="dps", dec=True, cache_dec_slope=False)))
    return vs


def _qandc_main(n: int) -> list[Variant]:
    """Q&C's main rows at cache interval ``n``, W8A8; the baseline is uniform caching + W8A8 with
    the default calibration (``CacheQuantConfig.calibration = "trajectory"``: every step of every
    calibration trajectory), no DEC; last, the union with CacheQuant."""
    base = dict(interval=n, schedule="uniform", dec=False)
    return [Variant("fp", "full precision", None),
            Variant("baseline", f"cache N={n} + W8A8 (trajectory calibration)", dict(base)),
            Variant("tap", "+ TAP", dict(base, calibration="tap")),
            Variant("vc", "+ VC", dict(base, vc=True)),
            Variant("tap-vc", "+ TAP + VC", dict(base, calibration="tap", vc=True)),
            Variant("union", "DPS + DEC + TAP + VC", dict(base, schedule="dps", dec=True, calibration="tap", vc=True))]


def _qandc_unet_variants() -> list[Variant]:
    """Does Q&C transfer to the UNet? Its main rows at the UNet table's N = 10."""
    return _qandc_main(10)


def _qandc_variants() -> list[Variant]:
    """Q&C's ablations on the DiT at N = 3: the main rows first, then the comparisons, so that a
    time-budgeted run samples what matters most first."""
    base = dict(interval=3, schedule="uniform", dec=False)
    vs = _qandc_main(3)
    for m in ("random", "uniform-per-step", "kmeans", "dbscan", "agglomerative", "tap"):
        vs.append(Variant(f"calib-{m}", f"calibration selection: {m}", dict(base, calibration=m)))
    for lam in (0.3, 0.4, 0.5, 0.6, 0.7):
        vs.append(Variant(f"tap-lam{lam}", f"TAP λ={lam}", dict(base, calibration="tap", tap_lambda=lam)))
    return vs


TABLES: dict[str, Table] = {
    "unet": Table("unet", "CIFAR-10 UNet, DDIM 100 steps", "cifar10-unet", "ddim", 100, None,
                  _cache_quant_variants([5, 10, 20], [10, 20], w4=True, dec_halves=(10,))),
    "dit-ddpm250": Table("dit-ddpm250", "CIFAR-10 DiT, DDPM 250 steps, guidance 1.5", "cifar10-dit", "ddpm", 250, 1.5,
                         _cache_quant_variants([2, 3, 5], [2, 3], w4=False, shift_dec=(2, 3))),
    "dit-ddim50": Table("dit-ddim50", "CIFAR-10 DiT, DDIM 50 steps, guidance 1.5", "cifar10-dit", "ddim", 50, 1.5,
                        _cache_quant_variants([2, 3, 5], [2, 3], w4=False)),
    "qandc": Table("qandc", "Q&C ablations: CIFAR-10 DiT, DDIM 50 steps, N = 3, W8A8, guidance 1.5", "cifar10-dit",
                   "ddim", 50, 1.5, _qandc_variants()),
    "qandc-unet": Table("qandc-unet", "Q&C on the UNet: CIFAR-10 UNet, DDIM 100 steps, N = 10, W8A8", "cifar10-unet",
                        "ddim", 100, None, _qandc_unet_variants()),
}

REPORT_FILES = {"ablation": ["unet", "dit-ddpm250", "dit-ddim50"], "qandc": ["qandc", "qandc-unet"]}

JPEG_NOTE = ("The CIFAR FID here is against the JPEG-q75 re-encoding of CIFAR-10 (`shared/data/cifar10`), computed "
             "with the early-stage shipped models: it is not comparable to published CIFAR-10 FIDs.")

# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temporary file + rename): a crash never leaves a half-written file."""
    from cachequant.utils.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _sync(device: str) -> None:
    """Wall-clock timings on CUDA need the queued kernels finished."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def environment(device: str) -> dict:
    """Versions and device, recorded with every result (numbers without them are not reproducible)."""
    import diffusers
    import torch

    import cachequant as cq

    if device.startswith("cuda") and torch.cuda.is_available():
        dev_name = torch.cuda.get_device_name(torch.device(device))
    else:
        from cachequant.utils.cpus import usable_cpus

        dev_name = f"CPU ({platform.processor() or platform.machine()}, {usable_cpus()} usable cores)"
    return {"device": dev_name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cachequant": cq.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "command": " ".join([Path(sys.executable).name] + sys.argv)}


def calib_settings(args) -> dict:
    """CacheQuantConfig calibration fields shared by every variant of a run (same calibration data)."""
    return {"num_calib_samples": args.calib_samples, "calib_batch_size": args.calib_batch_size,
            "dps_samples": args.dps_samples, "calib_select": args.calib_select, "seed": args.calib_seed}


def full_config(variant: Variant, calib: dict) -> dict | None:
    """The complete CacheQuantConfig dict of a variant (validated by constructing it)."""
    import cachequant as cq

    if variant.config is None:
        return None
    return cq.CacheQuantConfig(**{**calib, **variant.config}).to_dict()


def run_key(table: Table, variant: Variant, args, steps: int, model: str) -> dict:
    """Everything the images of a variant depend on; equal keys = identical samples (shared)."""
    return {"model": model, "scheduler": table.scheduler, "steps": steps, "guidance_scale": table.guidance_scale,
            "num_samples": args.num_samples, "seed": args.seed, "config": full_config(variant, calib_settings(args)),
            "backend": getattr(args, "backend", "fake"),
            # kernel backends only (the reference path always runs the plan's attention)
            **({"kernel_attention": args.kernel_attention} if getattr(args, "backend", "fake") != "fake" else {}),
            # TF32 matmuls change every float matmul's rounding, so samples of the two settings never mix
            **({"matmul_tf32": True} if getattr(args, "matmul_tf32", False) else {})}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def is_done(vdir: Path) -> bool:
    info = read_json(vdir / "info.json")
    if not info or info.get("status") != "done":
        return False
    return "same_as" in info or (vdir / "samples.npz").is_file()


def resolve_samples(work: Path, vdir: Path) -> Path | None:
    """Folder holding the samples of a variant (following ``same_as``), or None if not sampled."""
    for _ in range(4):
        info = read_json(vdir / "info.json")
        if not info or info.get("status") != "done":
            return None
        if "same_as" not in info:
            return vdir if (vdir / "samples.npz").is_file() else None
        vdir = work / info["same_as"]
    return None


def find_same(work: Path, khash: str, exclude: Path) -> Path | None:
    """A finished variant (any table) with the same run key: its samples are ours."""
    for info_path in sorted(work.glob("*/*/info.json")):
        vdir = info_path.parent
        if vdir == exclude:
            continue
        info = read_json(info_path)
        if info and info.get("status") == "done" and info.get("run_key_hash") == khash and "same_as" not in info:
            if (vdir / "samples.npz").is_file():
                return vdir
    return None


# --------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------


def load_pipe(model: str, device: str, scheduler: str):
    """Same loader as the CLI (zoo, tiny or folder), so the pipelines are the ones `evaluate` uses."""
    from cachequant.cli.common import load_pipeline

    pipe = load_pipeline(model, device, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def calibrate_variant(pipe, table: Table, cfg: dict, steps: int, args, vdir: Path):
    """Calibrates (or reloads the plan of an interrupted earlier attempt) and times it."""
    import cachequant as cq
    from cachequant.pipecall import conditioning, num_classes

    plan_path, calib_path = vdir / "plan.cqplan", vdir / "calibration.json"
    calib_info = read_json(calib_path)
    if plan_path.is_file() and calib_info and calib_info.get("config") == cfg:
        return cq.load_plan(plan_path), calib_info
    config = cq.CacheQuantConfig.from_dict(cfg)
    kw: dict = {}
    if conditioning(pipe) == "class":  # the same labels the CLI's default uses, explicit for the record
        kw["class_labels"] = [i % num_classes(pipe) for i in range(config.num_calib_samples)]
    else:
        kw["num_samples"] = config.num_calib_samples
    pk = {} if table.guidance_scale is None else {"guidance_scale": table.guidance_scale}
    _sync(args.device)
    t = time.time()
    plan = cq.calibrate(pipe, config, num_inference_steps=steps, pipeline_kwargs=pk, progress=not args.quiet, **kw)
    _sync(args.device)
    calib_info = {"config": cfg, "seconds": time.time() - t, "inputs": {k: (v if k == "num_samples" else len(v))
                                                                          for k, v in kw.items()},
                  "pipeline_kwargs": pk, "schedule": plan.schedule, "diagnostics": plan.diagnostics}
    plan.save(plan_path)
    write_json(calib_path, calib_info)
    return plan, calib_info


def sample_oom_safe(pipe, idx: list[int], seed: int, steps: int, kw: dict, device: str) -> tuple[np.ndarray, np.ndarray]:
    """``sample_indices`` on a batch; on CUDA out-of-memory, the two halves separately (same images:
    every index has its own generator), so a too-large --batch-size costs time, not the variant."""
    import torch

    from cachequant.metrics.sampling import sample_indices

    try:
        return sample_indices(pipe, idx, seed, steps, kw)
    except torch.OutOfMemoryError:
        if len(idx) == 1:
            raise
    torch.cuda.empty_cache()
    print(f"out of memory at batch {len(idx)}: splitting it in two", file=sys.stderr, flush=True)
    h = len(idx) // 2
    a, b = sample_oom_safe(pipe, idx[:h], seed, steps, kw, device), sample_oom_safe(pipe, idx[h:], seed, steps, kw, device)
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])


def sample_variant(pipe, table: Table, variant: Variant, args, steps: int, model: str, vdir: Path) -> dict:
    """Calibrate (if needed), accelerate, count ops, sample all seeds in shards, merge, write info."""
    import torch
    from tqdm.auto import tqdm

    import cachequant as cq
    from cachequant.metrics.macs import count_ops, weight_storage_bits
    from cachequant.metrics.sampling import ShardSpec, merge_shards, sample_indices, shard_path, write_shard
    from cachequant.pipecall import denoiser_of
    from cachequant.utils.io import atomic_path

    key = run_key(table, variant, args, steps, model)
    cfg = key["config"]
    vdir.mkdir(parents=True, exist_ok=True)
    plan, calib_info = (None, None) if cfg is None else calibrate_variant(pipe, table, cfg, steps, args, vdir)
    kw = {} if table.guidance_scale is None else {"guidance_scale": table.guidance_scale}
    _, model_mod = denoiser_of(pipe)
    if plan is not None:
        cq.accelerate(pipe, plan, backend=args.backend, attention=args.kernel_attention)
    try:
        with torch.inference_mode():
            with count_ops(model_mod) as ops:  # one image, as `cachequant evaluate` counts
                sample_indices(pipe, [0], args.seed, steps, kw)
            # shards of batch_size consecutive indices; a rerun with the same settings resumes
            shard_dir = vdir / "shards"
            spec = ShardSpec(args.num_samples, args.batch_size)
            shard_cfg = {"run_key": key, "shard_size": args.batch_size}
            old = read_json(shard_dir / "run.json")
            if old is not None and old != shard_cfg:
                shutil.rmtree(shard_dir)  # partial shards of other settings: unusable
            shard_dir.mkdir(parents=True, exist_ok=True)
            for stale in shard_dir.glob(".shard-*"):
                stale.unlink(missing_ok=True)
            write_json(shard_dir / "run.json", shard_cfg)
            todo = [s for s in range(spec.num_shards) if not shard_path(shard_dir, s).exists()]
            _sync(args.device)
            t0 = time.time()
            n_done = 0
            with tqdm(total=sum(len(spec.indices(s)) for s in todo), desc=f"{table.name}/{variant.slug}",
                      disable=args.quiet) as bar:
                for s in todo:
                    idx = spec.indices(s)
                    im, lb = sample_oom_safe(pipe, idx, args.seed, steps, kw, args.device)
                    write_shard(shard_path(shard_dir, s), im, lb, idx)
                    n_done += len(idx)
                    bar.update(len(idx))
            _sync(args.device)
            t_sample = time.time() - t0
        images, labels = merge_shards(shard_dir, spec)
        with atomic_path(vdir / "samples.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, labels=labels)
        info = {"status": "done", "table": table.name, "variant": variant.slug, "label": variant.label,
                "run_key": key, "run_key_hash": key_hash(key), "config": cfg,
                "schedule": None if plan is None else plan.schedule,
                "num_calls": None if plan is None else plan.num_calls,
                "calibration_seconds": None if calib_info is None else calib_info["seconds"],
                "calibration": None if calib_info is None else {k: v for k, v in calib_info.items() if k != "config"},
                "sampling_seconds": t_sample, "sampled_this_run": n_done, "resumed": n_done < args.num_samples,
                "images_per_second": n_done / t_sample if t_sample > 0 and n_done else None,
                "batch_size": args.batch_size, "num_samples": int(len(images)),
                "macs_per_image": ops.macs, "bops_per_image": ops.bops,
                "weight_storage_bytes": weight_storage_bits(model_mod) / 8, "environment": environment(args.device)}
    finally:
        if plan is not None and cq.is_accelerated(pipe):
            cq.restore(pipe)
    write_json(vdir / "info.json", info)  # the "done" marker: written last
    shutil.rmtree(vdir / "shards", ignore_errors=True)
    (vdir / "error.json").unlink(missing_ok=True)
    return info


def run_sample(args) -> int:
    """Runs every (selected) variant of a table in order, fp first; see the module docstring."""
    import torch

    table = TABLES[args.table]
    steps = args.steps or table.steps
    model = args.model or table.model
    work = Path(args.work)
    tdir = work / table.name
    tdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.matmul_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    only = [s for s in args.only.split(",") if s] if args.only else None
    if only:
        for s in only:
            table.variant(s)  # unknown slug: fail before any GPU work
        only = ["fp"] + [s for s in only if s != "fp"]  # fp first: every other variant is compared to it
    variants = [v for v in table.variants if only is None or v.slug in only]
    for v in variants:  # invalid configurations fail before any GPU work, not after an hour
        full_config(v, calib_settings(args))
    status: dict = {"table": table.name, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": steps,
                    "model": model, "num_samples": args.num_samples, "batch_size": args.batch_size,
                    "time_budget_s": args.time_budget_s, "calibration": calib_settings(args),
                    "environment": environment(args.device), "done_before": [], "done": [], "shared": {},
                    "skipped_time_budget": [], "failed": {}}
    status_path = tdir / "sample-status.json"
    write_json(status_path, status)
    # metrics right after each variant: the CPU parts overlap with the next variant's sampling, and a
    # session that ends early still has the metrics of what it sampled
    metrics = None if not args.ref_stats else MetricsRunner(work, table, args.ref_stats, args.device,
                                                            quiet=args.quiet, fid_bootstrap=args.fid_bootstrap)
    t_start = time.time()
    pipe = None
    for v in variants:
        vdir = tdir / v.slug
        if is_done(vdir):
            have = (read_json(vdir / "info.json") or {}).get("run_key_hash")
            want = key_hash(run_key(table, v, args, steps, model))
            if have not in (None, want):  # e.g. samples carried from another session's run (carry_variant.py)
                status["failed"][v.slug] = (f"{vdir} holds samples of other settings (run key {have}, these arguments "
                                            f"give {want}); move it away or rerun with that run's arguments")
                print(f"[{table.name}/{v.slug}] FAILED: {status['failed'][v.slug]}", file=sys.stderr, flush=True)
                write_json(status_path, status)
                continue
            status["done_before"].append(v.slug)
            print(f"[{table.name}/{v.slug}] already done, skipped", flush=True)
            if metrics is not None:
                metrics.submit(v)
            continue
        if args.time_budget_s is not None and time.time() - t_start > args.time_budget_s:
            status["skipped_time_budget"].append(v.slug)
            print(f"[{table.name}/{v.slug}] not started: time budget of {args.time_budget_s:.0f} s spent", flush=True)
            write_json(status_path, status)
            continue
        key = run_key(table, v, args, steps, model)
        same = find_same(work, key_hash(key), vdir)
        if same is not None:
            ref = str(same.relative_to(work))
            write_json(vdir / "info.json", {"status": "done", "table": table.name, "variant": v.slug, "label": v.label,
                                            "same_as": ref, "run_key": key, "run_key_hash": key_hash(key)})
            status["shared"][v.slug] = ref
            print(f"[{table.name}/{v.slug}] identical to {ref}: shares its samples", flush=True)
            write_json(status_path, status)
            if metrics is not None:
                metrics.submit(v)
            continue
        print(f"[{table.name}/{v.slug}] {v.label}", flush=True)
        try:
            if pipe is None:
                pipe = load_pipe(model, args.device, table.scheduler)
            info = sample_variant(pipe, table, v, args, steps, model, vdir)
            status["done"].append(v.slug)
            cal = info["calibration_seconds"]
            print(f"[{table.name}/{v.slug}] done: sampling {info['sampling_seconds']:.1f} s"
                  + (f", calibration {cal:.1f} s" if cal is not None else "")
                  + f", {info['macs_per_image'] / 1e9:.1f} GMAC/image", flush=True)
        except Exception as e:  # noqa: BLE001 - one variant's failure must not cost the others
            tb = traceback.format_exc()
            print(f"[{table.name}/{v.slug}] FAILED: {type(e).__name__}: {e}\n{tb}", file=sys.stderr, flush=True)
            write_json(vdir / "error.json", {"error": f"{type(e).__name__}: {e}", "traceback": tb,
                                             "time": time.strftime("%Y-%m-%d %H:%M:%S")})
            status["failed"][v.slug] = f"{type(e).__name__}: {e}"
            pipe = None  # a fresh pipeline for the next variant: no half-installed hooks survive
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        write_json(status_path, status)
        if metrics is not None and v.slug in status["done"]:
            metrics.submit(v)
    status["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    status["wall_seconds"] = time.time() - t_start
    if metrics is not None and metrics.finish():
        status["failed"]["metrics"] = f"{metrics.failed} variant(s), see their metrics.json"
    write_json(status_path, status)
    print(json.dumps({k: status[k] for k in ("done_before", "done", "shared", "skipped_time_budget", "failed")}))
    return 1 if status["failed"] else 0


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def file_hash(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def features_of(sdir: Path, device: str, batch_size: int, quiet: bool) -> np.ndarray:
    """Inception pool3 features of a sample folder, computed once (GPU, batched) and kept next to
    the samples: shared variants and reruns reuse them."""
    from cachequant.metrics.fid import inception_features
    from cachequant.utils.io import atomic_path

    path = sdir / "inception.npz"
    shash = file_hash(sdir / "samples.npz")
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["samples_sha1"]) == shash:
                return z["features"]
    images = np.load(sdir / "samples.npz", allow_pickle=False)["images"]
    feats = inception_features(images, device=device, batch_size=batch_size, progress=not quiet)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=feats, samples_sha1=np.array(shash))
    return feats


def _cpu_metrics(feats: np.ndarray | None, mu: np.ndarray | None, sigma: np.ndarray | None, samples: str,
                 fp_samples: str | None) -> dict:
    """The CPU-bound part (Fréchet distance's sqrtm, PSNR, SSIM), run in worker processes."""
    from cachequant.metrics import psnr, ssim
    from cachequant.metrics.fid import feature_stats, frechet_distance

    out: dict = {}
    if feats is not None:
        # A failure here must not take PSNR / SSIM down with it (it did once: a SciPy API change).
        try:
            out["fid"] = frechet_distance(*feature_stats(feats), mu, sigma)
        except Exception as e:  # noqa: BLE001
            out["fid_error"] = f"{type(e).__name__}: {e}"[:300]
    if fp_samples is not None:
        a = np.load(samples, allow_pickle=False)["images"]
        b = np.load(fp_samples, allow_pickle=False)["images"]
        if a.shape != b.shape:
            out["psnr_error"] = f"shapes differ: {a.shape} vs fp {b.shape}"
        elif samples == fp_samples:  # the reference itself: PSNR would be infinite (strict JSON has no inf)
            out["psnr_vs_fp"], out["ssim_vs_fp"], out["is_fp_reference"] = None, None, True
        else:
            a64, b64 = a.astype(np.float64) / 255, b.astype(np.float64) / 255
            out["psnr_vs_fp"], out["ssim_vs_fp"] = psnr(a64, b64), ssim(a64, b64)
    return out


def _limit_threads(n: int) -> None:
    """Worker initializer: n BLAS / OpenMP threads, so that parallel workers do not fight for cores."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n)


def _timed_cpu_metrics(*args) -> tuple[dict, float]:
    t0 = time.time()
    out = _cpu_metrics(*args)
    return out, time.time() - t0


class PRReference:
    """Reference features and their k-NN radii on the device, computed once per metrics run; the
    package's own precision/recall code (``metrics.prdc``) run on GPU tensors."""

    def __init__(self, ref_features: np.ndarray, device: str, k: int = 3):
        self.features, self.device, self.k = ref_features, device, k
        self._cache: dict[int, tuple] = {}

    def __call__(self, fake: np.ndarray, chunk: int = 1024) -> tuple[float, float, int]:
        import torch

        from cachequant.metrics.prdc import kth_radii, precision_recall

        n = min(len(fake), len(self.features))  # as `cachequant evaluate`: equal set sizes
        if n <= self.k:
            raise ValueError(f"precision/recall needs more than {self.k} samples, have {n}")
        if n not in self._cache:
            r = torch.as_tensor(np.asarray(self.features[:n]), dtype=torch.float64, device=self.device)
            self._cache[n] = (r, kth_radii(r, self.k, chunk))
        r, r_rad = self._cache[n]
        precision, recall = precision_recall(r, fake[:n], self.k, chunk, device=self.device, real_radii=r_rad)
        return precision, recall, n


class MetricsRunner:
    """Metrics of a table's variants, one variant at a time: the device parts (Inception features,
    precision / recall) at once, the CPU parts (Fréchet distance's sqrtm, PSNR / SSIM) in a process
    pool, and every variant's ``metrics.json`` written as soon as a part of it is known, with a
    timing line per step. A run killed midway keeps what it finished. (The first version wrote
    nothing before the end and sized its BLAS threads by ``os.cpu_count()``, which in a container
    can be the host's core count; on the lent 16-CPU machine it was killed after 4 minutes with
    nothing written, cause not established.)

    Used by ``metrics`` over a whole table and by ``sample --ref-stats`` after each variant, so that
    the CPU parts overlap with the sampling of the next variant."""

    def __init__(self, work: Path, table: Table, ref_stats: str, device: str, inception_batch: int = 500,
                 workers: int | None = None, force: bool = False, quiet: bool = False, fid_bootstrap: int = 20):
        from cachequant.metrics.fid import load_reference
        from cachequant.utils.cpus import usable_cpus

        self.work, self.table, self.device = work, table, device
        self.inception_batch, self.force, self.quiet = inception_batch, force, quiet
        self.fid_bootstrap = fid_bootstrap
        self.tdir = work / table.name
        self.ref = load_reference(ref_stats)
        self.ref_id = {"path": str(ref_stats), "source": str(self.ref.get("source", "")),
                       "count": int(self.ref.get("count", 0)), "sha1": file_hash(Path(ref_stats))}
        self.pr = PRReference(self.ref["features"], device)
        cpus = usable_cpus()
        self.workers = max(1, min(workers or max(1, cpus // 2), cpus))
        self.threads = max(1, cpus // self.workers)  # BLAS threads per worker: no oversubscription
        self._pool = None
        self._by_samples: dict[str, Any] = {}  # variants sharing samples share one CPU computation
        self._pending: list[tuple[Path, dict, Any]] = []
        self.failed = 0

    def _fp(self) -> tuple[str | None, str | None]:
        fp_dir = resolve_samples(self.work, self.tdir / "fp")
        if fp_dir is None:
            return None, None
        return str(fp_dir / "samples.npz"), file_hash(fp_dir / "samples.npz")

    def _log(self, slug: str, msg: str) -> None:
        print(f"[{self.table.name}/{slug}] metrics: {msg}", flush=True)

    def submit(self, v: Variant) -> bool:
        """Device part now, CPU part queued; False when there is nothing (new) to compute."""
        import multiprocessing as mp

        vdir = self.tdir / v.slug
        sdir = resolve_samples(self.work, vdir)
        if sdir is None:
            return False
        fp_samples, fp_hash = self._fp()
        samples = str(sdir / "samples.npz")
        key = {"samples_sha1": file_hash(sdir / "samples.npz"), "fp_sha1": fp_hash, "reference": self.ref_id}
        old = read_json(vdir / "metrics.json")
        if old and old.get("key") == key and not old.get("pending") and not self.force \
                and (self.fid_bootstrap == 0 or len(old.get("fid_bootstrap") or []) >= self.fid_bootstrap):
            return False
        try:
            t0 = time.time()
            feats = features_of(sdir, self.device, self.inception_batch, self.quiet)
            _sync(self.device)
            t1 = time.time()
            p, r, n = self.pr(feats)
            t2 = time.time()
            boot = None
            if self.fid_bootstrap:
                from cachequant.metrics.fid import fid_bootstrap

                # on the device, next to the features: shared resamples across variants (paired)
                boot = fid_bootstrap(feats, self.ref["mu"], self.ref["sigma"], self.fid_bootstrap, seed=0,
                                     device=self.device)
            t3 = time.time()
        except Exception as e:  # noqa: BLE001 - one variant's failure must not cost the others
            write_json(vdir / "metrics.json", {"key": None, "error": f"{type(e).__name__}: {e}",
                                               "traceback": traceback.format_exc()})
            self._log(v.slug, f"FAILED: {type(e).__name__}: {e}")
            self.failed += 1
            return False
        base = {"key": key, "variant": v.slug, "samples": str(sdir.relative_to(self.work)),
                "num_samples": len(feats), "precision": p, "recall": r, "pr_k": 3, "pr_samples": n,
                "fid_reference": self.ref_id["source"], "pending": ["fid", "psnr_vs_fp", "ssim_vs_fp"],
                "seconds": {"inception": t1 - t0, "precision_recall": t2 - t1}}
        if boot is not None:
            base.update(fid_bootstrap=boot, fid_bootstrap_seed=0)
            base["seconds"]["fid_bootstrap"] = t3 - t2
        write_json(vdir / "metrics.json", base)  # precision / recall survive a kill during the CPU part
        self._log(v.slug, f"inception {t1 - t0:.1f} s, precision {p:.3f} / recall {r:.3f} ({t2 - t1:.1f} s)"
                  + (f", FID bootstrap std {np.std(boot, ddof=1):.2f} over {len(boot)} ({t3 - t2:.1f} s)"
                     if boot and len(boot) > 1 else ""))
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_limit_threads, initargs=(self.threads,))
        if samples not in self._by_samples:
            self._by_samples[samples] = self._pool.submit(_timed_cpu_metrics, feats, self.ref["mu"],
                                                          self.ref["sigma"], samples, fp_samples)
        self._pending.append((vdir, base, self._by_samples[samples]))
        self._collect(block=False)
        return True

    def _collect(self, block: bool) -> None:
        keep = []
        for vdir, base, fut in self._pending:
            if not block and not fut.done():
                keep.append((vdir, base, fut))
                continue
            try:
                out, secs = fut.result()
                base.update(out)
                base["seconds"]["fid_psnr_ssim"] = secs
                errs = [k for k in out if k.endswith("_error")]
                self._log(base["variant"], f"FID {out.get('fid', float('nan')):.2f}, PSNR / SSIM vs fp "
                          f"{out.get('psnr_vs_fp')} / {out.get('ssim_vs_fp')} ({secs:.1f} s)"
                          + (f"; errors: {', '.join(errs)}" if errs else ""))
            except Exception as e:  # noqa: BLE001
                base["error"] = f"{type(e).__name__}: {e}"
                self._log(base["variant"], f"FAILED in the CPU part: {base['error']}")
                self.failed += 1
            base.pop("pending", None)
            write_json(vdir / "metrics.json", base)
        self._pending = keep

    def finish(self) -> int:
        """Waits for the CPU parts, writes ``<table>.json``; returns the number of failures."""
        self._collect(block=True)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        write_json(self.work / f"{self.table.name}.json",
                   gather_table(self.work, self.table, env=environment(self.device)))
        print(f"written {self.work / (self.table.name + '.json')}", flush=True)
        return self.failed


def run_metrics(args) -> int:
    """FID / precision / recall vs the reference statistics, PSNR / SSIM vs the table's fp."""
    import torch

    table = TABLES[args.table]
    runner = MetricsRunner(Path(args.work), table, args.ref_stats, args.device, args.inception_batch,
                           args.workers, args.force, args.quiet, args.fid_bootstrap)
    for v in table.variants:
        runner.submit(v)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 1 if runner.finish() else 0


def gather_table(work: Path, table: Table, env: dict | None = None) -> dict:
    """One JSON with every variant's info + metrics + status, and the environment."""
    tdir = work / table.name
    status = read_json(tdir / "sample-status.json") or {}
    rows = []
    for v in table.variants:
        vdir = tdir / v.slug
        info = read_json(vdir / "info.json")
        shared_info = None
        if info and "same_as" in info:
            shared_info = read_json(work / info["same_as"] / "info.json")
        rows.append({"variant": v.slug, "label": v.label, "info": info, "shared_info": shared_info,
                     "metrics": read_json(vdir / "metrics.json"), "error": read_json(vdir / "error.json"),
                     "skipped_time_budget": v.slug in status.get("skipped_time_budget", [])})
    return {"table": table.name, "title": table.title, "model": table.model, "scheduler": table.scheduler,
            "default_steps": table.steps, "guidance_scale": table.guidance_scale, "sample_status": status,
            "metrics_environment": env, "rows": rows}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _fmt(x: Any, spec: str) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and x == float("inf"):
        return "∞ (reference)"
    return format(x, spec)


def table_rows(data: dict) -> list[dict]:
    """Flat per-variant numbers (None where unknown) plus a 'note' for variants without results."""
    fp = next((r for r in data["rows"] if r["variant"] == "fp"), None)
    fp_info = None if fp is None else (fp["shared_info"] or fp["info"])
    fp_boot = ((fp or {}).get("metrics") or {}).get("fid_bootstrap")
    out = []
    for r in data["rows"]:
        info = r["shared_info"] or r["info"]
        m = r["metrics"] or {}
        note = None
        if not (r["info"] and r["info"].get("status") == "done") or not info:
            if r["error"]:
                note = f"not run (failed: {r['error']['error'][:120]})"
            elif r["skipped_time_budget"]:
                note = "not run (time budget)"
            else:
                note = "not run (not sampled)"
        macs = info.get("macs_per_image") if info else None
        bops = info.get("bops_per_image") if info else None
        fp_macs = fp_info.get("macs_per_image") if fp_info and fp_info.get("status") == "done" else None
        fp_bops = fp_info.get("bops_per_image") if fp_info and fp_info.get("status") == "done" else None
        out.append({
            "variant": r["variant"], "label": r["label"], "note": note,
            "same_as": (r["info"] or {}).get("same_as"),
            "fid": m.get("fid"), "precision": m.get("precision"), "recall": m.get("recall"),
            **_bootstrap_cells(m.get("fid_bootstrap"), fp_boot, r["variant"] == "fp"),
            "psnr": m.get("psnr_vs_fp"), "ssim": m.get("ssim_vs_fp"),
            "gbops": None if bops is None else bops / 1e9,
            "mac_speedup": None if not (macs and fp_macs) else fp_macs / macs,
            "bops_reduction": None if not (bops and fp_bops) else fp_bops / bops,
            "calib_s": info.get("calibration_seconds") if info else None,
            "num_samples": m.get("num_samples") or (info or {}).get("num_samples"),
            "metrics_error": m.get("error") or (f"FID: {m['fid_error']}" if m.get("fid_error") else None),
            "metrics_pending": m.get("pending"),
            **_calibration_coverage(info),
        })
    return out


def _bootstrap_cells(boot: list | None, fp_boot: list | None, is_fp: bool) -> dict:
    """FID bootstrap spread, and the paired bootstrap of FID − FID_fp (shared resamples)."""
    from cachequant.metrics.fid import paired_difference

    out = {"fid_std": None, "dfid_fp": None, "dfid_fp_std": None}
    if boot and len(boot) > 1:
        out["fid_std"] = float(np.std(boot, ddof=1))
        if fp_boot and len(fp_boot) == len(boot) and not is_fp:
            out["dfid_fp"], out["dfid_fp_std"] = paired_difference(boot, fp_boot)
    return out


def _calibration_coverage(info: dict | None) -> dict:
    """Calibration entries per denoising step: activation ranges are per step, so the step with the
    fewest entries is where a range is least representative (see results/qandc/README.md)."""
    cal = (info or {}).get("calibration") or {}
    sel = (cal.get("diagnostics") or {}).get("calibration_selection")
    if sel and sel.get("per_step"):
        steps = (info.get("run_key") or {}).get("steps") or len(sel["per_step"])
        per = [int(sel["per_step"].get(str(t), 0)) for t in range(steps)]
        return {"entries_min": min(per), "entries_low": sum(p <= 2 for p in per)}
    cfg = (info or {}).get("config")
    if cal and cfg and cfg.get("calibration", "trajectory") == "trajectory":
        return {"entries_min": cfg.get("num_calib_samples"), "entries_low": 0}
    return {"entries_min": None, "entries_low": None}


def render_table(data: dict) -> list[str]:
    lines = [f"### {data['title']}", ""]
    st = data.get("sample_status") or {}
    lines.append(f"Model `{data['model']}`, scheduler {data['scheduler']}, {st.get('steps', data['default_steps'])} "
                 f"steps" + (f", guidance {data['guidance_scale']}" if data["guidance_scale"] else "")
                 + f"; samples per variant: {st.get('num_samples', '–')}; calibration: "
                 + (", ".join(f"{k}={v}" for k, v in (st.get("calibration") or {}).items()) or "–") + ".")
    if st.get("steps") and st["steps"] != data["default_steps"]:
        lines.append(f"**Smoke-test run: {st['steps']} steps instead of {data['default_steps']}.**")
    rows = table_rows(data)
    boot = any(r["fid_std"] is not None for r in rows)
    if boot:
        lines.append("FID ± the standard deviation over bootstrap resamples of the generated features; ΔFID vs FP: "
                     "the paired bootstrap of FID − FID(full precision) over the same resamples (the variants share "
                     "seeds), mean ± standard deviation.")
    lines += ["", "| variant | FID | " + ("ΔFID vs FP (paired) | " if boot else "") + "precision | recall | "
              "PSNR vs FP (dB) | SSIM vs FP | Bops (G) | MAC speed-up vs FP "
              "| calibration (s) | calibration entries: fewest per step (steps with ≤ 2) |",
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if boot else "")]
    for r in rows:
        name = f"{r['label']} (`{r['variant']}`)"
        if r["same_as"]:
            name += f" = `{r['same_as']}`"
        if r["note"]:
            lines.append(f"| {name} | {r['note']} | | | | | | | | |" + (" |" if boot else ""))
            continue
        cal = "–" if r["variant"] == "fp" else _fmt(r["calib_s"], ".1f")
        if r["same_as"] and r["calib_s"] is not None:
            cal += " (shared)"
        err = f" (metrics failed: {r['metrics_error']})" if r["metrics_error"] else ""
        if r["metrics_pending"]:
            err += f" ({', '.join(r['metrics_pending'])} not computed: the metrics run stopped first)"
        psnr, ssim = _fmt(r["psnr"], ".2f"), _fmt(r["ssim"], ".4f")
        if r["variant"] == "fp":
            psnr = ssim = "(reference)"
        fid = _fmt(r["fid"], ".2f") + (f" ± {r['fid_std']:.2f}" if r["fid_std"] is not None else "")
        dfid = "" if not boot else ("– | " if r["dfid_fp"] is None else f"{r['dfid_fp']:+.2f} ± {r['dfid_fp_std']:.2f} | ")
        lines.append(f"| {name}{err} | {fid} | {dfid}{_fmt(r['precision'], '.3f')} | "
                     f"{_fmt(r['recall'], '.3f')} | {psnr} | {ssim} | "
                     f"{_fmt(r['gbops'], '.1f')} | {_fmt(r['mac_speedup'], '.2f')}{'×' if r['mac_speedup'] else ''} "
                     f"| {cal} | {_coverage_cell(r)} |")
    return lines


def _coverage_cell(r: dict) -> str:
    if r["entries_min"] is None:
        return "–"
    return f"{r['entries_min']}" + (f" ({r['entries_low']})" if r["entries_low"] else "")


def _commands(datas: list[dict]) -> list[str]:
    cmds = []
    for d in datas:
        st = d.get("sample_status") or {}
        if st.get("environment", {}).get("command"):
            cmds.append(st["environment"]["command"])
        me = d.get("metrics_environment") or {}
        if me.get("command"):
            cmds.append(me["command"])
    return cmds


def render_report(work: Path, out: Path, name: str, tables: list[str], title: str) -> Path:
    """Markdown of some tables with their commands, sample counts, device and versions; an empty
    Analysis section for the human who reads the numbers."""
    datas = []
    for t in tables:
        # always from the per-variant files: a metrics run cut short leaves <table>.json stale or absent
        env = (read_json(work / f"{t}.json") or {}).get("metrics_environment")
        d = gather_table(work, TABLES[t], env=env)
        datas.append(d)
    return write_report(datas, out, name, title)


def _row_done(row: dict) -> bool:
    return bool(row.get("info") and row["info"].get("status") == "done")


def _fp_key(data: dict) -> tuple[str | None, str | None]:
    """(full-precision samples' SHA-1, reference statistics' SHA-1) that a table's metrics used."""
    fps, refs = set(), set()
    for r in data["rows"]:
        key = (r.get("metrics") or {}).get("key") or {}
        if key.get("fp_sha1"):
            fps.add(key["fp_sha1"])
        if (key.get("reference") or {}).get("sha1"):
            refs.add(key["reference"]["sha1"])
    if len(fps) > 1 or len(refs) > 1:
        raise ValueError(f"table {data['table']}: its rows were measured against different full-precision samples "
                         f"{sorted(fps)} or reference statistics {sorted(refs)}")
    return (fps.pop() if fps else None, refs.pop() if refs else None)


def merge_table_jsons(datas: list[dict]) -> list[dict]:
    """Join the ``<table>.json`` files of several runs (sessions) into one table per name.

    A table sampled over several sessions on fresh machines has each variant's row in one run's
    file. Rows are comparable only when every run measured PSNR / SSIM against the same
    full-precision samples and FID against the same reference statistics (the SHA-1s in each
    ``metrics.json`` key); otherwise this refuses. A variant measured in several runs must have
    produced the same samples (same SHA-1); the later run's row is kept."""
    merged: dict[str, dict] = {}
    for d in datas:
        if not isinstance(d, dict) or d.get("table") not in TABLES or not isinstance(d.get("rows"), list):
            raise ValueError("not a table JSON written by `ablation.py metrics`/`report` (needs 'table' and 'rows')")
        name = d["table"]
        if name not in merged:
            merged[name] = {**d, "rows": [dict(r) for r in d["rows"]], "merged_commands": _commands([d])}
            _fp_key(merged[name])
            continue
        base = merged[name]
        for attr in ("model", "scheduler", "default_steps", "guidance_scale"):
            if base.get(attr) != d.get(attr):
                raise ValueError(f"table {name}: runs differ in {attr} ({base.get(attr)!r} vs {d.get(attr)!r})")
        a, b = _fp_key(base), _fp_key(d)
        for what, x, y in (("full-precision samples", a[0], b[0]), ("reference statistics", a[1], b[1])):
            if x and y and x != y:
                raise ValueError(f"table {name}: the runs' {what} differ (SHA-1 {x} vs {y}): their PSNR / FID "
                                 "are not comparable; re-sample the variants in one run")
        rows = {r["variant"]: i for i, r in enumerate(base["rows"])}
        for r in d["rows"]:
            if not _row_done(r):
                continue
            i = rows.get(r["variant"])
            if i is None:
                base["rows"].append(dict(r))
                continue
            old = base["rows"][i]
            sa = ((old.get("metrics") or {}).get("key") or {}).get("samples_sha1")
            sb = ((r.get("metrics") or {}).get("key") or {}).get("samples_sha1")
            if sa and sb and sa != sb:
                raise ValueError(f"table {name}, variant {r['variant']}: two runs produced different samples "
                                 f"(SHA-1 {sa} vs {sb})")
            if r.get("metrics") or not old.get("metrics"):
                base["rows"][i] = dict(r)
        base["merged_commands"] += [c for c in _commands([d]) if c not in base["merged_commands"]]
        st = dict(base.get("sample_status") or {})
        st.setdefault("num_samples", (d.get("sample_status") or {}).get("num_samples"))
        base["sample_status"] = st
    for d in merged.values():  # the table's own variant order; rows of variants it no longer has go last
        rank = {v.slug: i for i, v in enumerate(TABLES[d["table"]].variants)}
        d["rows"].sort(key=lambda r: rank.get(r["variant"], len(rank)))
    order = {t: i for i, t in enumerate(TABLES)}
    return sorted(merged.values(), key=lambda d: order[d["table"]])


def write_report(datas: list[dict], out: Path, name: str, title: str) -> Path:
    """The markdown report and its plot from gathered (or merged) table data."""
    envs = [(d.get("sample_status") or {}).get("environment") for d in datas]
    envs = [e for e in envs if e]
    lines = [f"# {title}", "", JPEG_NOTE, "",
             "FID / precision / recall (k = 3): against the reference statistics given to `metrics`; PSNR / SSIM: "
             "each image against the full-precision image from the same seed (and class label). Bops: executed MACs "
             "× weight bits × activation bits per image (32 × 32 for float layers; attention matmuls not counted); "
             "MAC speed-up: full-precision executed MACs / the variant's. Calibration time is wall-clock on the "
             "sampling device.", ""]
    lines += ["## Setup", ""]
    if envs:
        e = envs[0]
        v = {k: e.get(k, "–") for k in ("device", "torch", "diffusers", "cachequant", "python", "cuda")}
        lines.append(f"Device: {v['device']}; torch {v['torch']}, diffusers {v['diffusers']}, cachequant "
                     f"{v['cachequant']}, Python {v['python']}, CUDA {v['cuda']}.")
    else:
        lines.append("Device: – (nothing sampled yet).")
    lines += ["", "Commands (as run):", "", "```bash"]
    cmds = [c for d in datas for c in (d.get("merged_commands") or _commands([d]))]
    lines += cmds or ["# (none recorded)"]
    lines += ["python " + " ".join(sys.argv), "```", ""]
    for d in datas:
        lines += render_table(d) + [""]
    lines += ["## Analysis", "", "> **TODO (placeholder):** to be written after reading the numbers above.", ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    write_json_text(path, "\n".join(lines) + "\n")
    (plot_bars if name == "qandc" else plot)(datas, out / f"{name}.png", title)
    return path


def write_json_text(path: Path, text: str) -> None:
    from cachequant.utils.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a message) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def plot(datas: list[dict], path: Path, title: str) -> Path | None:
    """Speed–quality scatter, one panel per table with results: x = MAC speed-up vs FP, y = FID.
    Variants at the same speed-up (same schedule length) are labelled together in one text block,
    best FID last, so that close FIDs stay readable."""
    plt = _pyplot()
    if plt is None:
        return None
    from cachequant.utils.io import atomic_path

    panels = [(d, [r for r in table_rows(d) if r["fid"] is not None and r["mac_speedup"] is not None]) for d in datas]
    panels = [(d, pts) for d, pts in panels if pts] or [({"title": title}, [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    for ax, (d, pts) in zip(axes[0], panels):
        if not pts:
            ax.text(0.5, 0.5, "no variant with both FID and MACs yet", ha="center", va="center",
                    transform=ax.transAxes)
        groups: dict[float, list[dict]] = {}
        for r in pts:
            groups.setdefault(round(r["mac_speedup"], 2), []).append(r)
        for x, rows in groups.items():
            rows.sort(key=lambda r: -r["fid"])
            ax.scatter([x] * len(rows), [r["fid"] for r in rows], s=30,
                       c=["k" if r["variant"] == "fp" else "tab:blue" for r in rows])
            if len(rows) == 1:
                ax.annotate(f"{rows[0]['variant']} {rows[0]['fid']:.1f}", (x, rows[0]["fid"]),
                            textcoords="offset points", xytext=(4, 3), fontsize=7)
            else:
                text = "\n".join(f"{r['variant']} {r['fid']:.1f}" for r in rows)
                ax.annotate(text, (x, rows[0]["fid"]), textcoords="offset points", xytext=(5, 0), fontsize=7,
                            va="top", bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="0.8", alpha=0.85))
        ax.set_xlabel("executed-MAC speed-up vs full precision (×)")
        ax.set_ylabel("FID (JPEG-q75 CIFAR-10 reference; lower is better)")
        ax.set_title(d["title"], fontsize=10)
        ax.grid(alpha=0.3)
        if pts:
            xs = [r["mac_speedup"] for r in pts]
            ax.set_xlim(min(xs) - 0.1, max(xs) + 0.25 * (max(xs) - min(xs) + 0.5))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)
    return path


def plot_bars(datas: list[dict], path: Path, title: str) -> Path | None:
    """FID per variant as horizontal bars, one panel per table: the Q&C rows all execute the same
    MACs, so a speed–quality scatter would stack them on one vertical line. Variants that share
    another's samples (``same_as``) are drawn once; full precision is a dashed line."""
    plt = _pyplot()
    if plt is None:
        return None
    from cachequant.utils.io import atomic_path

    panels = [(d, [r for r in table_rows(d) if r["fid"] is not None and not r["same_as"]]) for d in datas]
    panels = [(d, rows) for d, rows in panels if rows] or [(datas[0] if datas else {"title": title}, [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 0.38 * max(len(r) for _, r in panels) + 1.8),
                             squeeze=False)
    for ax, (d, rows) in zip(axes[0], panels):
        fp = [r["fid"] for r in rows if r["variant"] == "fp"]
        rows = [r for r in rows if r["variant"] != "fp"]
        if not rows:
            ax.text(0.5, 0.5, "no variant with an FID yet", ha="center", va="center", transform=ax.transAxes)
        ys = list(range(len(rows)))[::-1]
        ax.barh(ys, [r["fid"] for r in rows], color="tab:blue")
        ax.set_yticks(ys, [r["variant"] for r in rows], fontsize=8)
        for y, r in zip(ys, rows):
            ax.annotate(f"{r['fid']:.1f}", (r["fid"], y), textcoords="offset points", xytext=(3, -3), fontsize=7)
        if fp:
            ax.axvline(fp[0], color="k", ls="--", lw=1, label=f"full precision {fp[0]:.1f}")
            ax.legend(fontsize=8, loc="lower right")
        lo = min([r["fid"] for r in rows] + fp, default=0)
        ax.set_xlim(left=max(0.0, lo - 10))
        ax.set_xlabel("FID (JPEG-q75 CIFAR-10 reference; lower is better)")
        ax.set_title(d["title"], fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)
    return path


def run_report(args) -> int:
    out = Path(args.out)
    if args.from_json:
        return _report_from_json([Path(p) for p in args.from_json], out)
    if not args.work:
        raise SystemExit("report needs --work (a sampling work folder) or --from-json (committed table JSONs)")
    work = Path(args.work)
    for name, tables in REPORT_FILES.items():
        print(f"written {render_report(work, out, name, tables, REPORT_TITLES[name])}")
    return 0


REPORT_TITLES = {"ablation": "CacheQuant ablation on the CIFAR-10 models",
                 "qandc": "Q&C ablations on the CIFAR-10 DiT (DDIM 50, N = 3, W8A8)"}


def _report_from_json(paths: list[Path], out: Path) -> int:
    """Report + plot from committed ``<table>.json`` files of one or more runs (see merge_table_jsons)."""
    datas = []
    for p in paths:
        d = read_json(p)
        if d is None:
            raise SystemExit(f"--from-json: cannot read {p} (missing or not JSON)")
        datas.append(d)
    try:
        merged = merge_table_jsons(datas)
    except ValueError as e:
        raise SystemExit(f"--from-json: {e}")
    have = {d["table"]: d for d in merged}
    for name, tables in REPORT_FILES.items():
        if not any(t in have for t in tables):
            continue
        # a table none of the files has is listed as not sampled, as in a report from a work folder
        chosen = [have.get(t) or gather_table(out / "__none__", TABLES[t]) for t in tables]
        print(f"written {write_report(chosen, out, name, REPORT_TITLES[name])}")
    return 0


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


FID_BOOTSTRAP_HELP = ("bootstrap resamples of each variant's features for the FID spread, the same resamples "
                      "for every variant (paired differences); 0 = off (default 20)")


def _nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("sample", help="calibrate + sample every variant of a table (resumable)")
    s.add_argument("--table", choices=list(TABLES), required=True)
    s.add_argument("--num-samples", type=int, required=True)
    s.add_argument("--batch-size", type=int, default=500, help="images per pipeline call (= shard size)")
    s.add_argument("--device", default="cuda")
    s.add_argument("--work", required=True)
    s.add_argument("--only", help="comma-separated variant slugs (fp is always added first)")
    s.add_argument("--time-budget-s", type=float, default=None, help="start no new variant after this many seconds")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (as `cachequant evaluate --seed`)")
    s.add_argument("--calib-samples", type=int, default=32, help="calibration trajectories (CacheQuantConfig default)")
    s.add_argument("--calib-batch-size", type=int, default=32,
                   help="trajectories per calibration run (config default 8; 32 = one run per pass on a GPU)")
    s.add_argument("--dps-samples", type=int, default=8, help="trajectories for DPS / cache-DEC / VC features")
    s.add_argument("--calib-select", type=int, default=256, help="entries selected by tap/random/kmeans/...")
    s.add_argument("--calib-seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=None, help="override the table's step count (local smoke tests only)")
    s.add_argument("--model", default=None, help="override the table's model, e.g. tiny-ddim (tests only)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--backend", default="fake", choices=["fake", "int8", "fp8", "auto"],
                   help="quantized-layer execution; the tables use the fake-quant reference (8-bit attention "
                        "matmuls included, as in the reference work)")
    s.add_argument("--kernel-attention", default="8bit", choices=["8bit", "sdpa"],
                   help="with --backend int8/fp8: keep the plans' 8-bit attention matmuls (default: the tables "
                        "then compute what the reference computes, at kernel speed for the linear / conv layers) "
                        "or run fused float SDPA")
    s.add_argument("--matmul-tf32", action="store_true",
                   help="float matmuls in TF32 on the GPU (cuDNN convolutions use TF32 by default anyway): the fp32 "
                        "DiT tables are matmul-bound, so this ~halves their GPU time; recorded in the run key")
    s.add_argument("--ref-stats", default=None,
                   help="reference .npz from `cachequant ref-stats`: compute each variant's metrics as soon as it "
                        "is sampled (as the `metrics` step would)")
    s.add_argument("--fid-bootstrap", type=_nonneg_int, default=20, help=FID_BOOTSTRAP_HELP)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=run_sample)

    m = sub.add_parser("metrics", help="FID / precision / recall / PSNR / SSIM of every sampled variant")
    m.add_argument("--table", choices=list(TABLES), required=True)
    m.add_argument("--work", required=True)
    m.add_argument("--ref-stats", required=True, help=".npz from `cachequant ref-stats`")
    m.add_argument("--device", default="cuda")
    m.add_argument("--inception-batch", type=int, default=500)
    m.add_argument("--workers", type=int, default=None,
                   help="processes for the CPU parts (sqrtm, SSIM); default: half the usable CPUs")
    m.add_argument("--force", action="store_true", help="recompute metrics that are up to date")
    m.add_argument("--fid-bootstrap", type=_nonneg_int, default=20, help=FID_BOOTSTRAP_HELP)
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(fn=run_metrics)

    r = sub.add_parser("report", help="markdown tables + speed-quality plot")
    r.add_argument("--work", help="the sampling work folder (as given to sample / metrics)")
    r.add_argument("--from-json", nargs="+", metavar="TABLE_JSON",
                   help="instead of --work: <table>.json files of one or more runs (e.g. the committed "
                        "results/quality/*.json), merged per table; refused when the runs' full-precision "
                        "samples or reference statistics differ")
    r.add_argument("--out", default="results")
    r.set_defaults(fn=run_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
