"""How stale is the cached feature under each sampler, and how much of that can DPS and cache-DEC
remove? A CPU-sized follow-up to `results/quality/README.md`.

On the shipped DiT, caching at N = 2 costs ~1 FID with DDIM 50 but ~14 FID with DDPM 250
(`results/quality/README.md`). This script records the cached feature (the Δ-DiT deviation of the cached
blocks, or the UNet's deep feature) at every model call of uncached full-precision trajectories
and reports, for reuse at interval N, the relative L1 error of the reused feature

    e = sum over cached steps t of ||X_t - Y_t||_1 / sum over cached steps of ||X_t||_1,

with Y_t = X_s(t), the feature of the full step s(t) that feeds step t (its numerator is the DPS
cost of the schedule, D(i, j) of method-notes), or Y_t = a_t·X_s(t) + b_t with cache-DEC (Eq. 8)
(`cachequant.correction.relative_reuse_error`; calibrated plans record it too).
The denominator makes samplers with different step counts comparable. Four rows per N: uniform
and DPS schedules, each without and with cache-DEC. DPS and cache-DEC are fitted on trajectories
of one seed (as calibration does) and evaluated on trajectories of another (held out).

Comparing DDPM and DDIM at the same step count isolates the stochastic term: both visit the same
timesteps, but DDPM adds fresh noise at each step, which the reused feature has never seen.

Each row also reports the spread the reused feature keeps (`correction.reuse_spread_ratio`: per
step and channel, std of the reused feature over std of the fresh one), and the "+cache-dec" rows
cache-DEC's mean slope; "dps+shift-dec" is DPS with a shift-only cache-DEC (slope 1,
`CacheQuantConfig.cache_dec_slope=False`). Least squares on a poor predictor shrinks it (slope = correlation × spread
ratio), so a slope below 1 means cache-DEC pulls every cached step's feature towards its mean.

    python benchmarks/cache_drift.py --model cifar10-dit --runs ddpm:250,ddim:250,ddpm:50,ddim:50 \
        --num-samples 8 --out results/cache-drift/dit.json

Sample i has class label i mod 10; the fitting run uses seed SEED + 1, the evaluated one SEED.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_runs(text: str) -> list[tuple[str, int]]:
    """``"ddpm:250,ddim:50"`` -> ``[("ddpm", 250), ("ddim", 50)]``, with a clear error on bad input."""
    runs = []
    for item in text.split(","):
        name, sep, steps = item.strip().partition(":")
        if not sep or not steps.isdigit() or int(steps) < 2 or name not in ("ddpm", "ddim"):
            raise SystemExit(f"--runs: {item!r} is not SCHEDULER:STEPS with SCHEDULER ddpm or ddim and STEPS >= 2 "
                             "(example: ddpm:250,ddim:50)")
        runs.append((name, int(steps)))
    return runs


@torch.no_grad()
def record_features(pipe, steps: int, num_samples: int, guidance_scale: float | None, seed: int) -> list[torch.Tensor]:
    """The cached feature at every model call of an uncached full-precision run (float32, CPU)."""
    import cachequant as cq
    from cachequant.models.adapters import adapter_for
    from cachequant.pipecall import call_pipeline, conditioning, denoiser_of
    from cachequant.runtime.sampler import probe_timesteps
    from cachequant.session import Session

    _, model = denoiser_of(pipe)
    adapter = adapter_for(model)
    layout = adapter.layout(model, adapter.resolve_site(model, cq.CacheQuantConfig()))
    timesteps = probe_timesteps(pipe.scheduler, steps)
    T = len(timesteps)
    sess = Session.open(model, timesteps, None, 0, type(pipe.scheduler).__name__, steps, guard=False)
    recorded: list[torch.Tensor] = []
    handle = None
    try:
        sess.add_cache(layout)
        sess.attach_scheduler(pipe.scheduler)
        handle = model.register_forward_hook(
            lambda *_: recorded.append(sess.store.feature(layout.feature_key).detach().float().cpu()))
        gen = torch.Generator("cpu").manual_seed(seed)
        if conditioning(pipe) == "class":
            call_pipeline(pipe, [i % 10 for i in range(num_samples)], num_inference_steps=steps, generator=gen,
                          **({"guidance_scale": guidance_scale} if guidance_scale is not None else {}))
        else:
            call_pipeline(pipe, [None] * num_samples, num_inference_steps=steps, generator=gen)
    finally:
        if handle is not None:
            handle.remove()
        sess.close()
    if len(recorded) != T:
        raise RuntimeError(f"expected {T} model calls, recorded {len(recorded)}")
    return recorded


def interval_rows(fit: list[torch.Tensor], held_out: list[torch.Tensor], interval: int, channel_dim: int) -> dict:
    """Uniform / DPS schedules without / with cache-DEC, and DPS with a shift-only cache-DEC, fitted on
    ``fit``, measured on ``held_out``."""
    from cachequant.cache.schedules import make_schedule
    from cachequant.correction import fit_cache_dec, relative_reuse_error, reuse_spread_ratio

    def row(sched: list[int], dec=None) -> dict:
        return dict(relative_reuse_error(held_out, sched, dec, channel_dim), full_steps=len(sched),
                    **reuse_spread_ratio(held_out, sched, dec, channel_dim))

    T = len(fit)
    rows = {}
    for kind in ("uniform", "dps"):
        sched = make_schedule(kind, T, interval, fit if kind == "dps" else None)
        dec = fit_cache_dec(fit, sched, channel_dim)
        rows[kind] = row(sched)
        rows[f"{kind}+cache-dec"] = dict(row(sched, dec), mean_slope=_mean_slope(dec[0], sched))
        if kind == "dps":  # shift-only cache-DEC (CacheQuantConfig.cache_dec_slope=False)
            rows["dps+shift-dec"] = row(sched, fit_cache_dec(fit, sched, channel_dim, slope=False))
    return rows


def _mean_slope(a: torch.Tensor, full_steps: list[int]) -> float:
    """Mean cache-DEC slope a_t,c over the cached steps (full steps have a = 1 by construction)."""
    full = set(full_steps)
    cached = [t for t in range(a.shape[0]) if t not in full]
    return float(a[cached].double().mean()) if cached else 1.0


def main(argv: list[str] | None = None) -> dict:
    from cachequant.cli.common import add_weights_option

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar10-dit", help="zoo name, as for `cachequant evaluate`")
    add_weights_option(p)
    p.add_argument("--runs", default="ddpm:250,ddim:250,ddim:50", help="SCHEDULER:STEPS,... (ddpm or ddim)")
    p.add_argument("--intervals", default="2,3,5")
    p.add_argument("--num-samples", type=int, default=8, help="per run: this many to fit, as many held out")
    p.add_argument("--guidance-scale", type=float, default=1.5, help="class-conditional models only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="JSON file to write (written whole, at the end)")
    args = p.parse_args(argv)
    runs = parse_runs(args.runs)
    try:
        intervals = [int(x) for x in args.intervals.split(",")]
    except ValueError:
        raise SystemExit(f"--intervals: {args.intervals!r} is not a comma-separated list of integers") from None
    if any(n < 2 for n in intervals) or args.num_samples < 1:
        raise SystemExit("--intervals must all be >= 2 and --num-samples >= 1")

    import cachequant as cq
    from cachequant.cli.common import load_pipeline
    from cachequant.models.adapters import adapter_for
    from cachequant.pipecall import conditioning, denoiser_of

    torch.manual_seed(args.seed)
    out = {"command": "python benchmarks/cache_drift.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": args.model, **cq.zoo.weights_record(args.model, args.weights), "num_samples": args.num_samples,
           "seed": args.seed,
           "environment": {"device": args.device, "torch": torch.__version__, "python": platform.python_version()},
           "runs": []}
    for name, steps in runs:
        pipe = load_pipeline(args.model, args.device, name, args.weights)
        pipe.set_progress_bar_config(disable=True)
        gs = args.guidance_scale if conditioning(pipe) == "class" else None
        model = denoiser_of(pipe)[1]
        adapter = adapter_for(model)
        channel_dim = adapter.layout(model, adapter.resolve_site(model, cq.CacheQuantConfig())).channel_dim
        t0 = time.perf_counter()
        fit = record_features(pipe, steps, args.num_samples, gs, args.seed + 1)
        held_out = record_features(pipe, steps, args.num_samples, gs, args.seed)
        row = {"scheduler": name, "steps": steps, "guidance_scale": gs, "model_calls": len(held_out),
               "seconds": round(time.perf_counter() - t0, 1),
               "intervals": {str(n): interval_rows(fit, held_out, n, channel_dim) for n in intervals}}
        out["runs"].append(row)
        print(f"{name} {steps} steps ({row['seconds']:.0f} s), relative L1 error of the reused feature (held out):",
              flush=True)
        for n in intervals:
            r = row["intervals"][str(n)]
            print(f"  N={n}: " + "  ".join(f"{k} {v['relative_l1']:.3f}" for k, v in r.items()), flush=True)
            print("        spread kept: " + "  ".join(f"{k} {v['spread_ratio']:.3f}" for k, v in r.items())
                  + f"  (cache-DEC mean slope {r['dps+cache-dec']['mean_slope']:.3f})", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(args.out)
        print(f"written {args.out}")
    return out


if __name__ == "__main__":
    main()
