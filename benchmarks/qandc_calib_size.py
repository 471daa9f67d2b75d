"""Does the Q&C table's ranking come from *which* entries a selection picks, or from *how many* it
keeps per denoising step? A follow-up to `results/qandc/README.md`, small enough for a CPU.

In that table every selection of 256 entries (TAP, random, k-means, …) calibrated worse than the
baseline, which keeps the whole pool (32 trajectories × 50 steps = 1,600 entries). Activation
ranges are per step (``per_step_act``), so a selection of 256 leaves ~5 entries per step, and some
steps 1 or 2. This script samples the table's variants with the selection size and method varied
and reports, against the same seeds in full precision, PSNR / SSIM (a proxy: FID needs thousands of
samples, this runs on a CPU) next to how the selection covered the steps:

    python benchmarks/qandc_calib_size.py --device cpu --num-samples 16 --work /tmp/qandc-size \
        --out results/qandc/calib-size-cpu.json

With ``--table-json results/qandc/dit-ddim50-n3.json`` it instead reads the GPU table and prints, for
its 256-entry selections without VC / DEC, the per-step coverage next to FID and their Spearman
rank correlation (no sampling).

It drives ``benchmarks/ablation.py sample`` (one work folder per selection size; resumable), so
each variant is exactly the table's, apart from ``--calib-select``. On 2 CPU cores a variant takes
about 2 minutes (16 samples); the default runs, about 35 minutes.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.env import environment  # noqa: E402
from harness.io import write_json  # noqa: E402
from harness.render import calibration_coverage, table_rows  # noqa: E402
from harness.sampling import resolve_samples  # noqa: E402
from harness.tables import TABLES  # noqa: E402

# (selection size, variants of the qandc table); "baseline" keeps the whole pool whatever the size
DEFAULT_RUNS = ["256:baseline,calib-uniform-per-step,tap,calib-random,tap-lam0.3",
                "800:calib-uniform-per-step,tap,calib-random,tap-lam0.3",
                "256/1:baseline,tap", "800/1:calib-uniform-per-step,calib-random"]


def _parse_run(spec: str) -> tuple[int, int, list[str]]:
    """``SIZE[/SEED]:slug,slug``; SEED (default 0) is ``CacheQuantConfig.seed``: it draws both the
    calibration trajectories (the pool) and the selection."""
    head, _, slugs = spec.partition(":")
    size, _, seed = head.partition("/")
    if not size.isdigit() or not slugs or (seed and not seed.isdigit()):
        raise SystemExit(f"--runs entries look like 256:tap,calib-random or 800/1:tap; got {spec!r}")
    return int(size), int(seed or 0), [s for s in slugs.split(",") if s]


def _work(root: str, size: int, seed: int) -> Path:
    return Path(root) / (f"select{size}" + (f"-seed{seed}" if seed else ""))


def act_scales(plan_path: Path) -> dict[str, np.ndarray]:
    """Per-position activation scales of a plan, one row per quantizer (``<quantizer>.scale``:
    ``act.<layer>.<part>`` from the plan's ``act.<layer>`` table, ``attn.<module>.<operand>`` from
    ``attn.<module>``; weight scales ``w.*`` left out), NaN at the positions the quantizer never
    observed (the plan fills them with the nearest observed position's range; see ``observed``)."""
    from safetensors import safe_open

    with safe_open(str(plan_path), "np") as f:
        raw = (f.metadata() or {}).get("cachequant")
        tables = {k: f.get_tensor(k).astype(np.float64) for k in f.keys() if k.startswith(("act.", "attn."))}
    meta = json.loads(raw) if raw else {}
    out = {}
    for k in sorted(tables):
        kind, name = k.split(".", 1)
        t = tables[k]  # (parts or operands, 2 [scale, zero point], T)
        seen = observed(meta, name, t.shape[-1])
        labels = ATTENTION_OPERANDS if kind == "attn" else [str(i) for i in range(t.shape[0])]
        for label, table in zip(labels, t):
            out[f"{k}.{label}.scale"] = np.where(seen, table[0], np.nan)
    return out


ATTENTION_OPERANDS = ("q", "k", "p", "v")  # the rows of an attn.<module> table (cachequant.plan)


def observed(meta: dict, module: str, T: int) -> np.ndarray:
    """The positions ``module``'s quantizers observed in calibration, from the plan's metadata: none
    before the first position the runs visit (``sampler.begin``); with a selection, only positions
    some selected entry is at (``calibration_selection.per_step``); in a module a cached position
    skips (the cache layout of ``cache.site``), only the full positions (``cache.schedule``)."""
    seen = np.ones(T, dtype=bool)
    seen[: (meta.get("sampler") or {}).get("begin", 0)] = False
    per_step = ((meta.get("diagnostics") or {}).get("calibration_selection") or {}).get("per_step")
    if per_step is not None:
        seen &= np.array([int(per_step.get(str(t), 0)) > 0 for t in range(T)])
    cache = meta.get("cache") or {}
    if cache.get("kind", "none") != "none" and any(module == m or module.startswith(m + ".")
                                                   for m in _skipped_modules(json.dumps(meta["fingerprint"]),
                                                                             json.dumps(cache["site"]))):
        seen &= np.isin(np.arange(T), cache["schedule"])
    return seen


@functools.lru_cache(maxsize=8)
def _skipped_modules(fingerprint: str, site: str) -> tuple[str, ...]:
    """The modules a cached position skips: the adapter's cache layout of ``site`` on the plan's
    architecture (built from its config on the meta device: no weights)."""
    import diffusers
    import torch

    from cachequant.models.adapters import adapter_for

    fp = json.loads(fingerprint)
    with torch.device("meta"):
        model = getattr(diffusers, fp["cls"]).from_config(fp["config"])
    return adapter_for(model).layout(model, json.loads(site)).modules


def range_vs(scales: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict:
    """Activation ranges (∝ scales) against the reference plan's, over every (quantizer, step) both
    observed: the median ratio, the share narrower by more than 20 % (where more values clip), and
    the quantizers with the most such steps."""
    ratios, narrow = [], {}
    for k in ref:
        if k in scales and ref[k].size == scales[k].size:
            r = scales[k].ravel() / ref[k].ravel()
            r = r[np.isfinite(r) & (r > 0)]
            ratios.append(r)
            if (r < 0.8).sum():
                narrow[k[: -len(".scale")]] = int((r < 0.8).sum())
    r = np.concatenate(ratios)
    top = sorted(narrow.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    return {"range_ratio_median": float(np.median(r)), "range_narrower_20pct": float((r < 0.8).mean()),
            "most_narrowed": [f"{k} ({n} steps)" for k, n in top]}


def coverage_vs_fid(path: Path) -> int:
    """Per selection variant of a finished qandc table: steps left with ≤ 2 calibration entries, FID."""
    from scipy.stats import spearmanr

    data = json.loads(path.read_text())
    pts = []
    for r in table_rows(data):
        row = next(x for x in data["rows"] if x["variant"] == r["variant"])
        cfg = ((row["info"] or {}).get("config") or {})
        if r["same_as"] or r["fid"] is None or r["entries_low"] is None or cfg.get("calibration") == "trajectory" \
                or cfg.get("vc") or cfg.get("dec"):
            continue
        pts.append((r["variant"], r["entries_min"], r["entries_low"], r["fid"]))
    print("| variant | fewest entries per step | steps with ≤ 2 | FID |\n|---|---|---|---|")
    for v, lo, n2, fid in pts:
        print(f"| `{v}` | {lo} | {n2} | {fid:.2f} |")
    rho = spearmanr([p[2] for p in pts], [p[3] for p in pts])
    print(f"\nSpearman rank correlation (steps with ≤ 2 entries vs FID) over {len(pts)} selections: "
          f"{rho.statistic:.2f} (p = {rho.pvalue:.3f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--work", help="work folder for the sampling (required unless --table-json)")
    p.add_argument("--table-json", help="a qandc table's JSON (ablation.py metrics): coverage vs FID, no sampling")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="SIZE:variant,variant,… (qandc table slugs)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.table_json:
        return coverage_vs_fid(Path(a.table_json))
    if not a.work:
        p.error("--work is required to sample (or give --table-json to read a finished table)")

    from cachequant.metrics import psnr, ssim
    table = TABLES["qandc"]
    runs = [_parse_run(s) for s in a.runs]
    for _, _, slugs in runs:
        for s in slugs:
            table.variant(s)  # unknown slug: fail before sampling anything
    rows = []
    for size, seed, slugs in runs:
        work = _work(a.work, size, seed)
        cmd = [sys.executable, str(ROOT / "benchmarks/ablation.py"), "sample", "--table", "qandc", "--only", ",".join(slugs),
               "--num-samples", str(a.num_samples), "--batch-size", str(a.num_samples), "--device", a.device,
               "--work", str(work), "--calib-select", str(size), "--calib-seed", str(seed), "--quiet"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        fp_dir = resolve_samples(work, work / "qandc" / "fp")
        fp = np.load(fp_dir / "samples.npz")["images"].astype(np.float64) / 255
        for s in slugs:
            vdir = work / "qandc" / s
            sdir = resolve_samples(work, vdir)
            if sdir is None:
                raise SystemExit(f"{vdir} has no samples: see its error.json")
            im = np.load(sdir / "samples.npz")["images"].astype(np.float64) / 255
            info = json.loads((sdir / "info.json").read_text())
            sel = (info["calibration"].get("diagnostics") or {}).get("calibration_selection") or {}
            rows.append({"select": size, "seed": seed, "variant": s, "calibration": info["config"]["calibration"],
                         "psnr_vs_fp": psnr(im, fp), "ssim_vs_fp": ssim(im, fp),
                         "calibration_seconds": info.get("calibration_seconds"), "selected": sel.get("selected"),
                         "clusters": sel.get("clusters"), "random_top_up": sel.get("random_top_up"),
                         **calibration_coverage(info)})
    # activation ranges against the baseline plan calibrated on the same pool (same seed)
    bases = {seed: _work(a.work, size, seed) / "qandc" / "baseline" / "plan.cqplan"
             for size, seed, slugs in runs if "baseline" in slugs}
    for r in rows:
        base = bases.get(r["seed"])
        if base is not None and base.is_file():
            plan = _work(a.work, r["select"], r["seed"]) / "qandc" / r["variant"] / "plan.cqplan"
            r.update(range_vs(act_scales(plan), act_scales(base)))
    print(f"\nqandc variants, {a.num_samples} samples each, {a.device}; PSNR / SSIM vs full precision (same seeds)\n")
    print("| variant | calibration | seed | entries | PSNR vs FP (dB) | SSIM vs FP | fewest per step | steps with ≤ 2 "
          "| activation range / baseline's (median) | ranges > 20 % narrower | most narrowed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["selected"] if r["selected"] is not None else "all"
        print(f"| `{r['variant']}` | {r['calibration']} | {r['seed']} | {n} | {r['psnr_vs_fp']:.2f} | {r['ssim_vs_fp']:.4f} | "
              f"{r['entries_min']} | {r['entries_low']} | {r.get('range_ratio_median', float('nan')):.3f} | "
              f"{100 * r.get('range_narrower_20pct', float('nan')):.0f} % | {', '.join(r.get('most_narrowed', []))} |")
    if a.out:
        env = environment(a.device)
        write_json(Path(a.out), {"command": " ".join(sys.argv), "num_samples": a.num_samples,
                                 "environment": env, "rows": rows}, indent=1, default=None)
        print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
