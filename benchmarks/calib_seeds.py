"""An ablation table's variants over several calibration seeds, judged by PSNR / SSIM against full
precision from the same sampling seeds: the spread a single calibration hides, small enough for a
CPU (FID needs thousands of samples; `ablation.py` on a GPU does that).

    python benchmarks/calib_seeds.py --table qandc-fair --calib-seeds 0 1 2 --num-samples 16 \\
        --device cpu --work /tmp/qandc-fair --versus all --out results/qandc/fair-cpu.json

Each seed drives ``benchmarks/ablation.py sample`` in its own work folder (``<work>/seed<S>``;
resumable: a finished variant is not sampled again), so every variant is exactly the table's with
``--calib-seed S``: the seed draws the calibration trajectories and any selection from them. The
sampling seeds (and full precision) are the same for every calibration seed, so differences between
variants are paired: ``--versus SLUG`` adds, per variant, the mean and spread over seeds of its PSNR
minus that variant's.

With ``--ref-stats`` (a GPU and thousands of samples) the same runs give FID: each variant's
metrics follow its sampling (``ablation.py sample --ref-stats``), and the summary has, per
variant, FID's mean and spread over calibration seeds, its difference to full precision (the same
sampling seeds, so the same fp for every calibration seed) and the bootstrap spread of that paired
difference (shared resamples, ``fid_bootstrap``), which covers the resampling of the images
rather than the calibration. Full precision does not calibrate: it is sampled once, in the first
seed's folder, and hard-linked into the others. Nor do the cache-only rows on the uniform schedule
(``calibration_free``): they are sampled with the first seed and their row repeated for the others.

    python benchmarks/calib_seeds.py --table unet --calib-seeds 0 1 2 --num-samples 10000 --batch-size 2500 \
        --device cuda --ref-stats ref-test.npz --work /root/cqp/seeds --versus naive-n10 --out unet-seeds.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.env import environment  # noqa: E402
from harness.io import read_json, write_json  # noqa: E402
from harness.render import calibration_coverage  # noqa: E402
from harness.sampling import is_done, resolve_samples  # noqa: E402
from harness.tables import TABLES  # noqa: E402


def _images(work: Path, vdir: Path) -> tuple[np.ndarray, dict]:
    sdir = resolve_samples(work, vdir)
    if sdir is None:
        raise SystemExit(f"{vdir} has no samples: see its error.json")
    with np.load(sdir / "samples.npz") as z:
        images = z["images"].astype(np.float64) / 255
    return images, json.loads((sdir / "info.json").read_text())


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def calibration_free(config: dict | None) -> bool:
    """A variant whose plan no calibration data can change: caching on the uniform schedule with
    no quantization, no DEC and no VC (the cache-only rows). Its samples are the same for every
    calibration seed, so it is sampled with the first seed only and its row repeated for the others."""
    if config is None:
        return False
    import cachequant as cq

    c = cq.CacheQuantConfig(**config)  # with the defaults the variant leaves out
    return c.weight_bits is None and c.act_bits is None and c.schedule == "uniform" and not c.dec and not c.vc


def share_fp(first: Path, other: Path) -> bool:
    """Hard-links (or copies) the full-precision variant's samples, Inception features and metrics
    from the first seed's table folder into another seed's, where it is missing. Full precision
    does not calibrate, so its run key and images are the same for every calibration seed; the
    sampler then finds it done (same run key) and the metrics up to date (same SHA-1s)."""
    src, dst = first / "fp", other / "fp"
    info = read_json(src / "info.json")
    if dst.exists() or not is_done(src) or not info or "same_as" in info:
        return False
    dst.mkdir(parents=True)
    for name in ("samples.npz", "inception.npz", "metrics.json", "info.json"):  # info.json last: it marks done
        if (src / name).is_file():
            try:
                os.link(src / name, dst / name)
            except OSError:
                shutil.copyfile(src / name, dst / name)
    return True


def fid_cells(vdir: Path, fp_dir: Path) -> dict:
    """A variant's FID, its bootstrap spread and the paired bootstrap of FID − FID_fp, from the
    ``metrics.json`` files the sampler wrote (empty without them)."""
    m, f = read_json(vdir / "metrics.json") or {}, read_json(fp_dir / "metrics.json") or {}
    if m.get("fid") is None:
        return {}
    out = {"fid": float(m["fid"])}
    boot, fp_boot = m.get("fid_bootstrap") or [], f.get("fid_bootstrap") or []
    if len(boot) > 1:
        out["fid_boot_std"] = float(np.std(boot, ddof=1))
    if f.get("fid") is not None:
        out["dfid_fp"] = float(m["fid"]) - float(f["fid"])
        if len(boot) > 1 and len(fp_boot) == len(boot):
            out["dfid_fp_boot_std"] = float(np.std(np.asarray(boot) - np.asarray(fp_boot), ddof=1))
    return out


def summarise(rows: list[dict], slugs: list[str], versus: str | None) -> list[dict]:
    """Per variant over seeds: PSNR / SSIM mean ± spread, coverage, calibration time, and the paired
    PSNR difference to ``versus`` (same calibration seed); with FIDs, the same for FID and for
    FID − FID_fp, and the mean bootstrap spread of that paired difference."""
    by = {(r["variant"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    out = []
    for s in slugs:
        mine = [by[(s, k)] for k in seeds if (s, k) in by]
        if not mine:
            continue
        psnr_m, psnr_s = _spread([r["psnr_vs_fp"] for r in mine])
        row = {"variant": s, "label": mine[0]["label"], "seeds": [r["seed"] for r in mine],
               "psnr": [r["psnr_vs_fp"] for r in mine], "psnr_mean": psnr_m, "psnr_std": psnr_s,
               "ssim_mean": _spread([r["ssim_vs_fp"] for r in mine])[0],
               "entries_min": min((r["entries_min"] for r in mine if r["entries_min"] is not None), default=None),
               "entries_low_max": max((r["entries_low"] for r in mine if r["entries_low"] is not None), default=None),
               "calibration_seconds_mean": _spread([r["calibration_seconds"] or 0.0 for r in mine])[0],
               "calibration_free": any("same_as_seed" in r for r in mine)}
        if versus and s != versus:
            for d in paired(rows, [(s, versus)]):
                row["delta_psnr_mean"], row["delta_psnr_std"] = d["mean"], d["std"]
        if all("fid" in r for r in mine):
            row["fid"] = [r["fid"] for r in mine]
            row["fid_mean"], row["fid_std"] = _spread(row["fid"])
            if all("dfid_fp" in r for r in mine):
                row["dfid_fp_mean"], row["dfid_fp_std"] = _spread([r["dfid_fp"] for r in mine])
            boots = [r["dfid_fp_boot_std"] for r in mine if "dfid_fp_boot_std" in r]
            if boots:
                row["dfid_fp_boot_std"] = float(np.mean(boots))
            if versus and s != versus:
                for d in paired(rows, [(s, versus)], "fid"):
                    row["delta_fid_mean"], row["delta_fid_std"] = d["mean"], d["std"]
        out.append(row)
    return out


def paired(rows: list[dict], pairs: list[tuple[str, str]], metric: str = "psnr") -> list[dict]:
    """``metric`` (psnr or fid) of A minus that of B per calibration seed both have, with mean and
    spread."""
    field = {"psnr": "psnr_vs_fp", "fid": "fid"}[metric]
    by = {(r["variant"], r["seed"]): r[field] for r in rows if field in r}
    out = []
    for a, b in pairs:
        seeds = sorted(k for (v, k) in by if v == a and (b, k) in by)
        if seeds:
            d = [by[(a, k)] - by[(b, k)] for k in seeds]
            m, sd = _spread(d)
            out.append({"a": a, "b": b, "seeds": seeds, f"delta_{metric}": d, "mean": m, "std": sd})
    return out


def _per_seed(row: dict, key: str) -> str:
    if row.get("calibration_free"):
        return "one sampling: nothing calibrated depends on the seed"
    return " / ".join(f"{x:.2f}" for x in row[key])


def markdown(summary: list[dict], versus: str | None) -> list[str]:
    head = "| variant | PSNR vs FP (dB), mean ± spread | per seed | SSIM | fewest entries per step | calibration (s) |"
    sep = "|---|---|---|---|---|---|"
    if versus:
        head += f" Δ PSNR vs `{versus}` (paired) |"
        sep += "---|"
    lines = [head, sep]
    for r in summary:
        line = (f"| {r['label']} (`{r['variant']}`) | {r['psnr_mean']:.2f} ± {r['psnr_std']:.2f} | "
                f"{_per_seed(r, 'psnr')} | {r['ssim_mean']:.4f} | "
                f"{'–' if r['entries_min'] is None else r['entries_min']} | {r['calibration_seconds_mean']:.0f} |")
        if versus:
            d = r.get("delta_psnr_mean")
            line += " – |" if d is None else f" {d:+.2f} ± {r['delta_psnr_std']:.2f} |"
        lines.append(line)
    return lines


def fid_markdown(summary: list[dict], fp_fid: float | None, versus: str | None) -> list[str]:
    """The FID table: mean ± spread over calibration seeds, per seed, the difference to full
    precision (± over seeds, and ± the bootstrap of the paired difference) and to ``versus``."""
    rows = [r for r in summary if "fid_mean" in r]
    if not rows:
        return []
    head = ("| variant | FID, mean ± spread over seeds | per seed | ΔFID vs FP ± seeds | ΔFID vs FP, bootstrap σ |"
            + (f" ΔFID vs `{versus}` (paired) |" if versus else ""))
    lines = ["" if fp_fid is None else f"Full precision: FID {fp_fid:.2f}.", "", head,
             "|---|---|---|---|---|" + ("---|" if versus else "")]
    for r in rows:
        d = "–" if "dfid_fp_mean" not in r else f"{r['dfid_fp_mean']:+.2f} ± {r['dfid_fp_std']:.2f}"
        b = "–" if "dfid_fp_boot_std" not in r else f"{r['dfid_fp_boot_std']:.2f}"
        line = (f"| {r['label']} (`{r['variant']}`) | {r['fid_mean']:.2f} ± {r['fid_std']:.2f} | "
                f"{_per_seed(r, 'fid')} | {d} | {b} |")
        if versus:
            line += (" – |" if "delta_fid_mean" not in r
                     else f" {r['delta_fid_mean']:+.2f} ± {r['delta_fid_std']:.2f} |")
        lines.append(line)
    return lines


def reuse_plans(src: Path, dst: Path, slugs: list[str]) -> list[str]:
    """Copies each variant's calibrated plan (and its calibration record) from ``src`` where ``dst``
    has none; the sampler then reuses it when the configuration matches (else it calibrates anew).
    Returns the variants copied."""
    copied = []
    for s in slugs:
        plan, record = src / s / "plan.cqplan", src / s / "calibration.json"
        if not (plan.is_file() and record.is_file()) or (dst / s / "plan.cqplan").exists():
            continue
        (dst / s).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(record, dst / s / "calibration.json")
        shutil.copyfile(plan, dst / s / "plan.cqplan")
        copied.append(s)
    return copied


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=list(TABLES), required=True)
    p.add_argument("--calib-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per pipeline call (default: all of --num-samples at once; 2500 on a GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ref-stats", default=None,
                   help="reference .npz from `cachequant ref-stats`: FID per variant and seed as well (a GPU run)")
    p.add_argument("--matmul-tf32", action="store_true", help="as ablation.py sample --matmul-tf32 (DDPM 250 tables)")
    p.add_argument("--work", required=True, help="work folder (one sub-folder per calibration seed; resumable)")
    p.add_argument("--only", help="comma-separated variant slugs (default: every variant of the table)")
    p.add_argument("--versus", help="a variant slug: paired PSNR differences against it")
    p.add_argument("--pairs", nargs="*", default=[], metavar="A:B",
                   help="more paired comparisons: PSNR of variant A minus variant B, per calibration seed")
    p.add_argument("--backend", default="fake", choices=["fake", "fp8-emulated", "int8", "fp8", "auto"],
                   help="how the quantized layers compute (ablation.py sample --backend); default: the reference")
    p.add_argument("--kernel-attention", default="8bit", choices=["8bit", "sdpa"],
                   help="with a backend other than fake: the plans' 8-bit attention matmuls or float SDPA")
    p.add_argument("--fp8-gemm", default=None, choices=["cublaslt", "triton"],
                   help="with --backend fp8 / fp8-emulated: per-tensor (cuBLASLt) or per-channel (Triton) FP8 weight "
                        "scales (ablation.py sample --fp8-gemm)")
    p.add_argument("--plans-from", default=None,
                   help="another run's --work folder: start each variant from its calibrated plan (a plan does "
                        "not depend on the backend), so that only sampling is repeated")
    p.add_argument("--steps", type=int, default=None, help="override the table's step count (smoke tests only)")
    p.add_argument("--model", default=None, help="override the table's model (smoke tests only)")
    p.add_argument("--weights", default=None, help="the table's zoo model with other weights (ablation.py --weights)")
    p.add_argument("--quant-io", action="store_true", help="quantize the first and last layers too "
                   "(ablation.py --quant-io): how every table measured before 2026-12-06 was calibrated")
    p.add_argument("--out", default=None, help="JSON with every (variant, seed) row and the summary")
    a = p.parse_args(argv)
    table = TABLES[a.table]
    slugs = [s for s in a.only.split(",") if s] if a.only else [v.slug for v in table.variants]
    pairs = []
    for spec in a.pairs:
        x, sep, y = spec.partition(":")
        if not sep or not x or not y:
            p.error(f"--pairs entries look like tap-800:uniform-800; got {spec!r}")
        pairs.append((x, y))
    for s in slugs + ([a.versus] if a.versus else []) + [v for pair in pairs for v in pair]:
        try:
            table.variant(s)  # an unknown slug fails before any sampling
        except KeyError as e:
            p.error(str(e.args[0]))
    for extra in ([a.versus] if a.versus else []) + [v for pair in pairs for v in pair]:
        if extra not in slugs:
            slugs.append(extra)
    slugs = [s for s in slugs if s != "fp"]
    if len(set(a.calib_seeds)) != len(a.calib_seeds):
        p.error(f"--calib-seeds must be distinct, got {a.calib_seeds}")
    if a.batch_size is not None and not 0 < a.batch_size <= a.num_samples:
        p.error(f"--batch-size {a.batch_size}: give 1 to --num-samples ({a.num_samples}) images per call")
    if a.ref_stats and not Path(a.ref_stats).is_file():
        p.error(f"--ref-stats {a.ref_stats}: no such file (make it with `cachequant ref-stats`)")
    from cachequant.metrics import psnr, ssim

    rows, fp_fid = [], None
    first = Path(a.work) / f"seed{a.calib_seeds[0]}" / a.table
    free = {s for s in slugs if calibration_free(table.variant(s).config)}
    for seed in a.calib_seeds:
        work = Path(a.work) / f"seed{seed}"
        later = seed != a.calib_seeds[0]
        if later:
            share_fp(first, work / a.table)
        run = [s for s in slugs if not (later and s in free)]
        cmd = [sys.executable, str(ROOT / "benchmarks/ablation.py"), "sample", "--table", a.table,
               "--only", ",".join(run), "--num-samples", str(a.num_samples),
               "--batch-size", str(a.batch_size or a.num_samples),
               "--device", a.device, "--work", str(work), "--calib-seed", str(seed), "--quiet"]
        cmd += (["--ref-stats", a.ref_stats] if a.ref_stats else []) + (["--matmul-tf32"] if a.matmul_tf32 else [])
        cmd += (["--steps", str(a.steps)] if a.steps else []) + (["--model", a.model] if a.model else [])
        cmd += ["--weights", a.weights] if a.weights else []
        cmd += ["--quant-io"] if a.quant_io else []
        cmd += ["--backend", a.backend, "--kernel-attention", a.kernel_attention]
        cmd += ["--fp8-gemm", a.fp8_gemm] if a.fp8_gemm else []
        if a.plans_from:
            reuse_plans(Path(a.plans_from) / f"seed{seed}" / a.table, work / a.table, slugs)
        if run:
            print("$", " ".join(cmd[1:]), flush=True)
            if subprocess.run(cmd).returncode != 0:
                print(f"seed {seed}: some variants failed (their error.json says why); the others are reported",
                      file=sys.stderr, flush=True)
        fp, _ = _images(work, work / a.table / "fp")
        fp_fid = (read_json(work / a.table / "fp" / "metrics.json") or {}).get("fid", fp_fid)
        for s in slugs:
            if later and s in free:  # the same samples as the first seed's: its row again
                rows += [dict(r, seed=seed, same_as_seed=a.calib_seeds[0]) for r in rows
                         if r["variant"] == s and r["seed"] == a.calib_seeds[0]]
                continue
            vdir = work / a.table / s
            if resolve_samples(work, vdir) is None:
                continue
            im, info = _images(work, vdir)
            rows.append({"variant": s, "label": table.variant(s).label, "seed": seed, "psnr_vs_fp": psnr(im, fp),
                         "ssim_vs_fp": ssim(im, fp), "calibration_seconds": info.get("calibration_seconds"),
                         **calibration_coverage(info), **fid_cells(vdir, work / a.table / "fp")})
    summary = summarise(rows, slugs, a.versus)
    print(f"\n{table.title}: {a.num_samples} samples, calibration seeds {', '.join(map(str, a.calib_seeds))}, "
          f"{a.device}; PSNR / SSIM vs full precision (same sampling seeds)\n")
    print("\n".join(markdown(summary, a.versus)))
    if a.ref_stats:
        print("\n".join(fid_markdown(summary, fp_fid, a.versus)))
    diffs = paired(rows, pairs)
    if diffs:
        print("\n| A − B (paired by calibration seed) | Δ PSNR (dB), mean ± spread | per seed |\n|---|---|---|")
        for d in diffs:
            print(f"| `{d['a']}` − `{d['b']}` | {d['mean']:+.2f} ± {d['std']:.2f} | "
                  f"{' / '.join(f'{x:+.2f}' for x in d['delta_psnr'])} |")
    if a.out:
        from cachequant.zoo import weights_record

        env = environment(a.device)
        # the sampling runs in ablation.py processes, which switch TF32 on from --matmul-tf32; this
        # process never does, so its own flag would record the opposite of what the rows ran with
        env["matmul_allow_tf32"] = bool(a.matmul_tf32)

        write_json(Path(a.out), {"command": " ".join(sys.argv), "table": a.table, "num_samples": a.num_samples,
                                 **weights_record(a.model or table.model, a.weights), "backend": a.backend,
                                 **({"kernel_attention": a.kernel_attention} if a.backend != "fake" else {}),
                                 **({"fp8_gemm": a.fp8_gemm} if a.fp8_gemm else {}),
                                 "calib_seeds": a.calib_seeds, "environment": env, "rows": rows,
                                 **({"ref_stats": a.ref_stats, "fp_fid": fp_fid} if a.ref_stats else {}),
                                 "summary": summary, "paired": diffs}, indent=1, default=None)
        print(f"written {a.out}")
    missing = set(slugs) - {r["variant"] for r in rows}
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
