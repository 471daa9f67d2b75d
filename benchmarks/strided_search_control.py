"""Control for the activation range-search fix: the same ablation variants with the *old* error
sample put back, everything else the current code.

The range search once measured each candidate's error on ``flat[:: numel // 16384 + 1]``. With the
channel axis innermost, that stride visits only ``C / gcd(stride, C)`` channels, so whether a few
outlier channels were seen depended on how many calibration entries a step had
(``cachequant/quant/quantizer.py``, ``activation_range``, says why it now samples stratified). This
script swaps the strided sample back in for one process and re-samples the chosen variants, so that
a difference to the current numbers is the sampling alone — not the other changes made since::

    python benchmarks/strided_search_control.py --table qandc-fair --only tap-800,random-800,uniform-800 \\
        --calib-seed 0 --num-samples 16 --device cpu --work /tmp/strided \\
        --compare results/qandc/fair-cpu.json --out results/qandc/strided-control-cpu.json

``--compare`` reads the same variants at the same calibration seed from a ``calib_seeds.py`` JSON (the
current search) and prints both side by side. The strided sample exists only inside this process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablation  # noqa: E402
from calib_seeds import _images  # noqa: E402
from harness.env import environment  # noqa: E402
from harness.io import write_json  # noqa: E402
from harness.render import calibration_coverage  # noqa: E402
from harness.sampling import resolve_samples  # noqa: E402
from harness.tables import TABLES  # noqa: E402

from cachequant.quant import quantizer  # noqa: E402


def strided_error_sample(flat: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-fix sample: every ``numel // count + 1``-th element, each weighted 1."""
    values = flat[:: flat.numel() // count + 1]
    return values, torch.ones_like(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=list(TABLES), required=True)
    p.add_argument("--only", required=True, help="comma-separated variant slugs")
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", required=True, help="work folder (resumable; keep it apart from the current search's)")
    p.add_argument("--compare", default=None, help="a calib_seeds.py JSON with the current search's numbers")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    table = TABLES[a.table]
    slugs = [s for s in a.only.split(",") if s and s != "fp"]
    for s in slugs:
        try:
            table.variant(s)
        except KeyError as e:
            p.error(str(e.args[0]))
    current = {}
    if a.compare:
        current = {r["variant"]: r["psnr_vs_fp"] for r in json.loads(Path(a.compare).read_text())["rows"]
                   if r["seed"] == a.calib_seed}
    quantizer._error_sample = strided_error_sample  # this process only: activation_range looks it up per call
    work = Path(a.work)
    rc = ablation.main(["sample", "--table", a.table, "--only", ",".join(["fp"] + slugs),
                        "--num-samples", str(a.num_samples), "--batch-size", str(a.num_samples),
                        "--device", a.device, "--work", str(work), "--calib-seed", str(a.calib_seed), "--quiet"])
    from cachequant.metrics import psnr

    fp, _ = _images(work, work / a.table / "fp")
    rows = []
    print(f"\n{table.title}: calibration seed {a.calib_seed}, {a.num_samples} samples, {a.device}; PSNR vs FP (dB)\n")
    print("| variant | strided search (pre-fix) | current search | entries per step (min) |\n|---|---|---|---|")
    for s in slugs:
        vdir = work / a.table / s
        if resolve_samples(work, vdir) is None:
            print(f"| `{s}` | failed: see {vdir}/error.json | | |")
            continue
        im, info = _images(work, vdir)
        row = {"variant": s, "label": table.variant(s).label, "seed": a.calib_seed, "psnr_vs_fp": psnr(im, fp),
               "psnr_vs_fp_current_search": current.get(s), **calibration_coverage(info)}
        rows.append(row)
        cur = f"{row['psnr_vs_fp_current_search']:.2f}" if row["psnr_vs_fp_current_search"] is not None else "–"
        print(f"| `{s}` | {row['psnr_vs_fp']:.2f} | {cur} | {row.get('entries_min', '–')} |")
    if a.out:
        write_json(Path(a.out), {"command": " ".join(sys.argv), "table": a.table, "calib_seed": a.calib_seed,
                                 "num_samples": a.num_samples, "environment": environment(a.device),
                                 "error_sample": "flat[:: numel // 16384 + 1], unit weights", "rows": rows},
                   indent=1, default=None)
        print(f"written {a.out}")
    return rc if rows else 1


if __name__ == "__main__":
    sys.exit(main())
