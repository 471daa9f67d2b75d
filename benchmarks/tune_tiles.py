"""Measures tile configs of the 8-bit GEMM on a pipeline's real layer shapes; writes the GPU's tile table.

The kernels' fixed tile rule (``triton_gemm.block_config``) is what left them at 25–46 % of fp16
cuBLAS on SD's batch-1 shapes (``results/speed/README.md``). This script, run once per GPU model
on the device:

1. builds each model (``harness.models.build``: full-size architecture, random fp16 weights),
   calibrates a 2-step W8A8 plan and switches each kernel kind on;
2. records every 8-bit GEMM call of one 2-step pipeline run per batch size (the layer shapes of
   the full *and* cached steps: cached steps run a subset of the same layers at the same shapes);
3. per distinct shape, times the rule's config and each candidate, graph-replayed as a captured
   denoiser runs them, and checks each candidate's output against the rule's (INT8 bit-identical,
   FP8 within 1e-3: fp32 accumulation order);
4. writes ``{"entries": {shape_key: tiles}}`` for the shapes where a candidate beat the rule by
   more than 3 %, with both times, plus the per-call totals it expects.

``cachequant/kernels/tile_tables/<gpu>.json`` (see :mod:`cachequant.kernels.tiles`) is where the kernels
look; copy the output there and commit it with the results it came with.

    python benchmarks/tune_tiles.py --out tiles.json                                 # on a GPU
    TRITON_INTERPRET=1 python benchmarks/tune_tiles.py --tiny --out t.json --candidates 0 4   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (BM, BN, BK, num_warps, num_stages); split_k is tried at 1 and at the rule's choice for each
CANDIDATES = [
    (128, 128, 128, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 128, 8, 3),
    (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (128, 64, 128, 4, 4), (64, 256, 128, 8, 3),
    (64, 128, 64, 4, 4), (128, 128, 128, 8, 4),
]
MIN_GAIN = 0.03


class Recorder:
    """Keeps the first call's arguments of every distinct shape and counts the calls per shape."""

    def __init__(self):
        self.first: dict[str, tuple] = {}
        self.count: dict[str, int] = {}

    def append(self, args: tuple) -> None:
        from cachequant.kernels.tiles import shape_key

        (*_, M, N, C, split, T, geom, kh, kw, fp8, w4) = args
        key = shape_key("fp8" if fp8 else "int8", M, N, C, split, kh * kw, w4)
        self.first.setdefault(key, args)
        self.count[key] = self.count.get(key, 0) + 1


def time_call(fn, reps: int, cuda: bool) -> float:
    """Seconds per call: graph-replayed on a GPU (``harness.timing.graph_ms``), as a captured denoiser runs
    the kernels; the interpreter: one timed call after a warm-up."""
    if cuda:
        from harness.timing import graph_ms

        return graph_ms(fn, reps) / 1e3
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def candidates(args: tuple, picks: list[int] | None, split_k_forced: int | None = None) -> list[dict]:
    """Tile-table entries to try for one recorded call: each candidate at split 1 and, for the
    convs the rule splits, at the rule's split."""
    from cachequant.kernels.triton_gemm import block_config, num_sms, split_k

    (q, w, y, *_, M, N, C, split, T, geom, kh, kw, fp8, w4) = args
    out = []
    for i, (bm, bn, bk, warps, stages) in enumerate(CANDIDATES):
        if picks is not None and i not in picks:
            continue
        cfg = {"BM": bm, "BN": bn, "BK": bk, "num_warps": warps, "num_stages": stages}
        rule_cfg = {**block_config(M, N, C, split), "BM": bm, "BN": bn, "BK": bk}
        sk, _ = split_k(M, N, C, kh * kw, rule_cfg, num_sms(y.device), split_k_forced)
        for s in sorted({1, sk}):
            out.append({**cfg, "split_k": s})
    return out


def tune_shape(args: tuple, rule_s: float, reps: int, picks: list[int] | None, cuda: bool,
               split_k_forced: int | None = None) -> dict:
    import torch

    from cachequant.kernels.triton_gemm import gemm

    y = args[2]
    call = lambda tiles=None: gemm(*args, tiles=tiles, table="off", split_k_forced=split_k_forced)  # noqa: E731
    call()
    ref = y.clone()
    best, best_s, rejected, tried = None, rule_s, [], 0
    for cand in candidates(args, picks, split_k_forced):
        try:
            s = time_call(lambda c=cand: call(c), reps, cuda)
        except Exception as e:  # noqa: BLE001 — a config the GPU cannot run (shared memory, registers)
            rejected.append({**cand, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        tried += 1
        same = torch.equal(y, ref) if not args[-2] else \
            float((y.float() - ref.float()).abs().max()) <= 1e-3 * float(ref.float().abs().max()) + 1e-6
        if not same:
            rejected.append({**cand, "error": "output differs from the rule's"})
            continue
        if s < best_s:
            best, best_s = cand, s
    return {"rule_us": rule_s * 1e6, "best_us": best_s * 1e6, "best": best, "tried": tried, "rejected": rejected}


def record_shapes(model: str, batches: list[int], kind: str, device: str, tiny: bool, options) -> Recorder:
    import torch

    import cachequant as cq
    from cachequant.kernels import triton_gemm
    from harness.models import PlanCache, build, call_kwargs

    from cachequant.pipecall import call_pipeline

    pipe = build(model, "pndm" if model == "sd15" else "ddim", device, tiny)
    plan = PlanCache(quant_io=True).get(pipe, model, 2, 1, 8)  # every layer a plan may quantize
    cq.accelerate(pipe, plan, replace(options, backend=kind))
    rec = Recorder()
    try:
        for b in batches:
            triton_gemm.RECORD = rec
            with torch.no_grad():
                call_pipeline(pipe, **{**call_kwargs(model, b, 2, tiny), "output_type": "latent"})
    finally:
        triton_gemm.RECORD = None
    return rec


def run(models: list[str], batches: list[int], kinds: list[str], reps: int, picks: list[int] | None,
        tiny: bool, budget_s: float = float("inf")) -> dict:
    """Per model and kind: the rule's time for every shape first, then candidates for the shapes in
    order of their share of the run (calls × time), until that pair's share of ``budget_s`` is spent.
    Runs with tiles ``off`` (the rule is the baseline, never an older table); the other kernel
    options take their defaults (``KernelOptions.resolved()``: e.g. ``CACHEQUANT_SPLIT_K``)."""
    import cachequant as cq

    return _run(models, batches, kinds, reps, picks, tiny, budget_s, cq.KernelOptions(tiles="off").resolved())


def _run(models, batches, kinds, reps, picks, tiny, budget_s, options) -> dict:
    import torch
    import triton

    from cachequant.kernels.triton_gemm import gemm

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    entries, shapes = {}, []
    share = budget_s / (len(models) * len(kinds))
    for model in models:
        for kind in kinds:
            t0 = time.perf_counter()
            rec = record_shapes(model, batches, kind, device, tiny, options)
            rule = {key: time_call(lambda a=args: gemm(*a, table="off", split_k_forced=options.split_k), reps, cuda)
                    for key, args in rec.first.items()}
            for key in sorted(rule, key=lambda k: -rec.count[k] * rule[k]):
                if time.perf_counter() - t0 > share:
                    r = {"rule_us": rule[key] * 1e6, "best_us": rule[key] * 1e6, "best": None, "tried": 0,
                         "rejected": [], "skipped": "time budget"}
                else:
                    r = tune_shape(rec.first[key], rule[key], reps, picks, cuda, options.split_k)
                shapes.append({"model": model, "key": key, "calls": rec.count[key], **r})
                if r["best"] is not None and r["best_us"] < (1 - MIN_GAIN) * r["rule_us"]:
                    entries[key] = {**r["best"], "us": round(r["best_us"], 2), "rule_us": round(r["rule_us"], 2)}
                print(f"{model} {key}: rule {r['rule_us']:.1f} µs, best {r['best_us']:.1f} µs "
                      f"({r['tried']} tried, {len(r['rejected'])} rejected)", flush=True)
            if cuda:
                torch.cuda.empty_cache()
    totals = {}
    for s in shapes:
        t = totals.setdefault(s["model"] + " " + s["key"].split("|")[0], {"rule_us": 0.0, "tuned_us": 0.0})
        t["rule_us"] += s["calls"] * s["rule_us"]
        t["tuned_us"] += s["calls"] * (s["best_us"] if s["key"] in entries else s["rule_us"])
    return {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, Triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "models": models, "batches": batches,
            "command": "python " + " ".join(sys.argv),
            "note": "GEMM µs per recorded call, graph-replayed; totals = Σ calls × µs over one 2-step run "
                    "per batch (all batches together)",
            "totals_per_model_kind": totals, "entries": entries, "shapes": shapes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sd15", "dit-xl2"], choices=["sd15", "dit-xl2"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--kinds", nargs="+", default=["int8", "fp8"], choices=["int8", "fp8"])
    p.add_argument("--reps", type=int, default=20, help="calls per captured graph")
    p.add_argument("--candidates", type=int, nargs="+", default=None,
                   help=f"indices into CANDIDATES (0–{len(CANDIDATES) - 1}); default all")
    p.add_argument("--time-budget-s", type=float, default=float("inf"),
                   help="stop trying candidates after this; the shapes that take most of the run go first")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (Triton interpreter): a smoke test")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.candidates and not all(0 <= i < len(CANDIDATES) for i in args.candidates):
        p.error(f"--candidates: indices must be in 0–{len(CANDIDATES) - 1}")
    if any(b < 1 for b in args.batch) or args.reps < 1:
        p.error("--batch and --reps must be ≥ 1")
    result = run(args.models, args.batch, args.kinds, args.reps, args.candidates, args.tiny, args.time_budget_s)
    for name, t in result["totals_per_model_kind"].items():
        print(f"{name}: GEMM time per recorded run {t['rule_us'] / 1e3:.2f} ms with the rule, "
              f"{t['tuned_us'] / 1e3:.2f} ms tuned ({t['rule_us'] / max(t['tuned_us'], 1e-9):.2f}×)")
    from cachequant.utils.io import atomic_path

    with atomic_path(Path(args.out)) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(f"{len(result['entries'])} tuned shapes → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
