"""torch.compile of the tiny SD UNet, untouched and accelerated: graph breaks and warm-up time.

For each variant — the float UNet, and the UNet accelerated with cache (N = 2) + W8A8 + DEC on
the float reference path — at a full position and at a cached position:

- the graph breaks ``torch._dynamo.explain`` counts (one graph and no break is the goal);
- the first call of ``torch.compile(unet, backend=...)`` (tracing + code generation + one run)
  and the second call (the compiled graph alone), after ``torch._dynamo.reset()``.

    python benchmarks/compile_warmup.py --backend inductor --out compile-warmup.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cachequant as cq  # noqa: E402
from cachequant.models.tiny import tiny_sd_pipeline  # noqa: E402
from cachequant.pipecall import call_pipeline  # noqa: E402
from cachequant.utils.io import atomic_path  # noqa: E402

PROMPTS = ["a red cat", "a small boat"]


def first_call(pipe) -> tuple[tuple, dict]:
    seen = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)) if not seen else None,
                                            with_kwargs=True)
    call_pipeline(pipe, PROMPTS[:1], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="latent", height=16, width=16)
    h.remove()
    return seen[0]


def measure(unet, args, kwargs, backend: str, place) -> dict:
    """Graph breaks, then the first and second compiled call, at the position ``place()`` sets."""
    place()
    torch._dynamo.reset()
    with torch.no_grad():
        exp = torch._dynamo.explain(unet)(*args, **kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend=backend)
    times = []
    for _ in range(2):
        place()
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return {"graph_breaks": exp.graph_break_count, "graphs": exp.graph_count, "first_call_s": times[0],
            "second_call_s": times[1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = tiny_sd_pipeline(scheduler="euler")
    args, kwargs = first_call(pipe)
    rows = {"untouched": measure(pipe.unet, args, kwargs, a.backend, lambda: None)}
    cfg = cq.CacheQuantConfig(interval=2, schedule="uniform", weight_bits=8, act_bits=8, dec=True, calib_batch_size=2,
                              dps_samples=2)
    plan = cq.calibrate(pipe, cfg, 4, prompts=PROMPTS, progress=False)
    cq.accelerate(pipe, plan)
    full = plan.schedule[0]
    cached = next(i for i in range(plan.num_calls) if i not in plan.schedule)

    def at(position):
        def place():
            cq.set_step(pipe, full)  # a full call first, so that a cached call has a feature to reuse
            if position != full:
                with torch.no_grad():
                    pipe.unet(*args, **kwargs)
                cq.set_step(pipe, position)
        return place

    rows["accelerated, full position"] = measure(pipe.unet, args, kwargs, a.backend, at(full))
    rows["accelerated, cached position"] = measure(pipe.unet, args, kwargs, a.backend, at(cached))
    cq.restore(pipe)
    result = {"backend": a.backend, "rows": rows, "torch": torch.__version__, "cachequant": cq.__version__,
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    if a.out:
        with atomic_path(a.out) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
