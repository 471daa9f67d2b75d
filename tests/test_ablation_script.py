"""benchmarks/ablation.py on the tiny UNet: sample is incremental and crash-tolerant, report renders
every row (the GPU run of the real tables must not fail on bookkeeping)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def ablation():
    from conftest import load_benchmark

    yield load_benchmark("ablation")
    sys.modules.pop("ablation", None)


def _sample(ablation, work: Path, only: str, *extra: str) -> int:
    return ablation.main(["sample", "--table", "unet", "--model", "tiny-ddim", "--steps", "10", "--num-samples", "4",
                          "--batch-size", "3", "--device", "cpu", "--work", str(work), "--only", only,
                          "--calib-samples", "2", "--calib-batch-size", "2", "--dps-samples", "2", "--quiet", *extra])


def test_sample_resume_failure_and_report(ablation, tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "results"
    real = ablation.sample_variant

    def flaky(pipe, table, variant, *a, **k):
        if variant.slug == "w4a8":
            raise RuntimeError("injected failure")
        return real(pipe, table, variant, *a, **k)

    monkeypatch.setattr(ablation, "sample_variant", flaky)
    assert _sample(ablation, work, "w8a8,w4a8,cache-n5") == 1  # a failure is reported by the exit code ...
    tdir = work / "unet"
    for slug in ("fp", "w8a8", "cache-n5"):  # ... and does not stop the variants after it
        info = json.loads((tdir / slug / "info.json").read_text())
        assert info["status"] == "done" and info["num_samples"] == 4
        with np.load(tdir / slug / "samples.npz") as z:
            assert z["images"].shape == (4, 16, 16, 3) and z["images"].dtype == np.uint8
        assert not (tdir / slug / "shards").exists()
    assert "injected failure" in json.loads((tdir / "w4a8" / "error.json").read_text())["error"]
    fp, w8, c5 = (json.loads((tdir / s / "info.json").read_text()) for s in ("fp", "w8a8", "cache-n5"))
    assert fp["schedule"] is None and w8["schedule"] == list(range(10)) and len(c5["schedule"]) == 2
    assert w8["bops_per_image"] < fp["bops_per_image"] and c5["macs_per_image"] < fp["macs_per_image"]
    with np.load(tdir / "fp" / "samples.npz") as a, np.load(tdir / "cache-n5" / "samples.npz") as b:
        assert not np.array_equal(a["images"], b["images"])

    # rerun: done variants are skipped (files untouched), the failed one is retried and succeeds
    monkeypatch.setattr(ablation, "sample_variant", real)
    mtime = (tdir / "fp" / "samples.npz").stat().st_mtime_ns
    assert _sample(ablation, work, "w8a8,w4a8,cache-n5") == 0
    status = json.loads((tdir / "sample-status.json").read_text())
    assert sorted(status["done_before"]) == ["cache-n5", "fp", "w8a8"] and status["done"] == ["w4a8"]
    assert (tdir / "fp" / "samples.npz").stat().st_mtime_ns == mtime
    assert not (tdir / "w4a8" / "error.json").exists()

    # PSNR / SSIM of fp against itself is not a number to report; another variant gets real ones
    from conftest import load_harness

    metrics = load_harness("metrics")
    m_fp = metrics._cpu_metrics(None, None, None, str(tdir / "fp" / "samples.npz"), str(tdir / "fp" / "samples.npz"))
    assert m_fp["psnr_vs_fp"] is None and m_fp["is_fp_reference"]
    m_w8 = metrics._cpu_metrics(None, None, None, str(tdir / "w8a8" / "samples.npz"), str(tdir / "fp" / "samples.npz"))
    assert 5 < m_w8["psnr_vs_fp"] < 100 and 0 < m_w8["ssim_vs_fp"] < 1

    assert ablation.main(["report", "--work", str(work), "--out", str(out)]) == 0
    md = (out / "ablation.md").read_text()
    assert "JPEG-q75" in md and "## Analysis" in md and "Smoke-test run: 10 steps" in md
    for v in load_harness("tables").TABLES["unet"].variants:  # every row present, run or not
        assert f"(`{v.slug}`)" in md
    assert "not run (not sampled)" in md  # e.g. cache-n10
    assert "| quant only W8A8 (`w8a8`) | – |" in md  # sampled, no metrics computed: dashes, not numbers
    assert (out / "qandc.md").is_file() and (out / "ablation.png").stat().st_size > 1000


def _fake_features(sdir, device, batch_size, quiet, resize):
    """Stand-in for the Inception network (its weights are not in CI): a fixed projection of the pixels."""
    assert resize == "torch"  # the reference's convention (a file without the field: torch)
    images = np.load(sdir / "samples.npz")["images"].reshape(4, -1).astype(np.float64) / 255
    return (images @ np.random.default_rng(0).standard_normal((images.shape[1], 16))).astype(np.float32)


def test_metrics_are_written_per_variant_while_sampling(ablation, tmp_path, monkeypatch):
    from conftest import load_harness

    from cachequant.metrics.fid import save_reference

    work, ref = tmp_path / "work", tmp_path / "ref.npz"
    rng = np.random.default_rng(1)
    save_reference(ref, rng.standard_normal((8, 16)).astype(np.float32) * 3, source="synthetic")
    monkeypatch.setattr(load_harness("metrics"), "features_of", _fake_features)
    assert _sample(ablation, work, "w8a8", "--ref-stats", str(ref)) == 0
    tdir = work / "unet"
    m = {s: json.loads((tdir / s / "metrics.json").read_text()) for s in ("fp", "w8a8")}
    for slug, mm in m.items():
        assert "pending" not in mm and "error" not in mm, (slug, mm)
        assert np.isfinite(mm["fid"]) and mm["fid"] > 0
        assert 0 <= mm["precision"] <= 1 and 0 <= mm["recall"] <= 1 and mm["pr_samples"] == 4
        assert set(mm["seconds"]) == {"inception", "precision_recall", "fid_bootstrap", "fid_psnr_ssim"}
        assert len(mm["fid_bootstrap"]) == 20 and all(np.isfinite(mm["fid_bootstrap"]))
    assert m["fp"]["is_fp_reference"] and 5 < m["w8a8"]["psnr_vs_fp"] < 100
    table = json.loads((work / "unet.json").read_text())
    assert {r["variant"]: r["metrics"]["fid"] for r in table["rows"] if r["metrics"]} == \
        {s: m[s]["fid"] for s in m}

    # the `metrics` step skips what is up to date, and redoes a variant whose CPU part was cut short
    mtime = (tdir / "fp" / "metrics.json").stat().st_mtime_ns
    cut = dict(m["w8a8"], pending=["fid", "psnr_vs_fp", "ssim_vs_fp"])
    del cut["fid"]
    (tdir / "w8a8" / "metrics.json").write_text(json.dumps(cut))
    assert ablation.main(["report", "--work", str(work), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "ablation.md").read_text()  # the report reads the variants' files, not unet.json
    assert "not computed: the metrics run stopped first" in md and f"{m['fp']['fid']:.2f}" in md
    # FID ± its bootstrap spread, and the paired difference to fp over the same resamples
    d = np.asarray(m["w8a8"]["fid_bootstrap"]) - np.asarray(m["fp"]["fid_bootstrap"])
    assert f"± {np.std(m['fp']['fid_bootstrap'], ddof=1):.2f}" in md and f"{d.mean():+.2f} ± {d.std(ddof=1):.2f}" in md
    assert ablation.main(["metrics", "--table", "unet", "--work", str(work), "--ref-stats", str(ref),
                          "--device", "cpu", "--workers", "1", "--quiet"]) == 0
    assert (tdir / "fp" / "metrics.json").stat().st_mtime_ns == mtime
    redone = json.loads((tdir / "w8a8" / "metrics.json").read_text())
    assert "pending" not in redone and redone["fid"] == pytest.approx(m["w8a8"]["fid"])


def test_report_shows_calibration_coverage_and_plots_qandc_as_bars(ablation, tmp_path):
    """The coverage column (activation ranges are per step: the step with the fewest calibration
    entries) comes from the plan's diagnostics; the Q&C plot is per-variant bars."""
    from conftest import load_harness

    render = load_harness("render")

    def row(slug, calib=None, per_step=None, fid=None, same_as=None):
        info = {"status": "done", "run_key": {"steps": 4}, "macs_per_image": 10.0, "bops_per_image": 100.0}
        if calib is not None:
            info["config"] = {"calibration": calib, "num_calib_samples": 8}
            diag = {} if per_step is None else {"calibration_selection": {"per_step": per_step}}
            info["calibration"] = {"diagnostics": diag}
        if same_as:
            info = {"status": "done", "same_as": same_as}
        return {"variant": slug, "label": slug, "info": info, "shared_info": None, "error": None,
                "skipped_time_budget": False, "metrics": None if fid is None else {"fid": fid}}

    data = {"title": "t", "model": "m", "scheduler": "ddim", "default_steps": 4, "guidance_scale": None,
            "rows": [row("fp", fid=10.0), row("baseline", "trajectory", fid=12.0),
                     row("tap", "tap", {"0": 3, "1": 1, "2": 2}, fid=15.0), row("calib-tap", same_as="qandc/tap")]}
    cov = {r["variant"]: (r["entries_min"], r["entries_low"]) for r in render.table_rows(data)}
    assert cov == {"fp": (None, None), "baseline": (8, 0), "tap": (0, 3), "calib-tap": (None, None)}
    md = "\n".join(render.render_table(data))
    assert "| 8 |" in md and "| 0 (3) |" in md  # step 3 has no entry at all: 0, and three steps hold ≤ 2
    assert render.plot_bars([data], tmp_path / "q.png", "t").stat().st_size > 1000


def _run_json(rows: dict, fp_sha="f" * 40, ref_sha="r" * 40, command="sample run"):
    """A minimal ``unet.json`` of one run: ``rows`` maps variant → (samples SHA-1, FID) or None."""
    out = []
    for slug, val in rows.items():
        if val is None:
            out.append({"variant": slug, "label": slug, "info": None, "shared_info": None, "metrics": None,
                        "error": None, "skipped_time_budget": False})
            continue
        sha, fid = val
        out.append({"variant": slug, "label": slug, "shared_info": None, "error": None, "skipped_time_budget": False,
                    "info": {"status": "done", "macs_per_image": 10.0 if slug == "fp" else 5.0,
                             "bops_per_image": 100.0, "run_key": {"steps": 100}},
                    "metrics": {"fid": fid, "key": {"samples_sha1": sha, "fp_sha1": fp_sha,
                                                    "reference": {"sha1": ref_sha}}}})
    return {"table": "unet", "title": "UNet", "model": "cifar10-unet", "scheduler": "ddim", "default_steps": 100,
            "guidance_scale": None, "metrics_environment": None, "rows": out,
            "sample_status": {"num_samples": 10, "environment": {"command": command}}}


def test_report_from_json_merges_runs_and_refuses_incomparable_ones(ablation, tmp_path):
    """Tables sampled over several sessions are joined from their committed JSON files, in the
    table's variant order, only when every run measured against the same full-precision samples
    and reference statistics (else PSNR / FID of the joined rows would not be comparable)."""
    from conftest import load_harness

    tables = load_harness("tables")
    run1 = _run_json({"fp": ("f" * 40, 40.0), "w8a8": ("a" * 40, 45.0), "dps-dec-n10": None}, command="run 1")
    run2 = _run_json({"fp": ("f" * 40, 40.0), "w8a8": None, "dps-dec-n10": ("b" * 40, 44.0),
                      "w4a8-gptq": ("c" * 40, 47.0)}, command="run 2")
    (merged,) = tables.merge_table_jsons([run1, run2])
    fids = {r["variant"]: (r["metrics"] or {}).get("fid") for r in merged["rows"]}
    assert fids == {"fp": 40.0, "w8a8": 45.0, "dps-dec-n10": 44.0, "w4a8-gptq": 47.0}
    order = [v.slug for v in tables.TABLES["unet"].variants]
    assert [r["variant"] for r in merged["rows"]] == sorted(fids, key=order.index)
    assert merged["merged_commands"] == ["run 1", "run 2"]

    for p, d in (("a.json", run1), ("b.json", run2)):
        (tmp_path / p).write_text(json.dumps(d))
    out = tmp_path / "rep"
    assert ablation.main(["report", "--from-json", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                          "--out", str(out)]) == 0
    md = (out / "ablation.md").read_text()
    assert "| 44.00 |" in md and "| 47.00 |" in md and "run 2" in md
    assert "DDPM 250" in md  # the tables no file has are listed, as not sampled
    assert (out / "ablation.png").stat().st_size > 1000

    other_fp = _run_json({"fp": ("e" * 40, 41.0), "dps-dec-n10": ("b" * 40, 44.0)}, fp_sha="e" * 40)
    with pytest.raises(ValueError, match="full-precision samples"):
        tables.merge_table_jsons([run1, other_fp])
    other_ref = _run_json({"fp": ("f" * 40, 40.0)}, ref_sha="x" * 40)
    with pytest.raises(ValueError, match="reference statistics"):
        tables.merge_table_jsons([run1, other_ref])
    resampled = _run_json({"fp": ("f" * 40, 40.0), "w8a8": ("d" * 40, 46.0)})
    with pytest.raises(ValueError, match="different samples"):
        tables.merge_table_jsons([run1, resampled])
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="not a table JSON"):
        ablation.main(["report", "--from-json", str(tmp_path / "bad.json"), "--out", str(out)])
    with pytest.raises(SystemExit, match="--work"):
        ablation.main(["report", "--out", str(out)])


def test_carry_variant_moves_fp_between_sessions(ablation, tmp_path):
    """fp sampled in one session's work folder, exported in parts, imported into a fresh one: the
    sampler skips it there; damaged parts, other samples and other settings are refused."""
    from conftest import load_benchmark

    carry = load_benchmark("device/carry_variant")
    w1, w2, parts = tmp_path / "s1", tmp_path / "s2", tmp_path / "carry"
    assert _sample(ablation, w1, "fp") == 0
    manifest = carry.export_variant(w1, "unet", "fp", parts, part_bytes=1000)  # several parts
    m = json.loads(manifest.read_text())
    assert len(m["parts"]) > 1 and m["samples_sha1"] == carry._sha1(w1 / "unet" / "fp" / "samples.npz")
    assert carry.main(["import", "--work", str(w2), "--parts", str(parts)]) == 0
    assert (w2 / "unet" / "fp" / "samples.npz").read_bytes() == (w1 / "unet" / "fp" / "samples.npz").read_bytes()
    assert carry.import_variants(w2, parts) == ["unet/fp: already there"]
    assert _sample(ablation, w2, "cache-n5") == 0
    status = json.loads((w2 / "unet" / "sample-status.json").read_text())
    assert status["done_before"] == ["fp"] and status["done"] == ["cache-n5"]

    # a variant sampled under other settings is not silently reused
    assert _sample(ablation, w2, "cache-n5", "--seed", "1") == 1
    status = json.loads((w2 / "unet" / "sample-status.json").read_text())
    assert "other settings" in status["failed"]["fp"]
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32
    try:  # TF32 matmuls are another setting too
        assert _sample(ablation, w2, "cache-n5", "--matmul-tf32") == 1
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    status = json.loads((w2 / "unet" / "sample-status.json").read_text())
    assert "other settings" in status["failed"]["fp"] and status["environment"]["matmul_allow_tf32"] is True

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for p in [manifest.name] + m["parts"]:
        (damaged / p).write_bytes((parts / p).read_bytes())
    (damaged / m["parts"][0]).write_bytes(b"x" * 1000)
    with pytest.raises(SystemExit, match="SHA-1"):
        carry.import_variants(tmp_path / "s3", damaged)
    assert not (tmp_path / "s3" / "unet" / "fp" / "info.json").exists()  # a failed import leaves no 'done'
    (damaged / m["parts"][-1]).unlink()
    with pytest.raises(SystemExit, match="missing"):
        carry.import_variants(tmp_path / "s4", damaged)
    other = json.loads(manifest.read_text())
    other["samples_sha1"] = "0" * 40
    (damaged / manifest.name).write_text(json.dumps(other))
    (damaged / m["parts"][-1]).write_bytes((parts / m["parts"][-1]).read_bytes())
    with pytest.raises(SystemExit, match="different samples"):
        carry.import_variants(w2, damaged)
    with pytest.raises(SystemExit, match="no finished samples"):
        carry.export_variant(w2, "unet", "w8a8", parts)


def test_fp8_weight_scales_are_part_of_the_run_key_and_need_an_fp8_backend(ablation, tmp_path):
    """Per-tensor and per-channel FP8 weight scales give different samples: their run keys differ
    (so a resumed run never mixes them), and --fp8-gemm without an FP8 backend is refused before
    anything is sampled."""
    from harness.sampling import run_key

    table = ablation.TABLES["dit-ddim50"]
    variant = table.variant("w8a8")
    args = ablation.build_parser().parse_args(["sample", "--table", "dit-ddim50", "--work", str(tmp_path),
                                               "--num-samples", "16", "--backend", "fp8-emulated"])
    keys = {}
    for gemm in (None, "cublaslt", "triton"):
        args.fp8_gemm = gemm
        keys[gemm] = run_key(table, variant, args, 50, table.model)
    assert len({json.dumps(k, sort_keys=True) for k in keys.values()}) == 3
    assert "fp8_gemm" not in keys[None] and keys["triton"]["fp8_gemm"] == "triton"
    with pytest.raises(SystemExit, match="--fp8-gemm triton .* needs --backend fp8"):
        _sample(ablation, tmp_path / "work", "w8a8", "--fp8-gemm", "triton")
    assert not (tmp_path / "work").exists()


def test_a_config_field_at_its_later_added_default_leaves_run_keys_unchanged(ablation, tmp_path):
    """Adding a CacheQuantConfig field must not orphan samples made before it existed: while the
    field has the value every run had before (``harness.sampling.LATER_FIELDS``) it stays out of the
    run key, and a variant that sets it otherwise gets a key of its own. ``quant_io`` is such a field
    whose default changed with it: the default (first and last layers float) gets new keys, and
    ``--quant-io`` gives back the keys of the runs made before."""
    from harness.sampling import LATER_FIELDS, key_hash, run_key

    import cachequant as cq

    table = ablation.TABLES["mmdit-euler28"]

    def key(slug, *extra):
        args = ablation.build_parser().parse_args(["sample", "--table", "mmdit-euler28", "--work", str(tmp_path),
                                                   "--num-samples", "16", *extra])
        return run_key(table, table.variant(slug), args, 28, table.model)

    old, e4m3 = key("w8a8", "--quant-io"), key("w8a8-pe4m3", "--quant-io")
    defaults = cq.CacheQuantConfig().to_dict()
    assert all(defaults[k] == v for k, v in LATER_FIELDS.items() if k != "quant_io")
    assert not set(LATER_FIELDS) & set(old["config"])
    assert e4m3["config"]["attention_probs"] == "e4m3"
    assert {k: v for k, v in e4m3["config"].items() if k != "attention_probs"} == old["config"]
    assert key_hash(old) != key_hash(e4m3)
    new = key("w8a8")
    assert new["config"] == {**old["config"], "quant_io": False} and key_hash(new) != key_hash(old)
    assert "quant_io" not in key("cache-n3")["config"]  # nothing quantized: the key never changed


def test_quant_io_reaches_the_calibration_and_a_plan_of_the_other_convention_is_not_reused(ablation, tmp_path):
    """The run key leaves quant_io=True out (every run before the field had the first and last
    layers quantized), so the calibration must take its config from the variant, not from the key:
    --quant-io quantizes conv_in / conv_out, the default leaves them float. An interrupted attempt's
    plan is reused only if it was calibrated with the same quant_io."""
    import shutil

    import cachequant as cq

    io = {"conv_in", "conv_out"}
    names = {}
    for tag, extra in (("new", ()), ("io", ("--quant-io",))):
        assert _sample(ablation, tmp_path / tag, "w8a8", *extra) == 0
        plan = cq.load_plan(tmp_path / tag / "unet" / "w8a8" / "plan.cqplan")
        names[tag] = {layer.name for layer in plan.quant.layers}
        assert plan.config.quant_io is (tag == "io")
    assert io <= names["io"] and not io & names["new"]

    # an attempt interrupted after calibrating, whose record holds only the key's config (quant_io
    # left out) next to a plan with the first and last layers float: --quant-io must recalibrate
    vdir = tmp_path / "io" / "unet" / "w8a8"
    for f in ("info.json", "samples.npz"):
        (vdir / f).unlink()
    shutil.copy(tmp_path / "new" / "unet" / "w8a8" / "plan.cqplan", vdir / "plan.cqplan")
    rec = json.loads((vdir / "calibration.json").read_text())
    rec["config"].pop("quant_io")
    (vdir / "calibration.json").write_text(json.dumps(rec))
    assert _sample(ablation, tmp_path / "io", "w8a8", "--quant-io") == 0
    assert io <= {layer.name for layer in cq.load_plan(vdir / "plan.cqplan").quant.layers}


def test_other_weights_enter_the_run_key_and_a_tiny_model_refuses_them(ablation, tmp_path):
    """--weights samples the table's zoo model with other weights; their SHA-1 is in each variant's
    run key, so those samples are never taken for the shipped weights' (or shared with them)."""
    import cachequant as cq

    unet = cq.zoo.load_pipeline("cifar10-unet").unet
    unet.save_pretrained(tmp_path / "mine")

    def sample(work, *extra):
        return ablation.main(["sample", "--table", "unet", "--steps", "3", "--num-samples", "2", "--batch-size", "2",
                              "--device", "cpu", "--work", str(work), "--only", "fp", "--quiet", *extra])

    assert sample(tmp_path / "a", "--weights", str(tmp_path / "mine")) == 0
    assert sample(tmp_path / "b") == 0
    keys = [json.loads((tmp_path / w / "unet" / "fp" / "info.json").read_text())["run_key"] for w in "ab"]
    assert len(keys[0]["weights_sha1"]) == 40 and "weights_sha1" not in keys[1]
    with pytest.raises(SystemExit, match="--weights replaces a shipped model's weights"):
        _sample(ablation, tmp_path / "c", "w8a8", "--weights", str(tmp_path / "mine"))
