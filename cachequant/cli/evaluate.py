"""``cachequant evaluate`` and ``cachequant ref-stats``.

evaluate: sample N images (full precision, or with a plan) in seeded shards, merge them into one
uint8 ``samples.npz``, and write ``metrics.json``: FID / precision / recall against reference
statistics, PSNR / SSIM against a full-precision run of the same seeds, executed MACs and Bops per
image, weight storage. Runs on one process, or on K under ``torchrun`` (shards split by rank).
"""

from __future__ import annotations

import json
import platform
import sys
import time
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import torch

from ..distributed import barrier, init_from_env


def run_evaluate(args) -> int:
    import cachequant as cq
    from ..metrics import psnr, ssim
    from ..metrics.macs import count_ops, weight_storage_bits
    from ..metrics.sampling import (ShardSpec, check_run_config, merge_shards, sample_indices, shard_path,
                                    write_shard)
    from ..pipecall import denoiser_of
    from ..utils.io import atomic_path
    from ..zoo import weights_record
    from .common import (UsageError, check_device, check_input_file, check_model, check_output_folder,
                         kernel_options, load_pipeline)

    # everything that can be wrong is checked before the first image is sampled
    check_model(args.model, args.weights)
    check_device(args.device)
    if args.matmul_tf32 and not args.device.startswith("cuda"):
        raise UsageError(f"--matmul-tf32 sets how CUDA GPUs multiply float32 matrices; --device {args.device} "
                         "has no TF32: leave the option out")
    check_output_folder(args.out_dir, "--out-dir")
    plan = cq.load_plan(check_input_file(args.plan, "--plan")) if args.plan else None
    if args.ref_stats:
        from ..metrics.fid import load_reference

        load_reference(check_input_file(args.ref_stats, "--ref-stats"))  # readable, with the statistics FID needs
    if args.fp_dir and not (Path(args.fp_dir) / "samples.npz").is_file():
        raise UsageError(f"--fp-dir: {args.fp_dir} holds no samples.npz (the --out-dir of a finished full-precision "
                         "evaluate run)")
    options = kernel_options(args)
    rank, world, device = init_from_env(args.device)
    pipe = load_pipeline(args.model, device, args.scheduler, args.weights)
    plan_meta = None
    if plan is not None:
        cq.accelerate(pipe, plan, options)
        plan_meta = {"path": str(args.plan), "config": plan.config.to_dict(), "schedule": plan.schedule,
                     "backend": cq.kernel_report(pipe)["backend"]}
    kw = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    spec = ShardSpec(args.num_samples, args.shard_size)
    out_dir = Path(args.out_dir)
    run_cfg = {"model": args.model, "plan": str(args.plan) if args.plan else None, "steps": args.steps,
               "scheduler": args.scheduler, "num_samples": args.num_samples, "shard_size": args.shard_size,
               "seed": args.seed, "guidance_scale": args.guidance_scale}
    run_cfg.update(weights_record(args.model, args.weights))  # names a zoo model's weights unless first shipped
    if args.matmul_tf32:  # only when set: the run keys of earlier full-fp32 runs stay what they were
        torch.backends.cuda.matmul.allow_tf32 = True
        run_cfg["matmul_tf32"] = True
    if rank == 0:
        check_run_config(out_dir, run_cfg)
        for stale in out_dir.glob(".shard-*"):  # temporaries of a killed run: never complete, never read
            stale.unlink(missing_ok=True)
    barrier()
    if rank != 0:
        check_run_config(out_dir, run_cfg)

    from tqdm.auto import tqdm

    mine = [s for s in range(spec.num_shards) if s % world == rank]
    todo = [s for s in mine if not shard_path(out_dir, s).exists()]
    t0 = time.time()
    with tqdm(total=sum(len(spec.indices(s)) for s in todo), desc=f"sampling (rank {rank}/{world})",
              disable=args.quiet) as bar:
        for s in todo:
            idx = spec.indices(s)
            imgs, labels = [], []
            for i in range(0, len(idx), args.batch_size):
                im, lb = sample_indices(pipe, idx[i : i + args.batch_size], args.seed, args.steps, kw)
                imgs.append(im)
                labels.append(lb)
                bar.update(len(im))
            write_shard(shard_path(out_dir, s), np.concatenate(imgs), np.concatenate(labels), idx)
    t_sample = time.time() - t0
    barrier()
    if rank != 0:
        return 0

    images, labels = merge_shards(out_dir, spec)
    with atomic_path(out_dir / "samples.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels)
    _, model = denoiser_of(pipe)
    with count_ops(model) as ops:
        sample_indices(pipe, [0], args.seed, args.steps, kw)
    metrics: dict = {"num_samples": int(len(images)), "macs_per_image": ops.macs, "bops_per_image": ops.bops,
                     "weight_storage_bytes": weight_storage_bits(model) / 8,
                     "sampling_seconds_this_run": t_sample, "world_size": world}
    if args.ref_stats:
        from ..metrics.fid import frechet_distance, inception_features, load_reference, reference_resize
        from ..metrics.prdc import precision_recall

        ref = load_reference(args.ref_stats)
        metrics["fid_resize"] = resize = reference_resize(ref)
        feats = inception_features(images, device=device, batch_size=200, progress=not args.quiet, resize=resize)
        metrics["fid"] = frechet_distance(*_stats(feats), ref["mu"], ref["sigma"])
        metrics["fid_reference"] = str(ref.get("source", args.ref_stats))
        n = min(len(feats), len(ref["features"]))
        if n > 3:
            metrics["precision"], metrics["recall"] = precision_recall(ref["features"][:n], feats[:n], k=3,
                                                                       device=device)
            metrics["pr_samples"] = n
    if args.fp_dir:
        fp = np.load(Path(args.fp_dir) / "samples.npz", allow_pickle=False)["images"]
        if fp.shape != images.shape:
            raise ValueError(f"--fp-dir samples have shape {fp.shape}, these {images.shape}: not the same run settings")
        a, b = images.astype(np.float64) / 255, fp.astype(np.float64) / 255
        metrics["psnr_vs_fp"] = psnr(a, b)
        metrics["ssim_vs_fp"] = ssim(a, b)
    result = {"metrics": metrics, "run": run_cfg, "plan": plan_meta, "command": " ".join(sys.argv),
              "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
              "versions": {"cachequant": cq.__version__, "torch": torch.__version__, "python": platform.python_version()}}
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    print(json.dumps(metrics, indent=2))
    return 0


def _stats(f):
    from ..metrics.fid import feature_stats

    return feature_stats(f)


def read_images(path: str, limit: int | None = None) -> np.ndarray:
    """uint8 NHWC images from a zip or folder of image files, or an .npz with an `images` array."""
    from PIL import Image

    p = Path(path)
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
    if p.suffix == ".npz":
        return np.load(p, allow_pickle=False)["images"][:limit]
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            names = sorted(n for n in z.namelist() if n.lower().endswith(exts))[:limit]
            arrs = [np.asarray(Image.open(BytesIO(z.read(n))).convert("RGB")) for n in names]
    elif p.is_dir():
        names = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in exts)[:limit]
        arrs = [np.asarray(Image.open(n).convert("RGB")) for n in names]
    else:
        raise ValueError(f"{path} is not a zip, a folder of images or an .npz")
    if not arrs:
        raise ValueError(f"no images found in {path}")
    return np.stack(arrs)


def run_ref_stats(args) -> int:
    from ..metrics.fid import inception_features, save_reference
    from .common import UsageError, check_device, check_output_file

    data = Path(args.data)
    if not data.exists():
        raise UsageError(f"--data: {data} does not exist")
    out = check_output_file(args.out, "--out", (".npz",))
    check_device(args.device)
    images = read_images(args.data, args.limit)
    feats = inception_features(images, device=args.device, batch_size=200, progress=not args.quiet,
                               resize=args.fid_resize)
    save_reference(out, feats, source=f"{Path(args.data).name} ({len(images)} images)", resize=args.fid_resize)
    print(f"reference statistics of {len(images)} images written to {args.out}")
    return 0
