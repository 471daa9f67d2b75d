"""Renders the JSON files of ``benchmarks/speed.py`` into the tables of ``results/speed/README.md``.

    python benchmarks/speed_report.py results/speed/*.json > /tmp/tables.md
    python benchmarks/speed_report.py --coverage results/speed/sd15-*.json results/speed/dit-*.json results/speed/torchao-*.json

``--coverage`` checks the files against the rows the speed issue asks for (``REQUIRED``): for each
configuration and row, the newest file that measured it, else the newest error (a row that could
not run, and why), else "missing".
"""

from __future__ import annotations

import argparse
import json
import re
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
            why = r.get("error") or ("warm-up run only (--repeats 0)" if r.get("warmup_only") else "")
            out.append(f"| {r['row']} | {r['batch']} | – | – | – | – | {why} |")
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


_LOWERING = ("GraphLowering.run", "Scheduler.__init__", "Scheduler.codegen")
# speed.time_runs's error for a warm-up stopped by its limit; the group is the limit in seconds
WARMUP_CUT = re.compile(r"warm-up run \(compilation, graph capture\) did not finish in ([0-9.]+) s")


def warmup_table(res: dict) -> str:
    """Where each compiled row's warm-up went (``compile_phases_s``, written by speed.py): the
    compile step, inductor's share of it, the wait for its Triton workers, and the rest, which is
    the first run through the compiled model. A warm-up cut by its limit counts up to the cut
    (its "rest" is a lower bound, marked ≥); its compile phases are those that had returned."""
    rows = [r for r in res["rows"] if r.get("compile_phases_s")]
    if not rows:
        return ""
    out = ["| row | batch | warm-up s | compile step s | of which inductor lowering, scheduling, codegen | "
           "of which waiting for Triton workers | rest (first run) s | inductor caches, tuning |", "|---" * 8 + "|"]
    for r in rows:
        ph = r["compile_phases_s"]
        warm, cut = r.get("warmup_s"), ""
        if warm is None:
            m = WARMUP_CUT.search(r.get("error", ""))
            warm, cut = (float(m.group(1)), "≥ ") if m else (None, "")
        step = ph.get("_compile.compile_inner", 0.0)
        low = sum(ph.get(k, 0.0) for k in _LOWERING)
        rest = f"{cut}{warm - step:.1f}" if warm is not None else "–"
        counts = {**r.get("inductor_cache", {}), **r.get("inductor_tuning", {})}
        cache = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        out.append(f"| {r['row']} | {r['batch']} | {cut}{fmt(warm, '.1f')} | {step:.1f} | {fmt(low or None, '.1f')} | "
                   f"{fmt(ph.get('async_compile.wait'), '.1f')} | {rest} | {cache} |")
    text = "\n\nWarm-up of the compiled rows (seconds):\n\n" + "\n".join(out)
    for r in rows:
        prof = r.get("warmup_profile")
        if prof and prof["inclusive"]:
            # the callers every sample shares (the script, the pipeline, the compiled module's
            # entry) say nothing about where the time went: left out, and counted
            shared = [x for x in prof["inclusive"] if x["s"] >= 0.99 * prof["sampled_s"]]
            inner = [x for x in prof["inclusive"] if x not in shared][:15]
            text += (f"\n\nWarm-up stack samples, {r['row']} (batch {r['batch']}, {prof['sampled_s']} s sampled; "
                     f"{len(shared)} callers on the stack throughout left out), seconds with the function on the "
                     "stack / innermost:\n\n| function | on stack | innermost |\n|---|---|---|\n")
            own = {x["function"]: x["s"] for x in prof["own"]}
            text += "\n".join(f"| `{x['function']}` | {x['s']:.1f} | {fmt(own.get(x['function']), '.1f')} |"
                               for x in inner)
            text += ("\n\nInnermost functions: " +
                     ", ".join(f"`{x['function']}` {x['s']:.1f}" for x in prof["own"][:8]) + ".")
    return text


# The speed issue's configurations (model, sampler, steps, batch) and rows, as speed.py names them
# (a row matches when the pattern is a substring of its name).
_COMMON = ["fp16 eager", "fp16 + torch.compile", "diffusers FirstBlockCache", "torchao int8 dynamic + compile",
           "torchao float8 dynamic + compile", "cachequant INT8 quant-only + graph",
           "cachequant FP8 quant-only + graph"]
_SD = _COMMON + ["DeepCache N=3", "DeepCache N=5", "cachequant cache-only N=5", "CacheQuant N=5 INT8 + graph",
                 "CacheQuant N=5 FP8 + graph"]
_DIT = _COMMON + ["cachequant cache-only N=2", "cachequant cache-only N=3", "CacheQuant N=2 INT8 + graph",
                  "CacheQuant N=2 FP8 + graph", "CacheQuant N=3 INT8 + graph", "CacheQuant N=3 FP8 + graph"]
REQUIRED: dict[tuple[str, str, int, int], list[str]] = {
    ("sd15", "pndm", 50, 1): _SD, ("sd15", "pndm", 50, 8): _SD,
    ("dit-xl2", "ddpm", 250, 1): _DIT, ("dit-xl2", "ddpm", 250, 8): _DIT,
    ("dit-xl2", "ddim", 50, 1): _DIT, ("dit-xl2", "ddim", 50, 8): _DIT,
}


def _matches(pattern: str, name: str) -> bool:
    """Substring match that does not take "N=3" for "N=30" or "8-bit weights only" variants."""
    i = name.find(pattern)
    return i >= 0 and not name[i + len(pattern):i + len(pattern) + 1].isdigit() and "weights only" not in name


def cut_short(error: str) -> bool:
    """A row stopped by the device call's clock, not by what it is: not run for lack of time, or a
    warm-up (compilation) that ran out of the time it was given. Neither explains a missing row."""
    return error.startswith("not run") or WARMUP_CUT.search(error) is not None


def coverage(paths: list[str]) -> tuple[str, int]:
    """Markdown checklist of ``REQUIRED`` against the files (later paths count as newer); returns
    the text and the number of rows neither measured nor explained."""
    found: dict[tuple, dict] = {}
    for p in paths:
        res = json.loads(Path(p).read_text())
        if "rows" not in res or "model" not in res:
            continue
        for r in res["rows"]:
            cfg = (res["model"], res["sampler"], int(res["steps"]), int(r["batch"]))
            for pat in REQUIRED.get(cfg, []):
                if _matches(pat, r["row"]):
                    slot = found.setdefault(cfg + (pat,), {})
                    if "median_s" in r or r.get("error"):  # a warm-up-only row measures nothing
                        slot["measured" if "median_s" in r else "error"] = (Path(p).name, r)
    out, missing = [], 0
    for cfg, pats in REQUIRED.items():
        model, sampler, steps, batch = cfg
        out += [f"\n**{model}, {sampler.upper()} {steps}, batch {batch}**\n", "| row | s / image | × fp16 eager | file |",
                "|---|---|---|---|"]
        for pat in pats:
            slot = found.get(cfg + (pat,), {})
            if "measured" in slot:
                f, r = slot["measured"]
                out.append(f"| {pat} | {r['s_per_image']:.3f} | {fmt(r.get('speedup_vs_eager'))} | {f} |")
            elif "error" in slot:
                f, r = slot["error"]
                why = " ".join(str(r.get("error", "")).split())[:90]
                out.append(f"| {pat} | – | not measured: {why} | {f} |")
                missing += cut_short(str(r.get("error", "")))
            else:
                out.append(f"| {pat} | – | **missing** | |")
                missing += 1
    return "\n".join(out).lstrip("\n"), missing


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Markdown tables from speed.py's JSON results.")
    ap.add_argument("--coverage", action="store_true",
                    help="check the files against every row the speed issue asks for, per configuration")
    ap.add_argument("paths", nargs="+", help="JSON files written by benchmarks/speed.py")
    args = ap.parse_args(argv)
    for p in args.paths:
        if not Path(p).is_file():
            ap.error(f"{p}: no such file (pass JSON files written by benchmarks/speed.py)")
    if args.coverage:
        text, missing = coverage(args.paths)
        print(text)
        print(f"\n{missing} required rows neither measured nor explained (rows cut by a time budget or a warm-up limit count as missing)")
        return 0
    for p in args.paths:
        res = json.loads(Path(p).read_text())
        env = res["env"]
        print(f"### {Path(p).name}\n")
        print(f"`{env['command']}` — {env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
              f"diffusers {env['diffusers']}, torchao {env['torchao']}"
              + "".join(f", {k}={v}" for k, v in env.get("settings", {}).items()) + "\n")
        print(kernels_table(res["kernels"]) if "kernels" in res else rows_table(res) + profile_table(res) + warmup_table(res))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
