"""CPU smoke test of the GPU speed benchmark (benchmarks/speed.py --tiny): the rows run, failures
are recorded per row instead of stopping the run, and the JSON carries the ratios the results
file quotes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_tiny_rows(tmp_path):
    out = tmp_path / "dit.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--tiny", "--model", "dit-xl2",
                        "--sampler", "ddim", "--steps", "2", "--repeats", "2", "--intervals", "2",
                        "--rows", "fp16 eager,cache-only,FirstBlockCache,INT8 + graph, 8-bit,W4A8 + graph", "--profile",
                        "--profile-warmup", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = {row["row"]: row for row in res["rows"]}
    pats = ["fp16 eager", "cache-only", "FirstBlockCache", "INT8 + graph", "8-bit", "W4A8 + graph"]
    first = [next(i for i, s in enumerate(pats) if s in r["row"]) for r in res["rows"]]
    assert first == sorted(first) and len(first) > 5  # rows run in the order --rows names them
    assert rows["fp16 eager"]["speedup_vs_eager"] == 1.0 and len(rows["fp16 eager"]["times_s"]) == 2
    cached = rows["cachequant cache-only N=2 + graph"]
    assert cached["full_steps"] == 1 and cached["calls"] == 2 and cached["median_s"] > 0
    assert "graphs" in cached  # no CUDA here: graph capture is skipped, and the row says so
    lean = rows["CacheQuant N=2 INT8 + graph, 8-bit weights only"]  # Triton's interpreter on the CPU
    assert lean["median_s"] > 0 and lean["kernel_layers"] > 0, lean
    assert 0 < lean["packed_weight_gib"] * 4 <= lean["float_weight_gib_dropped"] * 1.0001  # fp32 → 8 bit
    w4 = rows["CacheQuant N=2 W4A8 + graph, 4-bit weights only"]
    assert w4["median_s"] > 0 and w4["packed_weight_gib"] * 4 < w4["float_weight_gib_dropped"], w4  # < 8 bits
    assert rows["diffusers FirstBlockCache"]["median_s"] > 0  # diffusers' own cache hooks, applied to DiT
    assert not any(name.startswith("DeepCache") for name in rows)  # the UNet-only helper has no DiT rows
    assert res["gmacs_per_image_call"] > 0
    assert "fp16 eager" in r.stdout  # the table is printed last
    assert all(r["warmup_profile"]["sampled_s"] >= 0 for r in res["rows"])  # --profile-warmup: every row
    prof = rows["fp16 eager"]["profile"]  # no CUDA kernels on the CPU: the structure, not the shares
    assert prof["wall_ms"] > 0 and prof["kernels"] == 0 and 0 <= prof["gpu_idle_fraction"] <= 1
    assert prof["top_other_kernels"] == [] and prof["top_kernels_by_category"] == {}
    rep = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed_report.py"), str(out)],
                         capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0 and "Profile of one image" in rep.stdout and "| fp16 eager |" in rep.stdout, rep.stderr


def test_profile_kernel_categories():
    from conftest import load_benchmark

    cat = load_benchmark("speed").kernel_category
    assert cat("_gemm_kernel") == cat("_fused_kernel") == "cachequant 8-bit GEMM"
    assert cat("_quantize_kernel") == "cachequant activation quantize"
    assert cat("_fake_quant_kernel") == "cachequant fake quant"
    assert cat("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64").startswith("float GEMM")
    assert cat("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert cat("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel").startswith("other")
    assert cat("group_norm_nhwc_kernel") == "norm"


def test_top_kernels_of_a_category():
    from conftest import load_benchmark

    speed = load_benchmark("speed")
    ev = [("elementwise_add", 100.0), ("_gemm_kernel", 900.0), ("elementwise_add", 50.0), ("copy_", 120.0)]
    top = speed.top_kernels(ev, speed.OTHER)
    assert top == [{"kernel": "elementwise_add", "ms": 0.15, "launches": 2}, {"kernel": "copy_", "ms": 0.12, "launches": 1}]
    prof = {"wall_ms": 2.0, "gpu_kernel_ms": 1.17, "gpu_idle_fraction": 0.4, "kernels": 4,
            "ms_by_category": {speed.OTHER: 0.27}, "top_other_kernels": top}
    text = load_benchmark("speed_report").profile_table({"rows": [{"row": "INT8", "profile": prof}]})
    assert "Largest 'other' kernels, INT8" in text and "| `elementwise_add` | 0.1 | 2 |" in text


def test_torchao_rows_keep_the_small_linears_out():
    """torch._int_mm refuses M ≤ 16: the torchao rows quantize only the Linears that see more rows.
    On the tiny DiT at batch 1 (2 rows with CFG) those are the token-wise ones, not the adaLN /
    time-embedding MLPs."""
    from conftest import load_benchmark, load_harness

    speed = load_benchmark("speed")
    models = load_harness("models")
    pipe = models.build("dit-xl2", "ddim", "cpu", tiny=True)
    rows = models.linear_rows(pipe, "dit-xl2", 1, True)
    small = {n for n, r in rows.items() if r < models.TORCHAO_MIN_ROWS}
    assert small and small != set(rows)
    assert all(rows[n] == 2 for n in small)  # batch 1 with CFG
    assert any("timestep_embedder" in n for n in small) and any("attn1.to_q" in n for n in set(rows) - small)
    keep, info = models.torchao_filter(pipe, "dit-xl2", 1, True)
    mods = dict(models.denoiser(pipe).named_modules())
    assert {n for n in rows if keep(mods[n], n)} == set(rows) - small
    assert info["torchao_linears_kept_fp16"] == len(small) and 0 < info["torchao_kept_linear_mac_share"] < 1
    assert [r[0] for r in speed.select_rows([("a x", 0, 0), ("b", 0, 0), ("c x", 0, 0)], "b, x")] == ["b", "a x", "c x"]


def test_plan_cache_reuses_stored_plans_only_for_the_same_model(tmp_path, capsys):
    """--plan-dir: a later run on the same machine loads the plan instead of calibrating again,
    unless the model's weights differ."""
    import torch
    from conftest import load_harness

    models = load_harness("models")
    pipe = models.build("dit-xl2", "ddim", "cpu", tiny=True)
    first = models.PlanCache(str(tmp_path)).get(pipe, "dit-xl2", 4, 2, 8)
    assert "bench_plan_loaded" not in first.info and len(list(tmp_path.glob("*.cqplan"))) == 1
    again = models.PlanCache(str(tmp_path)).get(pipe, "dit-xl2", 4, 2, 8)
    assert again.info["bench_plan_loaded"] and again.schedule == first.schedule
    # a plan without a cache (interval 1: the fp16 and quant-only rows) is reused as well
    models.PlanCache(str(tmp_path)).get(pipe, "dit-xl2", 4, 1, 8)
    assert models.PlanCache(str(tmp_path)).get(pipe, "dit-xl2", 4, 1, 8).info["bench_plan_loaded"]
    assert torch.equal(again.tensors[next(iter(first.tensors))], first.tensors[next(iter(first.tensors))])
    with torch.no_grad():
        next(models.denoiser(pipe).parameters()).add_(1.0)
    other = models.PlanCache(str(tmp_path)).get(pipe, "dit-xl2", 4, 2, 8)
    assert "bench_plan_loaded" not in other.info and "not used" in capsys.readouterr().err


def test_coverage_checklist_finds_measured_explained_and_missing_rows(tmp_path):
    from conftest import load_benchmark

    rep = load_benchmark("speed_report")
    old = {"model": "dit-xl2", "sampler": "ddim", "steps": 50, "env": {}, "rows": [
        {"row": "fp16 eager", "batch": 1, "median_s": 2.0, "s_per_image": 2.0, "speedup_vs_eager": 1.0},
        {"row": "fp16 + torch.compile", "batch": 1, "error": "not run: time budget of this device call"},
        {"row": "torchao int8 dynamic + compile", "batch": 1, "error": "RuntimeError: the warm-up run (compilation, "
         "graph capture) did not finish in 135.4 s (--warmup-limit-s, or what was left of --time-budget-s)"},
        {"row": "diffusers FirstBlockCache", "batch": 1, "error": "RuntimeError: no transformer blocks"}]}
    new = {"model": "dit-xl2", "sampler": "ddim", "steps": 50, "env": {}, "rows": [
        {"row": "fp16 eager", "batch": 1, "median_s": 1.5, "s_per_image": 1.5, "speedup_vs_eager": 1.0},
        # neither N=30 nor a weights-only variant stands in for "CacheQuant N=3 FP8 + graph"
        {"row": "CacheQuant N=30 FP8 + graph", "batch": 1, "median_s": 0.1, "s_per_image": 0.1},
        {"row": "CacheQuant N=3 FP8 + graph, 8-bit weights only", "batch": 1, "median_s": 0.1, "s_per_image": 0.1},
        # a warm-up-only run (--repeats 0) neither measures nor explains a row
        {"row": "cachequant INT8 quant-only + graph", "batch": 1, "warmup_only": True, "warmup_s": 3.0}]}
    paths = []
    for name, d in (("a.json", old), ("b.json", new)):
        (tmp_path / name).write_text(json.dumps(d))
        paths.append(str(tmp_path / name))
    text, missing = rep.coverage(paths)
    assert "| fp16 eager | 1.500 | 1.00 | b.json |" in text  # the newer file wins
    assert "| fp16 + torch.compile | – | not measured: not run: time budget" in text
    assert "| diffusers FirstBlockCache | – | not measured: RuntimeError: no transformer blocks | a.json |" in text
    assert "| CacheQuant N=3 FP8 + graph | – | **missing** | |" in text
    assert "| torchao int8 dynamic + compile | – | not measured: RuntimeError: the warm-up run" in text
    assert "| cachequant INT8 quant-only + graph | – | **missing** | |" in text
    n_required = sum(len(v) for v in rep.REQUIRED.values())
    assert missing == n_required - 2  # fp16 eager measured, FirstBlockCache explained; an unfinished compile is not


def test_every_row_pattern_of_the_device_scripts_names_a_row():
    """A pattern that matches no row would silently drop that row from a device run."""
    import re

    from conftest import load_benchmark

    speed = load_benchmark("speed")
    checked = 0
    for script in ("run_speed_rest.sh", "run_speed_suite.sh"):
        text = (ROOT / "benchmarks" / script).read_text()
        for m in re.finditer(r'--model (\S+).*?--rows "([^"]+)"', text, re.S):
            names = [r[0] for r in speed.rows_for(m.group(1), [5] if m.group(1) == "sd15" else [2, 3])]
            for pat in m.group(2).split(","):
                assert any(pat.strip() in n for n in names), (script, m.group(1), pat)
                checked += 1
    assert checked > 50


def test_warmup_limit_stops_a_slow_row_even_through_except_exception():
    """--warmup-limit-s: a warm-up run that takes longer fails with the reason, even when the code
    it interrupts catches ``Exception`` (inductor does, around its Triton compiles); the runs after
    it are not timed, and the alarm is off afterwards."""
    import time

    import pytest

    from conftest import load_benchmark, load_harness

    speed = load_benchmark("speed")
    timing = load_harness("timing")
    calls = []

    def slow_pipe(**kw):  # a compilation that swallows ordinary exceptions
        calls.append(1)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 5:
            try:
                time.sleep(0.01)
            except Exception:  # noqa: BLE001
                pass

    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"warm-up run .* did not finish in 0.2 s"):
        timing.time_runs(slow_pipe, {}, repeats=3, device="cpu", warmup_limit_s=0.2)
    assert time.perf_counter() - t0 < 2 and len(calls) == 1
    fast = timing.time_runs(lambda **kw: calls.append(1), {}, repeats=2, device="cpu", warmup_limit_s=0.2)
    time.sleep(0.3)  # the alarm of the finished row must not fire later
    assert len(fast["times_s"]) == 2
    # the limit a row gets: --warmup-limit-s, cut to what --time-budget-s has left
    ns = lambda lim, budget: type("A", (), {"warmup_limit_s": lim, "time_budget_s": budget})  # noqa: E731
    assert speed.warmup_limit(ns(None, 1e9), 5.0) is None
    assert speed.warmup_limit(ns(300.0, 1e9), 5.0) == 300.0
    assert speed.warmup_limit(ns(300.0, 530.0), 400.0) == 130.0
    assert speed.warmup_limit(ns(None, 530.0), 100.0) == 430.0


def test_regional_compile_shares_one_graph_across_identical_blocks():
    """Regional compilation (the "regional compile" rows): identical blocks reuse one
    compiled graph (fewer graphs than blocks, so compile time does not grow with depth), the
    output equals the eager model's, and the original denoiser comes back afterwards."""
    import torch
    from conftest import load_benchmark, load_harness

    from cachequant.pipecall import call_pipeline
    from torch._dynamo.utils import counters

    speed = load_benchmark("speed")
    models = load_harness("models")
    pipe = models.build("dit-xl2", "ddim", "cpu", tiny=True)
    kw = {**models.call_kwargs("dit-xl2", 1, 2, True), "output_type": "latent"}
    orig = models.denoiser(pipe)
    with torch.no_grad():
        ref = call_pipeline(pipe, generator=torch.Generator().manual_seed(0), **kw).images
        torch._dynamo.reset()
        counters.clear()
        info, undo = speed.row_compile(pipe, "dit-xl2", scope="regional")
        out = call_pipeline(pipe, generator=torch.Generator().manual_seed(0), **kw).images
    n_blocks = len(models.denoiser(pipe).transformer_blocks)
    assert info["compile_scope"].startswith(f"each BasicTransformerBlock ({n_blocks})")
    assert all(b._compiled_call_impl is not None for b in models.denoiser(pipe).transformer_blocks)
    assert 0 < counters["stats"]["unique_graphs"] < n_blocks
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    undo()
    assert models.denoiser(pipe) is orig and all(b._compiled_call_impl is None for b in orig.transformer_blocks)


def test_compile_time_script_times_tracing_of_float_and_torchao_models(tmp_path):
    """benchmarks/compile_time.py on the tiny DiT: both rows compile the whole model into one graph
    (the torchao one with its quantized Linears), and the JSON says what ran where."""
    script = str(ROOT / "benchmarks" / "compile_time.py")
    has_torchao = importlib.util.find_spec("torchao") is not None
    quants = ["none", "int8"] if has_torchao else ["none"]
    out = tmp_path / "ct.json"
    r = subprocess.run([sys.executable, script, "--tiny", "--model", "dit-xl2", "--quant", *quants,
                        "--backend", "aot_eager", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [row["quant"] for row in res["rows"]] == quants and res["eager_float_call_s"] > 0
    for row in res["rows"]:
        assert row["dynamo_graphs"] == 1 and row["dynamo_graph_breaks"] == 0 and row["first_call_s"] > 0
    assert "cpu" in res["env"]["device"]
    if has_torchao:
        assert res["rows"][1]["torchao_linears_quantized"] > 0
    else:  # without torchao, asking for its rows is a clear error and writes nothing
        no = subprocess.run([sys.executable, script, "--tiny", "--quant", "int8", "--out", str(tmp_path / "n.json")],
                            capture_output=True, text=True, timeout=600)
        assert no.returncode != 0 and "needs torchao" in no.stderr and not (tmp_path / "n.json").exists()
    bad = subprocess.run([sys.executable, script, "--tiny", "--quant", "fp8", "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "needs a CUDA GPU" in bad.stderr and not (tmp_path / "x.json").exists()


def test_compile_record_reports_the_phases_of_a_warm_up():
    """A compiled row records where its warm-up went and how many configs the tuning timed; an
    eager row records nothing."""
    import torch
    from conftest import load_benchmark
    from torch._dynamo.utils import compilation_time_metrics, counters

    speed = load_benchmark("speed")
    torch._dynamo.reset()
    compilation_time_metrics.clear()
    counters.clear()
    assert speed.compile_record(compilation_time_metrics, counters) == {}
    f = torch.compile(lambda x: (x * 2).sin().sum(), backend="aot_eager")
    f(torch.randn(8))
    rec = speed.compile_record(compilation_time_metrics, counters)
    phases = rec["compile_phases_s"]
    assert set(phases) <= set(speed.COMPILE_PHASES) and "_compile.compile_inner" in phases
    assert phases["_compile.compile_inner"] >= phases.get("create_aot_dispatcher_function", 0) >= 0
    assert rec["inductor_tuning"] == {"coordesc_tuning_bench": 0}  # aot_eager tunes nothing
    counters["inductor"]["coordesc_tuning_bench"] += 3  # what inductor counts per candidate config it times
    assert speed.compile_record(compilation_time_metrics, counters)["inductor_tuning"] == {"coordesc_tuning_bench": 3}


def test_warmup_profile_names_the_slow_stage_also_when_the_limit_cuts_it():
    """--profile-warmup: the functions a warm-up spent its time in, recorded even when the limit
    stops it (a compilation that never finishes is the case that needs it most)."""
    import time

    import pytest

    from conftest import load_benchmark, load_harness

    timing = load_harness("timing")

    def stuck_stage():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 5:
            time.sleep(0.01)

    def quick_stage():
        time.sleep(0.01)

    def pipe(**kw):
        quick_stage()
        stuck_stage()

    sink: dict = {}
    with pytest.raises(RuntimeError, match="did not finish") as cut:
        timing.time_runs(pipe, {}, repeats=1, device="cpu", warmup_limit_s=0.8, warmup_profile=sink)
    # the report reads the limit back from this message, and counts the row as cut, not explained
    rep = load_benchmark("speed_report")
    assert rep.WARMUP_CUT.search(str(cut.value)).group(1) == "0.8" and rep.cut_short(str(cut.value))
    prof = sink["warmup_profile"]
    slow = {r["function"]: r["s"] for r in prof["inclusive"]}
    stuck = next(s for f, s in slow.items() if "stuck_stage" in f)
    assert 0.5 <= stuck <= 2.0 and not any("quick_stage" in f for f in slow)  # below min_s: left out
    assert "stuck_stage" in prof["own"][0]["function"]  # where the thread sat (in time.sleep, called from there)
    assert 0.6 <= prof["sampled_s"] <= 2.0


def test_warmup_table_splits_a_warm_up_into_compile_step_and_first_run():
    from conftest import load_benchmark

    rep = load_benchmark("speed_report")
    res = {"rows": [
        {"row": "fp16 eager", "batch": 1, "median_s": 1.0},
        {"row": "torchao int8 dynamic + compile", "batch": 1, "warmup_s": 205.4, "median_s": 3.7,
         "compile_phases_s": {"_compile.compile_inner": 65.5, "GraphLowering.run": 8.3, "Scheduler.__init__": 8.6,
                              "Scheduler.codegen": 8.4, "async_compile.wait": 1.3},
         "inductor_cache": {"fxgraph_cache_miss": 1}, "inductor_tuning": {"coordesc_tuning_bench": 812},
         "warmup_profile": {"sampled_s": 205.0, "interval_s": 0.2,
                            "inclusive": [{"function": "main.py:1(main)", "s": 205.0}, {"function": "a.py:1(run)", "s": 200.0},
                                          {"function": "b.py:9(bench)", "s": 120.0}],
                            "own": [{"function": "b.py:9(bench)", "s": 110.0}]}},
        {"row": "torchao float8 dynamic + compile", "batch": 1, "compile_phases_s": {"_compile.compile_inner": 61.4},
         "error": "RuntimeError: the warm-up run (compilation, graph capture) did not finish in 135.4 s (...)"}]}
    text = rep.warmup_table(res)
    assert "| torchao int8 dynamic + compile | 1 | 205.4 | 65.5 | 25.3 | 1.3 | 139.9 | coordesc_tuning_bench 812, fxgraph_cache_miss 1 |" in text
    assert "| torchao float8 dynamic + compile | 1 | ≥ 135.4 | 61.4 | – | – | ≥ 74.0 |  |" in text  # cut: lower bounds
    assert "| `b.py:9(bench)` | 120.0 | 110.0 |" in text and "| `a.py:1(run)` | 200.0 | – |" in text
    assert "main.py" not in text and "1 callers on the stack throughout left out" in text  # in every sample
    assert "Innermost functions: `b.py:9(bench)` 110.0." in text
    assert "fp16 eager" not in text  # not compiled: not in the table
    assert rep.warmup_table({"rows": [{"row": "fp16 eager", "batch": 1}]}) == ""


def test_torchao_row_records_and_restores_the_inductor_settings_it_changes():
    """torchao's quantize_ changes process-wide inductor settings (set_inductor_config=True by
    default): the row records which ones, and undoing the row puts them back, so rows after it in
    the same process compile as they would have without it."""
    pytest.importorskip("torchao")
    import torch._inductor.config as inductor_config
    from conftest import load_benchmark, load_harness

    speed = load_benchmark("speed")
    models = load_harness("models")
    pipe = models.build("dit-xl2", "ddim", "cpu", tiny=True)
    before = inductor_config.get_config_copy()
    info, undo = speed.row_torchao(pipe, "dit-xl2", "int8", batch=1, tiny=True, compile=None)
    changed = info["inductor_config_set_by_torchao"]
    assert changed.get("coordinate_descent_tuning") is True  # torchao 0.18's recommended settings
    assert all(getattr(inductor_config, k) != before[k] for k in changed)
    json.dumps(changed)  # goes into the results file as is
    undo()
    assert {k: getattr(inductor_config, k) for k in changed} == {k: before[k] for k in changed}
    assert speed.config_changes({"a": 1, "b": print}, {"a": 2, "b": print, "c": 0}) == {"a": 2}


def test_warmup_only_run_records_the_warmup_and_measures_nothing(tmp_path):
    """--repeats 0 runs each row's warm-up only (on the device: compilation and inductor's tuning,
    which fill the on-disk caches for a later timed run; run_speed_rest.sh's torchao-sd15-b8-rest
    relies on that, which only the device shows): the rows say so and carry no timings."""
    out = tmp_path / "warm.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--tiny", "--model", "dit-xl2", "--sampler", "ddim",
           "--steps", "2", "--intervals", "2", "--rows", "fp16 eager,cachequant cache-only"]
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1", "CQ_AUTOTUNE_SEED": "seed.tgz"}
    r = subprocess.run(cmd + ["--repeats", "0", "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    settings = res["env"]["settings"]  # the settings that change a measurement
    assert settings["TORCHINDUCTOR_COMPILE_THREADS"] == "1" and settings["CQ_AUTOTUNE_SEED"] == "seed.tgz"
    assert "PATH" not in settings and "HOME" not in settings
    rows = res["rows"]
    assert len(rows) == 2 and all(row["warmup_only"] and row["warmup_s"] > 0 for row in rows)
    assert not any("median_s" in row or "error" in row for row in rows)
    rep = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed_report.py"), str(out)],
                         capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0 and "| fp16 eager | 1 | – | – | – | – | warm-up run only (--repeats 0) |" in rep.stdout
    assert "TORCHINDUCTOR_COMPILE_THREADS=1" in rep.stdout  # the report's header line names them
    bad = subprocess.run(cmd + ["--repeats", "-1", "--out", str(tmp_path / "bad.json")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--repeats -1" in bad.stderr and not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_speed_benchmark_transformer_only_workloads(tmp_path, model):
    """Flux.1-dev and SD3-medium rows (tiny configs here): FluxPipeline / StableDiffusion3Pipeline
    with fixed random text embeddings and no VAE, flow-matching Euler; the plans calibrate through
    the pipelines and the MACs count one image per call for Flux (guidance embedded), two for SD3."""
    out = tmp_path / f"{model}.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--tiny", "--model", model,
                        "--steps", "3", "--repeats", "1", "--intervals", "2",
                        "--rows", "fp16 eager,cache-only N=2 + graph,quant-only auto + graph", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = {row["row"]: row for row in res["rows"]}
    assert res["sampler"] == "flow-euler" and res["gmacs_per_image_call"] > 0
    assert all("median_s" in row for row in rows.values()), rows
    assert rows["cachequant cache-only N=2 + graph"]["full_steps"] == 2  # 3 steps, N = 2: steps 0 and 2
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--tiny", "--model", model,
                          "--sampler", "ddim", "--out", str(tmp_path / "x.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not fit" in bad.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_linear_shapes_refuses_a_machine_without_a_gpu():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "linear_shapes.py"), "--shapes", "sd3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a CUDA GPU with FP8" in r.stderr
