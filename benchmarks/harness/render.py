"""The quality study's report: a table's rows as markdown, the report with its setup and commands,
and its plots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from .io import read_json, write_text
from .tables import TABLES, table_commands, gather_table


JPEG_NOTE = ("The CIFAR FID here is against the JPEG-q75 re-encoding of CIFAR-10 (`shared/data/cifar10`), computed "
             "with the early-stage shipped models: it is not comparable to published CIFAR-10 FIDs.")


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
            **calibration_coverage(info),
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


def calibration_coverage(info: dict | None) -> dict:
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
    cmds = [c for d in datas for c in (d.get("merged_commands") or table_commands([d]))]
    lines += cmds or ["# (none recorded)"]
    lines += ["python " + " ".join(sys.argv), "```", ""]
    for d in datas:
        lines += render_table(d) + [""]
    lines += ["## Analysis", "", "> **TODO (placeholder):** to be written after reading the numbers above.", ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    write_text(path, "\n".join(lines) + "\n")
    (plot_bars if name == "qandc" else plot)(datas, out / f"{name}.png", title)
    return path


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
