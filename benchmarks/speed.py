"""Wall-clock benchmark on a GPU: cachequant (INT8 / FP8 kernels, CUDA graphs) side by side with
fp16 eager, torch.compile, DeepCache, diffusers' caches and torchao, in one process.

Full-size architectures are built from their configs with random weights (speed does not depend on
weight values): SD 1.5's UNet + VAE (512², CFG 7.5, PNDM) and DiT-XL/2 + VAE (256², CFG 4.0, DDPM /
DDIM). Text encoding is replaced by fixed random prompt embeddings (CLIP's tokenizer files cannot
be fetched here; the text encoder runs once per image and costs ~1 % of a run). Each row: one
warm-up run, then the median of ``--repeats`` timed end-to-end runs (denoising loop + VAE decode to
a numpy image), and the peak allocated memory. cachequant plans are calibrated on the spot with
one trajectory and a uniform schedule (calibration quality does not change speed).

    python benchmarks/speed.py --model sd15 --batch 1 --out results/speed/sd15-pndm50-b1.json
    python benchmarks/speed.py --kernels-only --out results/speed/kernels-gemm-tops.json

The table is printed last; rows that cannot run say why.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cachequant as cq  # noqa: E402
from cachequant.pipecall import call_pipeline  # noqa: E402
from harness.env import timing_environment  # noqa: E402
from harness.io import write_json  # noqa: E402
from harness.models import (CFG_CALLS, TRANSFORMER_ONLY, PlanCache, build, call_kwargs, denoiser,  # noqa: E402
                            fuse_qkv, set_denoiser, torchao_filter)
from harness.timing import graph_ms, sync, time_runs  # noqa: E402


# Kernel categories of --profile, matched in order on the lower-cased kernel name.
KERNEL_CATEGORIES = [
    ("cachequant 8-bit GEMM", ("_gemm_kernel", "_fused_kernel")),
    ("cachequant activation quantize", ("_quantize_kernel",)),
    ("cachequant fake quant", ("_fake_quant_kernel",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("float GEMM / conv (cuBLAS, cuDNN, CUTLASS)", ("gemm", "cutlass", "sm90_", "sm80_", "xmma", "conv", "cudnn",
                                                  "implicit", "nvjet", "cublas")),
    ("norm", ("norm",)),
]


def kernel_category(name: str) -> str:
    n = name.lower()
    for cat, keys in KERNEL_CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return OTHER


OTHER = "other (elementwise, softmax, copies, ...)"


def profile_run(pipe, kw: dict, device: str) -> dict:
    """One more run under torch.profiler: GPU kernel time per category, the number of kernels, and
    how much of the wall time the GPU was idle (launch / host overhead). This is what the results
    file's roofline reasoning quotes: where a step's time goes, measured."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        pipe(generator=torch.Generator(device).manual_seed(0), **kw)
        sync(device)
        wall = time.perf_counter() - t0
    kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    by_cat: dict[str, float] = {}
    for name, us in kernels:
        by_cat[kernel_category(name)] = by_cat.get(kernel_category(name), 0.0) + us / 1e3
    busy = sum(us for _, us in kernels) / 1e3
    return {"wall_ms": wall * 1e3, "gpu_kernel_ms": busy, "gpu_idle_fraction": max(0.0, 1 - busy / (wall * 1e3)),
            "kernels": len(kernels), "ms_by_category": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top_other_kernels": top_kernels(kernels, OTHER),
            # per category too: a compiled model's fused kernels are named after the ops they hold, so
            # a category (matched on names) can hold kernels of another kind; the names show which
            "top_kernels_by_category": {cat: top_kernels(kernels, cat, 6) for cat in by_cat if cat != OTHER}}


def top_kernels(kernels: list[tuple[str, float]], category: str, n: int = 12) -> list[dict]:
    """The ``n`` kernels of one category with the most GPU time (name, ms, launches): the breakdown
    of, e.g., the elementwise time the 8-bit path adds around its GEMMs (results/speed/README.md)."""
    agg: dict[str, list[float]] = {}
    for name, us in kernels:
        if kernel_category(name) == category:
            a = agg.setdefault(name, [0.0, 0])
            a[0] += us / 1e3
            a[1] += 1
    rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"kernel": name[:160], "ms": round(ms, 3), "launches": int(k)} for name, (ms, k) in rows]


def row_cq(pipe, model, steps, interval, kind, graphs, plans, wbits=8, fp8_gemm=None, compile=False, batch=1,
           tiny=False, channels_last=False, **_):
    plan = plans.get(pipe, model, steps, interval, wbits if kind is not None else None)
    # fp8_gemm None: CACHEQUANT_FP8_GEMM if set, else the per-GPU default
    cq.accelerate(pipe, plan, backend=kind or "fake", fp8_gemm=fp8_gemm)
    m = denoiser(pipe)
    info = {"full_steps": len(plan.schedule), "calls": plan.num_calls, "calib_s": plan.info["bench_calib_s"],
            "cache_site": plan.cache.site, **({"plan_loaded": True} if "bench_plan_loaded" in plan.info else {})}

    def undo():
        cq.restore(pipe)
        m.__dict__.pop("forward", None)  # the compiled forward of a compile row
        if channels_last:
            m.to(memory_format=torch.contiguous_format)

    try:
        if channels_last:  # what the kernel backends do to a model with quantized convolutions
            m.to(memory_format=torch.channels_last)
        if kind == "auto" and not tiny:
            # per-layer tuning happens on each layer's first eager call at its input shape: one eager
            # run measures every layer of both the full and the cached steps (compiled code and graph
            # capture then read the decisions)
            t0 = time.perf_counter()
            with torch.no_grad():
                call_pipeline(pipe, generator=torch.Generator("cuda").manual_seed(0),
                              **call_kwargs(model, batch, steps, tiny))
            info["tune_s"] = time.perf_counter() - t0
        if kind:
            rep = cq.kernel_report(pipe)
            info.update(backend=rep["backend"], kernel_layers=rep["kernel_layers"], fake_layers=len(rep["fake_layers"]),
                        cublaslt_layers=rep.get("cublaslt_layers", 0))
            if "float_layers" in rep:
                # by name, why each stays in fp16: both timings and the tuned shape
                info.update(tuned_layers=rep["tuned_layers"], float_layers=len(rep["float_layers"]),
                            float_layer_reasons=dict(sorted(rep["float_layers"].items())))
                if compile:  # compiled code reads the GEMM-alone decisions
                    info.update(float_layers_compiled=len(rep["float_layers_compiled"]),
                                float_layer_reasons_compiled=dict(sorted(rep["float_layers_compiled"].items())))
        if compile:
            # compile the model's own forward, under cachequant's hooks on its submodules and inside
            # the CUDA-graph hook, which then captures the compiled kernels
            m.forward = torch.compile(m.forward, backend=COMPILE_BACKEND)
            info["compile_backend"] = COMPILE_BACKEND
        if graphs and next(m.parameters()).device.type == "cuda":
            cq.enable_cuda_graphs(pipe)
        elif graphs:
            info["graphs"] = "skipped (CPU smoke test)"
    except Exception:
        undo()
        raise
    return info, undo


COMPILE_BACKEND = os.environ.get("CQ_COMPILE_BACKEND", "inductor")
"""torch.compile backend of the compile rows (``aot_eager`` for a quick CPU smoke test)."""


def row_cq_lean(pipe, model, steps, interval, kind, plans, wbits=8, **_):
    """As ``row_cq`` with graphs, on a copy of the denoiser whose float weights are dropped after
    packing (``keep_float_weights=False``): the memory a deployment holds. The original waits on
    the CPU meanwhile, so the peak memory is the lean model's."""
    plan = plans.get(pipe, model, steps, interval, wbits)
    orig = denoiser(pipe)
    dev = next(orig.parameters()).device
    lean = copy.deepcopy(orig)
    orig.to("cpu")
    set_denoiser(pipe, lean)

    def undo():
        set_denoiser(pipe, orig)
        orig.to(dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    try:
        cq.accelerate(pipe, plan, backend=kind, keep_float_weights=False)
        rep = cq.kernel_report(pipe)
        if dev.type == "cuda":
            cq.enable_cuda_graphs(pipe)
    except Exception:
        undo()
        raise
    info = {"full_steps": len(plan.schedule), "calls": plan.num_calls, "kernel_layers": rep["kernel_layers"],
            "packed_weight_gib": rep["packed_weight_bytes"] / 2**30, "float_weight_gib_dropped":
            rep["float_weight_bytes_dropped"] / 2**30}
    return info, undo


def row_compile(pipe, model, scope="whole", **_):
    orig = denoiser(pipe)
    if scope == "whole":
        set_denoiser(pipe, torch.compile(orig))
        return {}, lambda: set_denoiser(pipe, orig)
    m = copy.deepcopy(orig)
    info = compile_blocks(m)
    set_denoiser(pipe, m)
    return info, lambda: set_denoiser(pipe, orig)


REGIONAL_RECOMPILE_LIMIT = 64


def compile_blocks(m: torch.nn.Module) -> dict:
    """Regional compilation: ``torch.compile`` each ``BasicTransformerBlock`` in place, the rest of
    the model stays eager (what diffusers' ``compile_repeated_blocks`` does for models that list
    their repeated blocks; DiT and SD 1.5's UNet do not). Identical blocks share one compiled
    graph, so dynamo's tracing no longer grows with depth. Every Linear that the torchao rows
    quantize sits in these blocks. Measured on an H200 for the torchao DiT-XL/2
    (results/speed/README.md): compilation 143 / 172 s (int8 / float8) instead of 242 / 183 s for the whole model,
    but 1.6–2.9× slower runs, so the torchao rows of the tables compile the whole model. SD 1.5's
    blocks come in four widths, hence the higher recompile limit (past the limit dynamo would fall
    back to eager without an error; here it raises instead, for the rest of the process)."""
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [b for b in m.modules() if isinstance(b, BasicTransformerBlock)]
    if not blocks:
        raise RuntimeError(f"{type(m).__name__} has no BasicTransformerBlock to compile regionally")
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, REGIONAL_RECOMPILE_LIMIT)
    cfg.fail_on_recompile_limit_hit = True  # an error, not a silent fall-back to eager
    for b in blocks:
        b.compile()
    return {"compile_scope": f"each BasicTransformerBlock ({len(blocks)}), rest eager"}


def row_torchao(pipe, model, kind, batch=1, tiny=False, compile="whole", **_):
    """torchao's dynamic int8 / float8 quantization of every Linear that has more than 16 rows,
    then torch.compile: ``compile="whole"`` the whole model, ``"regional"`` each transformer block
    (``compile_blocks``), ``None`` leaves the quantized model eager (which tells a slow or stuck
    compilation apart from a slow quantized model). The few Linears with M ≤ 16 (time embedding,
    adaLN) stay fp16, because ``torch._int_mm`` refuses them (the first attempt failed with
    "self.size(0) needs to be greater than 16, but got 2"); the same set is skipped for float8 so
    that both rows quantize the same layers. Their share of the Linear MACs is recorded (``torchao_kept_linear_mac_share``)."""
    from torchao.quantization import quantize_

    if kind == "int8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig as C
    else:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig as C
    import torch._inductor.config as inductor_config

    keep, info = torchao_filter(pipe, model, batch, tiny)
    orig = denoiser(pipe)
    q = copy.deepcopy(orig)
    before = inductor_config.get_config_copy()
    quantize_(q, C(), filter_fn=keep)
    changed = config_changes(before, inductor_config.get_config_copy())
    info["inductor_config_set_by_torchao"] = changed
    if compile == "regional":
        info.update(compile_blocks(q))
    elif compile == "whole":
        q = torch.compile(q)
        info["compile_scope"] = "whole model"
    set_denoiser(pipe, q)

    def undo():
        set_denoiser(pipe, orig)
        for k in changed:  # the rows after this one compile with inductor's settings of before
            setattr(inductor_config, k, before[k])

    return {"torchao": __import__("torchao").__version__, **info}, undo


def config_changes(before: dict, after: dict) -> dict:
    """{setting: value after} for the settings that differ. torchao's configs default to
    ``set_inductor_config=True``, which changes process-wide inductor settings in ``quantize_``
    (torchao 0.18: ``coordinate_descent_tuning``, ``coordinate_descent_check_all_directions``,
    ``force_fuse_int_mm_with_mul``, ...). Coordinate-descent tuning tunes each Triton kernel the
    first time it runs, compiling and timing neighbouring tile configs: 777 of the 876 s warm-up of
    SD 1.5's torchao float8 row on the H200 (results/speed/README.md). The row
    records the changes so that a results file says why its warm-up took so long; restoring them
    keeps later rows in the same process unaffected."""
    plain = (bool, int, float, str, type(None))
    return {k: v if isinstance(v, plain) else repr(v) for k, v in after.items() if k in before and before[k] != v}


def row_deepcache(pipe, model, interval, **_):
    if model != "sd15":
        raise RuntimeError("the DeepCache helper supports UNet pipelines only (DiT has no UNet)")
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    return {}, helper.disable


def row_diffusers_cache(pipe, model, **_):
    """diffusers' First-Block Cache (hooks API). DiTPipeline sets no cache context and has no
    CacheMixin, so the context is set here and the hooks' state is reset at every run's
    ``set_timesteps``; UNets have no transformer-block stack for it to hook."""
    if model == "sd15":
        raise RuntimeError("diffusers' caches (FirstBlockCache, PAB, FasterCache, MagCache, ...) hook transformer "
                           "block stacks; UNet2DConditionModel is not supported")
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    m = denoiser(pipe)
    if model in TRANSFORMER_ONLY:  # Flux and SD3 pipelines set the cache context themselves
        if not hasattr(m, "enable_cache"):
            raise RuntimeError(f"{type(m).__name__} has no diffusers cache support (CacheMixin) in this diffusers")
        m.enable_cache(FirstBlockCacheConfig(threshold=0.08))
        return {"cache": "FirstBlockCache(threshold=0.08)"}, m.disable_cache
    apply_first_block_cache(m, FirstBlockCacheConfig(threshold=0.08))
    registry = HookRegistry.check_if_exists_or_initialize(m)
    sched = pipe.scheduler
    original = sched.set_timesteps

    def set_timesteps(*a, **k):
        registry.reset_stateful_hooks()  # also clears the context
        _set_cache_context(m, CacheContext("cond_uncond"))
        return original(*a, **k)

    sched.set_timesteps = set_timesteps

    def undo():
        sched.__dict__.pop("set_timesteps", None)
        _set_cache_context(m, None)
        # the block hooks live in the blocks' own registries, not in the model's: remove them all
        for mod in m.modules():
            reg = getattr(mod, "_diffusers_hook", None)
            if reg is not None:
                for name in list(reg.hooks):
                    reg.remove_hook(name, recurse=False)
        registry.invalidate_child_registries_cache()

    return {"cache": "FirstBlockCache(threshold=0.08)"}, undo


def rows_for(model: str, n_list: list[int]) -> list[tuple[str, callable, dict]]:
    rows = [("fp16 eager", None, {})]
    rows.append(("fp16 + CUDA graph (cachequant, no cache/quant)", row_cq, dict(interval=1, kind=None, graphs=True)))
    for n in n_list:
        rows.append((f"cachequant cache-only N={n} + graph", row_cq, dict(interval=n, kind=None, graphs=True)))
    rows.append(("cachequant INT8 quant-only + graph", row_cq, dict(interval=1, kind="int8", graphs=True)))
    # "FP8 + graph" rows: the Triton GEMM everywhere, as measured before cuBLASLt became the default on Hopper
    rows.append(("cachequant FP8 quant-only + graph", row_cq, dict(interval=1, kind="fp8", graphs=True,
                                                                  fp8_gemm="triton")))
    # the FP8 backend with cuBLASLt (torch._scaled_mm) for its GEMM-shaped layers (KernelOptions.fp8_gemm)
    lt = dict(kind="fp8", graphs=True, fp8_gemm="cublaslt")
    rows.append(("cachequant FP8 quant-only, cuBLASLt GEMMs + graph", row_cq, dict(interval=1, **lt)))
    for n in n_list:
        rows.append((f"CacheQuant N={n} INT8 (eager)", row_cq, dict(interval=n, kind="int8", graphs=False)))
        rows.append((f"CacheQuant N={n} INT8 + graph", row_cq, dict(interval=n, kind="int8", graphs=True)))
        rows.append((f"CacheQuant N={n} FP8 + graph", row_cq, dict(interval=n, kind="fp8", graphs=True,
                                                                    fp8_gemm="triton")))
        rows.append((f"CacheQuant N={n} FP8, cuBLASLt GEMMs + graph", row_cq, dict(interval=n, **lt)))
    # the protocol's rows: the strongest fp16 (compile + graph), cache-only at the same capture, and
    # backend="auto" (FP8 on Hopper, each layer tuned against its float op)
    rows.append(("fp16 channels-last + graph", row_cq, dict(interval=1, kind=None, graphs=True, channels_last=True)))
    rows.append(("fp16 + compile + graph", row_cq, dict(interval=1, kind=None, graphs=True, compile=True)))
    rows.append(("quant-only auto + graph", row_cq, dict(interval=1, kind="auto", graphs=True)))
    rows.append(("quant-only auto + compile + graph", row_cq, dict(interval=1, kind="auto", graphs=True, compile=True)))
    for n in n_list:
        rows.append((f"cache-only N={n} + compile + graph", row_cq, dict(interval=n, kind=None, graphs=True,
                                                                           compile=True)))
        rows.append((f"CacheQuant N={n} auto + graph", row_cq, dict(interval=n, kind="auto", graphs=True)))
        rows.append((f"CacheQuant N={n} auto + compile + graph", row_cq, dict(interval=n, kind="auto", graphs=True,
                                                                                compile=True)))
    for kind in ("int8", "fp8"):
        rows.append((f"CacheQuant N={n_list[0]} {kind.upper()} + graph, 8-bit weights only", row_cq_lean,
                     dict(interval=n_list[0], kind=kind)))
    # W4A8: 4-bit weight codes packed two per byte in the INT8 kernel
    rows.append(("cachequant W4A8 quant-only + graph", row_cq, dict(interval=1, kind="int8", graphs=True, wbits=4)))
    rows.append((f"CacheQuant N={n_list[0]} W4A8 + graph, 4-bit weights only", row_cq_lean,
                 dict(interval=n_list[0], kind="int8", wbits=4)))
    for n in ([3, 5] if model == "sd15" else []):
        rows.append((f"DeepCache N={n}", row_deepcache, dict(interval=n)))
    rows.append(("diffusers FirstBlockCache", row_diffusers_cache, {}))
    rows.append(("fp16 + torch.compile", row_compile, {}))
    rows.append(("torchao int8 dynamic + compile", row_torchao, dict(kind="int8")))
    rows.append(("torchao float8 dynamic + compile", row_torchao, dict(kind="fp8")))
    # regional compilation (each transformer block), torchao and fp16 alike: compiles faster, runs slower
    rows.append(("fp16 + regional compile (each transformer block)", row_compile, dict(scope="regional")))
    rows.append(("torchao int8 dynamic + regional compile", row_torchao, dict(kind="int8", compile="regional")))
    rows.append(("torchao float8 dynamic + regional compile", row_torchao, dict(kind="fp8", compile="regional")))
    rows.append(("torchao int8 dynamic (eager)", row_torchao, dict(kind="int8", compile=None)))
    rows.append(("torchao float8 dynamic (eager)", row_torchao, dict(kind="fp8", compile=None)))
    return rows


def capture_of(name: str) -> str:
    return "compile + graph" if "compile + graph" in name else "graph" if name.endswith("+ graph") else "eager"


def protocol_ratios(rows: list[dict]) -> None:
    """``x_best_fp16``: the strongest fp16 row measured in the same call (eager, graph or compile +
    graph: the fastest) over this row; ``x_cache_only``: for a CacheQuant row, cache-only at the same
    N and the same capture over this row; ``x_same_fp16``: for a quant-only row, fp16 at the same
    capture over this row (the never-slower check)."""
    timed = [r for r in rows if "median_s" in r]
    for r in timed:
        fp16 = [q["median_s"] for q in timed if q["batch"] == r["batch"] and q["row"].startswith("fp16")]
        if fp16:
            r["x_best_fp16"] = min(fp16) / r["median_s"]
        name, cap = r["row"], capture_of(r["row"])
        if name.startswith("CacheQuant N="):
            n = name.split()[1]  # "N=5"
            same = [q for q in timed if q["batch"] == r["batch"] and f"cache-only {n} " in q["row"]
                    and capture_of(q["row"]) == cap]
            if same:
                r["x_cache_only"] = same[0]["median_s"] / r["median_s"]
        if "quant-only" in name:
            base_names = {"graph": "fp16 + CUDA graph", "compile + graph": "fp16 + compile + graph", "eager": "fp16 eager"}
            same = [q for q in timed if q["batch"] == r["batch"] and q["row"].startswith(base_names[cap])]
            if same:
                r["x_same_fp16"] = same[0]["median_s"] / r["median_s"]


def select_rows(rows: list, patterns: str | None) -> list:
    """The rows matching ``--rows``, ordered by the first pattern each matches (then table order)."""
    if not patterns:
        return rows
    pats = [s.strip() for s in patterns.split(",") if s.strip()]
    keyed = [(next((i for i, s in enumerate(pats) if s in r[0]), None), j, r) for j, r in enumerate(rows)]
    return [r for i, _, r in sorted(k for k in keyed if k[0] is not None)]


def kernel_microbench() -> list[dict]:
    """Achieved TOPS of the INT8 / FP8 kernels on SD-sized GEMMs, against measured ceilings:
    ``*_tops`` from eager calls, ``*_graph_tops`` from graph replays (kernel time only)."""
    from dataclasses import replace

    import triton.testing as tt
    from torch import nn

    from cachequant.backends.options import KernelOptions
    from cachequant.backends.reference import ReferenceBackend
    from cachequant.backends.triton import TritonBackend
    from cachequant.plan import LayerSpec
    from cachequant.quant.observers import RangeObserver
    from cachequant.quant.quantizer import weight_qparams
    from cachequant.session import Session

    out = []
    d = "cuda"
    a = torch.randn(8192, 8192, device=d, dtype=torch.float16)
    ms = tt.do_bench(lambda: a @ a)
    out.append({"op": "ceiling fp16 matmul 8192³ (cuBLAS)", "tops": 2 * 8192**3 / ms / 1e9})
    a8 = torch.randint(-128, 127, (8192, 8192), device=d, dtype=torch.int8)
    ms = tt.do_bench(lambda: torch._int_mm(a8, a8.t()))
    out.append({"op": "ceiling int8 torch._int_mm 8192³ (cuBLAS)", "tops": 2 * 8192**3 / ms / 1e9})
    if torch.cuda.get_device_capability() >= (8, 9):
        f8 = a.to(torch.float8_e4m3fn)
        one = torch.ones((), device=d)
        ms = tt.do_bench(lambda: torch._scaled_mm(f8, f8.t(), one, one, out_dtype=torch.float16))
        out.append({"op": "ceiling fp8 torch._scaled_mm 8192³", "tops": 2 * 8192**3 / ms / 1e9})
    shapes = [("linear 8192x8192x8192", nn.Linear(8192, 8192), (8192, 8192)),
              ("linear SD attn-proj 8192x320x320 (64² tokens, b2)", nn.Linear(320, 320), (2, 4096, 320)),
              ("linear SD ff 8192x2560x320", nn.Linear(320, 2560), (2, 4096, 320)),
              ("conv3x3 SD 320ch 64² b2", nn.Conv2d(320, 320, 3, padding=1), (2, 320, 64, 64)),
              ("conv3x3 SD 640ch 32² b16", nn.Conv2d(640, 640, 3, padding=1), (16, 640, 32, 32)),
              ("conv3x3 SD 1280ch 16² b16", nn.Conv2d(1280, 1280, 3, padding=1), (16, 1280, 16, 16)),
              # batch 1 with CFG: the deep blocks' few output tiles, where split-K applies
              ("conv3x3 SD 1280ch 16² b2", nn.Conv2d(1280, 1280, 3, padding=1), (2, 1280, 16, 16)),
              ("conv3x3 SD 1280ch 8² b2", nn.Conv2d(1280, 1280, 3, padding=1), (2, 1280, 8, 8)),
              ("linear SD cross-attn k 154x1280x768 (b2)", nn.Linear(768, 1280), (2, 77, 768)),
              ("linear DiT-XL qkv 512x3456x1152 (b2)", nn.Linear(1152, 3456), (2, 256, 1152)),
              ("linear DiT-XL ff 4096x4608x1152 (b16)", nn.Linear(1152, 4608), (16, 256, 1152))]
    for name, mod, xs in shapes:
        mod = mod.to(d, torch.float16)
        x = torch.randn(*xs, device=d, dtype=torch.float16)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            mod = mod.to(memory_format=torch.channels_last)
        with torch.no_grad():
            y = mod(x)
        macs = y.numel() * (mod.weight[0].numel())
        row = {"op": name, "macs": macs}
        # W8A8 tables of the layer at one position: the activation range of x, per-channel weight ranges
        obs = RangeObserver(8)
        obs.observe(x, 0, 0)
        s, z = weight_qparams(mod.weight, 8)
        tensors = {"act.0": obs.table(1)[None], "w.0": torch.stack([s.flatten(), z.flatten()])}
        with torch.no_grad():
            row["fp16_torch_tops"] = 2 * macs / tt.do_bench(lambda: mod(x)) / 1e9
            try:
                row["fp16_torch_graph_tops"] = 2 * macs / graph_ms(lambda: mod(x)) / 1e9
            except Exception as e:  # noqa: BLE001
                row["fp16_torch_graph_error"] = f"{type(e).__name__}: {e}"[:200]
            for kind in ("int8", "fp8"):
                for algo in ("two-pass", "two-pass-nosplit", "fused") + (("two-pass-cublaslt",) if kind == "fp8" else ()):
                    # two-pass-nosplit: the same kernel with split-K off, to see what splitting buys;
                    # two-pass-cublaslt: the quantize pass, then torch._scaled_mm where the layer is a plain GEMM
                    opts = KernelOptions(algo="fused" if algo == "fused" else "two-pass", channels_last=False,
                                         fp8_gemm="cublaslt" if algo == "two-pass-cublaslt" else "triton").resolved()
                    opts = replace(opts, split_k=1 if algo == "two-pass-nosplit" else None)  # else chosen per shape
                    container = nn.Sequential(mod)  # the layer is "0" of a one-layer model
                    sess = None
                    try:
                        sess = Session.open(container, [0.0], None, 0, "-", 1, guard=False)
                        sess.add_quant([LayerSpec("0", 8, None, False)], 8, tensors, ReferenceBackend())
                        hook = sess.layers["0"]
                        kb = TritonBackend(kind, opts)
                        kb.prepare(mod, hook)
                        hook.backend = kb
                        sess.clock.start_run()
                        sess.clock.set(0)
                        if algo == "two-pass-cublaslt":
                            row["fp8_two-pass-cublaslt_gemm"] = hook.pack.gemm  # "triton" where it does not fit
                        ms = tt.do_bench(lambda: kb.forward(mod, hook, x))
                        row[f"{kind}_{algo}_tops"] = 2 * macs / ms / 1e9
                        row[f"{kind}_{algo}_graph_tops"] = 2 * macs / graph_ms(lambda: kb.forward(mod, hook, x)) / 1e9
                    except Exception as e:  # noqa: BLE001
                        row[f"{kind}_{algo}_error"] = f"{type(e).__name__}: {e}"[:200]
                    finally:
                        if sess is not None:
                            sess.close()  # removes the hook and the packed buffers: mod is a plain layer again
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


# The phases of a torch.compile warm-up worth reporting (torch._dynamo.utils.compilation_time_metrics):
# dynamo + AOTAutograd tracing, inductor's lowering, scheduling / fusion, code generation, and the
# wait for the kernels its worker processes compile.
COMPILE_PHASES = ("_compile.compile_inner", "create_aot_dispatcher_function", "GraphLowering.run",
                  "Scheduler.__init__", "Scheduler.codegen", "PyCodeCache.load_by_key_path", "async_compile.wait")


def compile_record(metrics: dict, counters) -> dict:
    """Where a compiled row's warm-up went, in seconds per phase, inductor's cache hits and
    misses, and how many candidate configs its coordinate-descent tuning timed
    (``coordesc_tuning_bench``, 0 when every kernel's tuned config came from the cache or no tuning
    was on): a compilation cut by its time limit still says how far it got (a phase is recorded
    when it returns, so the one running at the cut is missing)."""
    phases = {k: round(sum(metrics[k]), 1) for k in COMPILE_PHASES if metrics.get(k)}
    cache = {k: v for k, v in counters["inductor"].items() if "cache" in k}
    if not (phases or cache):
        return {}
    return {"compile_phases_s": phases, "inductor_cache": cache,
            "inductor_tuning": {"coordesc_tuning_bench": counters["inductor"]["coordesc_tuning_bench"]}}


def warmup_limit(args, elapsed: float) -> float | None:
    """--warmup-limit-s, but no more than what is left of --time-budget-s: a compilation that would
    run past the device call's end fails with its reason instead of being killed without one."""
    left = args.time_budget_s - elapsed
    if args.warmup_limit_s is None and left > 1e8:
        return None
    return max(1.0, min(args.warmup_limit_s or float("inf"), left))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["sd15", "dit-xl2", "flux", "sd3"], default="sd15",
                    help="flux / sd3: the transformer alone (random text embeddings in, latents out), 1024², 28 steps")
    ap.add_argument("--sampler", choices=["pndm", "ddpm", "ddim", "flow-euler"], default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--intervals", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed runs per row after its warm-up run; 0: the warm-up run only, which fills the "
                         "on-disk caches (inductor's FX graph and autotuning caches) for a later run on the same machine")
    ap.add_argument("--rows", default=None,
                    help="comma-separated substrings: run only matching rows, in the order of the first substring "
                         "each matches (put the rows that must not be cut by --time-budget-s first)")
    ap.add_argument("--time-budget-s", type=float, default=1e9, help="stop starting rows after this")
    ap.add_argument("--warmup-limit-s", type=float, default=None,
                    help="a row whose warm-up run (compilation, graph capture) takes longer fails with that reason")
    ap.add_argument("--profile", action="store_true",
                    help="per row, one extra run under torch.profiler: GPU time per kernel category, GPU idle share")
    ap.add_argument("--profile-warmup", action="store_true",
                    help="per row, sample the warm-up's Python stack and record the functions it spent the most time in "
                         "(where a slow compilation goes; recorded also when the warm-up limit cuts it)")
    ap.add_argument("--kernels-only", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="small configs on the CPU: a smoke test of this script")
    ap.add_argument("--fuse-qkv", action="store_true",
                    help="fuse each attention's q, k, v projections into one GEMM (diffusers' fuse_qkv_projections) "
                         "before any row: every row, fp16 included, runs fused")
    ap.add_argument("--plan-dir", default=None,
                    help="keep calibrated plans here and reuse them in later runs on the same machine")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.repeats < 0:
        ap.error(f"--repeats {args.repeats}: give the number of timed runs per row (0 for the warm-up run only)")
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (or --tiny for a CPU smoke test)")
    env = timing_environment(device)
    result: dict = {"env": env}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        write_json(out, result, default=None)

    if args.kernels_only:
        result["kernels"] = kernel_microbench()
        save()
        for r in result["kernels"]:
            print(json.dumps(r))
        return 0

    sampler = args.sampler or {"sd15": "pndm", "dit-xl2": "ddpm"}.get(args.model, "flow-euler")
    if (sampler == "flow-euler") != (args.model in TRANSFORMER_ONLY):
        ap.error(f"--sampler {sampler} does not fit --model {args.model}")
    steps = args.steps or {"pndm": 50, "ddpm": 250, "ddim": 50, "flow-euler": 28}[sampler]
    n_list = args.intervals or ([5] if args.model == "sd15" else [2, 3])
    pipe = build(args.model, sampler, device, args.tiny)
    result.update(model=args.model, sampler=sampler, steps=steps, rows=[])
    if args.fuse_qkv:
        result["fused_qkv_layers"] = fuse_qkv(pipe)
    from cachequant.metrics.macs import count_ops

    calls = []
    h = denoiser(pipe).register_forward_pre_hook(lambda m, a: calls.append(1))
    with torch.no_grad(), count_ops(denoiser(pipe)) as c:
        call_pipeline(pipe, **{**call_kwargs(args.model, 1, 2, args.tiny), "output_type": "latent"})
    h.remove()
    # Linear + conv MACs of one full model call per image (CFG doubles the batch; Flux embeds its
    # guidance); attention matmuls are not counted.
    result["gmacs_per_image_call"] = c.macs / len(calls) / CFG_CALLS[args.model] / 1e9
    plans = PlanCache(args.plan_dir, tiny=args.tiny, tag="fused" if args.fuse_qkv else "")
    from torch._dynamo.utils import compilation_time_metrics, counters as dynamo_counters

    t_start = time.perf_counter()
    base = {}
    for batch in args.batch:
        for name, fn, kw in select_rows(rows_for(args.model, n_list), args.rows):
            row = {"row": name, "batch": batch}
            if time.perf_counter() - t_start > args.time_budget_s:
                row["error"] = "not run: time budget of this device call"
                result["rows"].append(row)
                continue
            undo = None
            try:
                info = {}
                if fn is not None:
                    info, undo = fn(pipe, args.model, steps=steps, plans=plans, batch=batch, tiny=args.tiny, **kw)
                row.update(info)
                dynamo_counters.clear()
                compilation_time_metrics.clear()
                with torch.no_grad():
                    run = functools.partial(call_pipeline, pipe)  # called with call_kwargs and a generator
                    row.update(time_runs(run, call_kwargs(args.model, batch, steps, args.tiny), args.repeats, device,
                                         warmup_limit(args, time.perf_counter() - t_start),
                                         row if args.profile_warmup else None))
                    if args.profile:
                        row["profile"] = profile_run(run, call_kwargs(args.model, batch, steps, args.tiny), device)
                if dynamo_counters["stats"]["unique_graphs"]:  # compiled rows: how many graphs, graph breaks
                    row["dynamo_graphs"] = dynamo_counters["stats"]["unique_graphs"]
                    row["dynamo_graph_breaks"] = sum(dynamo_counters["graph_break"].values())
                if "median_s" in row:
                    row["s_per_image"] = row["median_s"] / batch
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:400]
                traceback.print_exc()
            finally:
                row.update(compile_record(compilation_time_metrics, dynamo_counters))
                if undo is not None:
                    try:
                        undo()
                    except Exception:  # noqa: BLE001
                        traceback.print_exc()
                if device == "cuda":
                    torch.cuda.empty_cache()
            if name == "fp16 eager" and "median_s" in row:
                base[("eager", batch)] = row["median_s"]
            if name == "fp16 + torch.compile" and "median_s" in row:
                base[("compile", batch)] = row["median_s"]
            result["rows"].append(row)
            for r in result["rows"]:  # ratios so far: a run cut short still has them
                for k in ("eager", "compile"):
                    b = base.get((k, r["batch"]))
                    if b and "median_s" in r:
                        r[f"speedup_vs_{k}"] = b / r["median_s"]
            protocol_ratios(result["rows"])
            print(json.dumps(row), flush=True)
            save()
    print(f"\n{args.model} {sampler} {steps} steps on {env['gpu']} (torch {env['torch']}, triton {env['triton']})")
    print(f"{'row':52s} {'batch':>5s} {'s/img':>8s} {'x eager':>8s} {'x best fp16':>11s} {'x cache-only':>12s} "
          f"{'x same fp16':>11s} {'peak GiB':>8s}")
    nan = float("nan")
    for r in result["rows"]:
        if "median_s" in r:
            print(f"{r['row']:52s} {r['batch']:5d} {r['s_per_image']:8.3f} {r.get('speedup_vs_eager', nan):8.2f} "
                  f"{r.get('x_best_fp16', nan):11.2f} {r.get('x_cache_only', nan):12.2f} {r.get('x_same_fp16', nan):11.2f} "
                  f"{r['peak_mem_gib']:8.2f}")
        else:
            why = r.get("error") or f"warm-up run only: {r['warmup_s']:.1f} s"
            print(f"{r['row']:52s} {r['batch']:5d}  {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
