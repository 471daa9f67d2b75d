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

# The study's command line; its tables, sampling, metrics and report are in benchmarks/harness/.
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from harness.env import environment
from harness.io import read_json, write_json
from harness.metrics import MetricsRunner
from harness.render import render_report, write_report
from harness.sampling import (calib_settings, find_same, full_config, is_done, key_hash, load_pipe, run_key,
                              sample_variant)
from harness.tables import REPORT_FILES, REPORT_TITLES, TABLES, gather_table, merge_table_jsons


def run_sample(args) -> int:
    """Runs every (selected) variant of a table in order, fp first; see the module docstring."""
    import torch

    table = TABLES[args.table]
    if args.fp8_gemm and args.backend not in ("fp8", "fp8-emulated", "auto"):
        raise SystemExit(f"--fp8-gemm {args.fp8_gemm} picks FP8 weight scales: it needs --backend fp8, fp8-emulated "
                         f"or auto, not {args.backend}")
    steps = args.steps or table.steps
    model = args.model or table.model
    if args.weights:
        from cachequant.cli.common import UsageError, check_model

        try:
            check_model(model, args.weights)
        except UsageError as e:
            raise SystemExit(f"error: {e}") from None
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
                pipe = load_pipe(model, args.device, table.scheduler, args.weights)
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
    s.add_argument("--quant-io", action="store_true",
                   help="quantize the first and last layers too (CacheQuantConfig.quant_io): how every table "
                        "measured before 2026-12-06 was calibrated")
    s.add_argument("--steps", type=int, default=None, help="override the table's step count (local smoke tests only)")
    s.add_argument("--model", default=None, help="override the table's model, e.g. tiny-ddim (tests only)")
    s.add_argument("--weights", default=None,
                   help="the table's zoo model with other weights (a folder such as results/training/weights/"
                        "cifar10-unet); their SHA-1 is part of every variant's run key")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--backend", default="fake", choices=["fake", "int8", "fp8", "auto", "fp8-emulated"],
                   help="quantized-layer execution; the tables use the fake-quant reference (8-bit attention "
                        "matmuls included, as in the reference work)")
    s.add_argument("--kernel-attention", default="8bit", choices=["8bit", "sdpa"],
                   help="with --backend int8/fp8: keep the plans' 8-bit attention matmuls (default: the tables "
                        "then compute what the reference computes, at kernel speed for the linear / conv layers) "
                        "or run fused float SDPA")
    s.add_argument("--fp8-gemm", default=None, choices=["cublaslt", "triton"],
                   help="with --backend fp8 / fp8-emulated: per-tensor weight scales (cuBLASLt, what Hopper runs by "
                        "default) or per-output-channel ones (the Triton FP8 GEMM); recorded in the run key")
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
