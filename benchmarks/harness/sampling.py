"""Sampling one variant of a quality table: its run key (everything its images depend on; equal
keys share samples), calibration reused on a rerun, and seeded shards sampled OOM-safe, so a killed
run resumes mid-variant."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .env import environment
from .io import read_json, write_json
from .tables import Table, Variant
from .timing import sync


def calib_settings(args) -> dict:
    """CacheQuantConfig calibration fields shared by every variant of a run (same calibration data)."""
    return {"num_calib_samples": args.calib_samples, "calib_batch_size": args.calib_batch_size,
            "dps_samples": args.dps_samples, "calib_select": args.calib_select, "seed": args.calib_seed,
            "quant_io": getattr(args, "quant_io", False)}


def full_config(variant: Variant, calib: dict) -> dict | None:
    """The complete CacheQuantConfig dict of a variant (validated by constructing it)."""
    import cachequant as cq

    if variant.config is None:
        return None
    return cq.CacheQuantConfig(**{**calib, **variant.config}).to_dict()


LATER_FIELDS = {"attention_probs": "uniform", "float_layers": [], "quant_io": True}
"""CacheQuantConfig fields added after run keys were first written, with the value every run had
before the field existed (the field's default, except ``quant_io``: the first and last layers were
quantized until the default became False): left out of a key at that value, so that samples made
before a field existed (resumed work folders, variants carried between device sessions) keep their
keys."""


def _keyed_config(config: dict | None) -> dict | None:
    if config is None:
        return None
    unquantized = config.get("weight_bits") is None  # quant_io means nothing there: such a key never changed
    return {k: v for k, v in config.items()
            if not (k in LATER_FIELDS and v == LATER_FIELDS[k]) and not (unquantized and k == "quant_io")}


def run_key(table: Table, variant: Variant, args, steps: int, model: str) -> dict:
    """Everything the images of a variant depend on; equal keys = identical samples (shared)."""
    from cachequant.zoo import weights_record

    return {"model": model, "scheduler": table.scheduler, "steps": steps, "guidance_scale": table.guidance_scale,
            # other weights than the first shipped ones (a retraining checkpoint, newer shipped weights)
            **weights_record(model, getattr(args, "weights", None)),
            "num_samples": args.num_samples, "seed": args.seed,
            "config": _keyed_config(full_config(variant, calib_settings(args))),
            "backend": getattr(args, "backend", "fake"),
            # kernel backends only (the reference path always runs the plan's attention)
            **({"kernel_attention": args.kernel_attention} if getattr(args, "backend", "fake") != "fake" else {}),
            # per-tensor or per-channel FP8 weight scales: different weights, different samples
            **({"fp8_gemm": args.fp8_gemm} if getattr(args, "fp8_gemm", None) else {}),
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


def load_pipe(model: str, device: str, scheduler: str, weights: str | None = None):
    """Same loader as the CLI (zoo, tiny or folder; ``weights``: a zoo model's other weights), so the
    pipelines are the ones `evaluate` uses."""
    from cachequant.cli.common import load_pipeline

    pipe = load_pipeline(model, device, scheduler, weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def calibrate_variant(pipe, table: Table, cfg: dict, steps: int, args, vdir: Path):
    """Calibrates (or reloads the plan of an interrupted earlier attempt) and times it. ``cfg`` is
    the complete config (``full_config``), never the run key's: a key leaves out fields at the value
    runs had before the field existed (``LATER_FIELDS``), which is not always today's default."""
    import cachequant as cq
    from cachequant.pipecall import conditioning, num_classes

    plan_path, calib_path = vdir / "plan.cqplan", vdir / "calibration.json"
    calib_info = read_json(calib_path)
    if plan_path.is_file() and calib_info and _keyed_config(calib_info.get("config")) == _keyed_config(cfg):
        plan = cq.load_plan(plan_path)
        # the plan's own config decides: earlier records kept the key's config, which cannot tell
        # a plan with the first and last layers quantized from one without
        if plan.config.quant_io == cfg["quant_io"]:
            return plan, calib_info
    config = cq.CacheQuantConfig.from_dict(cfg)
    kw: dict = {}
    if conditioning(pipe) == "class":  # the same labels the CLI's default uses, explicit for the record
        kw["class_labels"] = [i % num_classes(pipe) for i in range(config.num_calib_samples)]
    else:
        kw["num_samples"] = config.num_calib_samples
    pk = {} if table.guidance_scale is None else {"guidance_scale": table.guidance_scale}
    sync(args.device)
    t = time.time()
    plan = cq.calibrate(pipe, config, num_inference_steps=steps, pipeline_kwargs=pk, progress=not args.quiet, **kw)
    sync(args.device)
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
    cfg = full_config(variant, calib_settings(args))
    vdir.mkdir(parents=True, exist_ok=True)
    plan, calib_info = (None, None) if cfg is None else calibrate_variant(pipe, table, cfg, steps, args, vdir)
    kw = {} if table.guidance_scale is None else {"guidance_scale": table.guidance_scale}
    _, model_mod = denoiser_of(pipe)
    if plan is not None:
        cq.accelerate(pipe, plan, backend=args.backend, attention=args.kernel_attention,
                      fp8_gemm=getattr(args, "fp8_gemm", None))
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
            sync(args.device)
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
            sync(args.device)
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
