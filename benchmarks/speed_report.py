"""Renders the JSON files of ``benchmarks/speed.py`` into the tables of ``benchmarks/results/<device>.md``.

    python benchmarks/speed_report.py benchmarks/results/h200-*.json > /tmp/tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def kernels_table(rows: list[dict]) -> str:
    algos = ["two-pass", "fused"]
    if any(f"{k}_two-pass-nosplit_tops" in r for r in rows for k in ("int8", "fp8")):
        algos.insert(1, "two-pass-nosplit")  # the same kernel with split-K off
    names = [f"{k.upper()} {a.replace('two-pass-nosplit', 'two-pass, no split-K')}" for k in ("int8", "fp8")
             for a in algos]
    out = ["| operation | fp16 (torch) TFLOP/s | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
    graph = any("fp16_torch_graph_tops" in r for r in rows)
    ceil = []
    for r in rows:
        if "tops" in r:
            ceil.append(f"- {r['op']}: **{r['tops']:.0f}** TOPS")
            continue
        cells = [fmt(r.get(f"{k}_{a}_tops"), ".0f") for k in ("int8", "fp8") for a in algos]
        out.append(f"| {r['op']} | {fmt(r.get('fp16_torch_tops'), '.0f')} | " + " | ".join(cells) + " |")
        if graph:
            cells = [fmt(r.get(f"{k}_{a}_graph_tops"), ".0f") for k in ("int8", "fp8") for a in algos]
            out.append(f"| ↳ graph-replayed | {fmt(r.get('fp16_torch_graph_tops'), '.0f')} | " + " | ".join(cells) + " |")
    return "Measured ceilings (same run):\n\n" + "\n".join(ceil) + "\n\n" + "\n".join(out)


def rows_table(res: dict) -> str:
    head = (f"**{res['model']}**, {res['sampler'].upper()} {res['steps']} steps, "
            f"{res.get('gmacs_per_image_call', 0):.0f} GMACs (linear + conv) per image per full model call\n\n")
    out = ["| row | batch | s / image | × fp16 eager | × fp16 compile | peak GiB | notes |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "median_s" not in r:
            out.append(f"| {r['row']} | {r['batch']} | – | – | – | – | {r.get('error', '')} |")
            continue
        notes = []
        if "full_steps" in r:
            notes.append(f"{r['full_steps']}/{r['calls']} full steps")
        if r.get("fake_layers"):
            notes.append(f"{r['fake_layers']} layers on the reference path")
        out.append(f"| {r['row']} | {r['batch']} | {r['s_per_image']:.3f} | {fmt(r.get('speedup_vs_eager'))} | "
                   f"{fmt(r.get('speedup_vs_compile'))} | {r['peak_mem_gib']:.1f} | {'; '.join(notes)} |")
    return head + "\n".join(out)


def profile_table(res: dict) -> str:
    """GPU time of one profiled image per kernel category (``speed.py --profile``), per row."""
    prof = [(r["row"], r["profile"]) for r in res["rows"] if r.get("profile")]
    if not prof:
        return ""
    cats: list[str] = []
    for _, p in prof:
        cats += [c for c in p["ms_by_category"] if c not in cats]
    out = ["| row | wall ms | GPU kernel ms | GPU idle | " + " | ".join(cats) + " |", "|---" * (4 + len(cats)) + "|"]
    for row, p in prof:
        cells = [fmt(p["ms_by_category"].get(c), ".0f") for c in cats]
        out.append(f"| {row} | {p['wall_ms']:.0f} | {p['gpu_kernel_ms']:.0f} | {100 * p['gpu_idle_fraction']:.0f} % | "
                   + " | ".join(cells) + " |")
    text = "\n\nProfile of one image (ms of GPU kernel time per category):\n\n" + "\n".join(out)
    for row, p in prof:
        top = p.get("top_other_kernels")
        if top:
            text += (f"\n\nLargest 'other' kernels, {row}:\n\n| kernel | ms | launches |\n|---|---|---|\n"
                     + "\n".join(f"| `{k['kernel'][:100]}` | {k['ms']:.1f} | {k['launches']} |" for k in top))
    return text


def main(paths: list[str]) -> int:
    for p in paths:
        res = json.loads(Path(p).read_text())
        env = res["env"]
        print(f"### {Path(p).name}\n")
        print(f"`{env['command']}` — {env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
              f"diffusers {env['diffusers']}, torchao {env['torchao']}\n")
        print(kernels_table(res["kernels"]) if "kernels" in res else rows_table(res) + profile_table(res))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
