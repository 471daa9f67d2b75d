"""FID against training images seen, and the ε-MSE curve, of a zoo model's training runs: where
the curve stands against the data floor and the target (``results/training/README.md``).

    python benchmarks/training_curve.py --run results/training/unet-run1 results/training/unet-run2 \\
        results/training/unet-run3 --fp-row results/quality/unet-ddim100-main.json \\
        cachequant/zoo/weights/cifar10-unet/train_info.json "shipped weights" \\
        --floor results/quality/fid-floor.json --target 12 --out results/training/fid-vs-images-unet.png

Each ``--run`` folder holds what ``benchmarks/device/train.sh`` wrote: ``train_info-MODEL.json``
(the runs and the loss curve: step, ε-MSE averaged over 500 steps, seconds) and ``fid-MODEL.json``
(``cachequant evaluate``'s metrics). ``--fp-row`` adds a checkpoint scored elsewhere: the
full-precision row of an ablation table with the checkpoint's ``train_info.json``. The figure's
numbers also go to a JSON beside it (same name, ``.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.io import write_json


def images_at(info: dict, step: int) -> int:
    """Images seen after ``step`` iterations: each run's own batch size over its steps (a resumed or
    re-initialised model's runs can differ); a file without runs used one batch throughout."""
    runs = info.get("runs") or [{"from_step": 0, "to_step": info["iterations"], "batch": info["batch"]}]
    seen = 0
    for r in runs:
        lo, hi = r["from_step"], r["to_step"]
        seen += max(0, min(step, hi) - lo) * r["batch"]
    last = runs[-1]
    return seen + max(0, step - last["to_step"]) * last["batch"]


def read_run(folder: Path) -> dict:
    """One run's point (images seen, FID, precision, recall) and its loss curve in images."""
    infos, fids = sorted(folder.glob("train_info*.json")), sorted(folder.glob("fid-*.json"))
    fids = [f for f in fids if f.stem.count("-") == 1]  # fid-unet.json, not fid-unet-tf / -cache-n5
    if len(infos) != 1 or len(fids) != 1:
        raise SystemExit(f"--run {folder}: expected one train_info*.json and one fid-MODEL.json "
                         f"(found {len(infos)} and {len(fids)})")
    info, m = json.loads(infos[0].read_text()), json.loads(fids[0].read_text())["metrics"]
    return {"label": folder.name, "images": info["images_seen"], "fid": m["fid"], "precision": m.get("precision"),
            "recall": m.get("recall"), "curve": [[images_at(info, s), loss] for s, loss, *_ in info.get("curve", [])]}


def read_fp_row(table_json: str, train_info: str, label: str) -> dict:
    """A checkpoint scored as an ablation table's full-precision row."""
    rows = {r["variant"]: r for r in json.loads(Path(table_json).read_text())["rows"]}
    if "fp" not in rows or not (rows["fp"].get("metrics") or {}).get("fid"):
        raise SystemExit(f"--fp-row {table_json}: no full-precision row with a FID")
    info, m = json.loads(Path(train_info).read_text()), rows["fp"]["metrics"]
    images = info.get("images_seen", info["iterations"] * info["batch"])
    return {"label": label, "images": images, "fid": m["fid"], "precision": m.get("precision"),
            "recall": m.get("recall"), "curve": []}


def plot(points: list[dict], floor: float | None, target: float | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    pts = sorted(points, key=lambda p: p["images"])
    a.plot([p["images"] / 1e6 for p in pts], [p["fid"] for p in pts], "o-", color="C0")
    for p in pts:
        a.annotate(f"{p['label']}\n{p['fid']:.2f}", (p["images"] / 1e6, p["fid"]), textcoords="offset points",
                   xytext=(6, 4), fontsize=8)
    if floor is not None:
        a.axhline(floor, color="grey", ls=":", label=f"data floor {floor:.2f}")
    if target is not None:
        a.axhline(target, color="C3", ls="--", label=f"target {target:g}")
    a.set_xscale("log")
    a.set_yscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

    for axis, ticks in ((a.xaxis, [0.5, 1, 2, 5, 10, 20, 50, 100]), (a.yaxis, [5, 10, 20, 50, 100])):
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_locator(NullLocator())
        axis.set_minor_formatter(NullFormatter())
    a.set_xlim(min(p["images"] for p in pts) / 1e6 / 1.5, max(p["images"] for p in pts) / 1e6 * 2.5)
    a.set_xlabel("training images seen (millions)")
    a.set_ylabel("FID, 10k samples")
    a.legend(fontsize=8)
    a.grid(alpha=0.3, which="both")
    # a resumed run's curve holds its parent's: the longest is drawn first and widest, under the others
    curves = sorted((p for p in pts if p["curve"]), key=lambda p: -len(p["curve"]))
    for i, p in enumerate(curves):
        b.plot([c[0] / 1e6 for c in p["curve"]], [c[1] for c in p["curve"]], color=f"C{i + 1}",
               lw=3 if i == 0 else 1, label=p["label"])
    b.set_xlabel("training images seen (millions)")
    b.set_ylabel("ε-MSE (mean of 500 steps)")
    b.set_ylim(top=0.035)
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs="+", default=[], help="folders written by benchmarks/device/train.sh")
    ap.add_argument("--fp-row", nargs=3, action="append", default=[], metavar=("TABLE_JSON", "TRAIN_INFO", "LABEL"),
                    help="a checkpoint scored as the full-precision row of an ablation table")
    ap.add_argument("--floor", help="fid-floor.json (benchmarks/fid_floor.py): the torch-resize row is drawn")
    ap.add_argument("--target", type=float, default=None, help="the FID target, drawn as a line")
    ap.add_argument("--out", required=True, help="the figure (.png); its numbers go to the same name with .json")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.suffix != ".png":
        ap.error(f"--out {a.out}: give a .png path")
    if not a.run and not a.fp_row:
        ap.error("give at least one --run or --fp-row")
    for folder in a.run:
        if not Path(folder).is_dir():
            ap.error(f"--run {folder}: no such folder")
    points = [read_run(Path(f)) for f in a.run] + [read_fp_row(*r) for r in a.fp_row]
    floor = None
    if a.floor:
        rows = [r for r in json.loads(Path(a.floor).read_text())["rows"] if r["resize"] == "torch"]
        floor = rows[0]["fid"] if rows else None
    plot(points, floor, a.target, out)
    write_json(out.with_suffix(".json"), {"command": " ".join(sys.argv), "floor": floor, "target": a.target,
                                          "points": [{k: v for k, v in p.items() if k != "curve"} for p in points]},
               indent=1)
    for p in sorted(points, key=lambda p: p["images"]):
        print(f"{p['label']:>20}: {p['images'] / 1e6:6.2f} M images, FID {p['fid']:.2f}")
    print(f"written {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
