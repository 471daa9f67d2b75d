"""benchmarks/calib_seeds.py: the per-seed rows become paired means and spreads; bad arguments are
refused before any sampling."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(scope="module")
def script():
    from conftest import load_benchmark

    yield load_benchmark("calib_seeds")
    sys.modules.pop("calib_seeds", None)


def _row(variant, seed, psnr, entries=32):
    return {"variant": variant, "label": variant.upper(), "seed": seed, "psnr_vs_fp": psnr, "ssim_vs_fp": 0.9,
            "calibration_seconds": 10.0, "entries_min": entries, "entries_low": 0}


def test_summary_pairs_differences_by_calibration_seed(script):
    rows = [_row("all", 0, 26.0), _row("all", 1, 27.0), _row("all", 2, 25.0),
            _row("tap", 0, 25.0), _row("tap", 1, 26.0), _row("tap", 2, 24.0, entries=5)]
    (base, tap), = [script.summarise(rows, ["all", "tap"], "all")]
    assert base["psnr_mean"] == pytest.approx(26.0) and base["psnr_std"] == pytest.approx(1.0)
    assert "delta_psnr_mean" not in base
    # the seeds move both variants together: the paired difference has no spread at all
    assert tap["delta_psnr_mean"] == pytest.approx(-1.0) and tap["delta_psnr_std"] == pytest.approx(0.0)
    assert tap["entries_min"] == 5 and tap["seeds"] == [0, 1, 2]
    (d,) = script.paired(rows, [("tap", "all"), ("tap", "missing")])
    assert d["delta_psnr"] == [-1.0, -1.0, -1.0] and d["std"] == 0.0
    lines = script.markdown([base, tap], "all")
    assert lines[-1].startswith("| TAP (`tap`) | 25.00 ± 1.00 | 25.00 / 26.00 / 24.00 |")
    assert lines[-1].endswith("| -1.00 ± 0.00 |") and lines[-2].endswith("| – |")


def test_bad_arguments_fail_before_sampling(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--table", "qandc-fair", "--work", str(tmp_path), "--only", "all,tap-999"])
    assert "no variant 'tap-999'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--table", "qandc-fair", "--work", str(tmp_path), "--calib-seeds", "0", "0"])
    with pytest.raises(SystemExit):
        script.main(["--table", "qandc-fair", "--work", str(tmp_path), "--pairs", "tap-256/uniform-256"])
    assert "--pairs entries look like" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_plans_are_reused_across_backends_without_overwriting(script, tmp_path):
    """--plans-from copies a variant's plan and calibration record where the new work folder has
    none (the plan does not depend on the backend), never over one it has, and skips incomplete ones."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for slug, files in (("w8a8", ("plan.cqplan", "calibration.json")), ("half", ("plan.cqplan",)),
                        ("mine", ("plan.cqplan", "calibration.json"))):
        (src / slug).mkdir(parents=True)
        for f in files:
            (src / slug / f).write_text(f"{slug}/{f}")
    (dst / "mine").mkdir(parents=True)
    (dst / "mine" / "plan.cqplan").write_text("kept")
    assert script.reuse_plans(src, dst, ["w8a8", "half", "mine", "absent"]) == ["w8a8"]
    assert (dst / "w8a8" / "plan.cqplan").read_text() == "w8a8/plan.cqplan"
    assert (dst / "w8a8" / "calibration.json").read_text() == "w8a8/calibration.json"
    assert not (dst / "half").exists() and (dst / "mine" / "plan.cqplan").read_text() == "kept"


def _stand_in_inception(path):
    """A TorchScript stand-in for the FID Inception network (same input, 16 features): the FID
    bookkeeping is under test, not the features."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3 * 16, 16)

        def forward(self, x):
            return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)) * 10

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Net().eval()), str(path))


def test_fid_over_calibration_seeds_samples_fp_once(script, tmp_path, monkeypatch, capsys):
    """With --ref-stats each (variant, seed) gets its FID from the sampler's metrics; full precision is
    sampled in the first seed's folder only (the others hard-link it), and the summary's FID − FID_fp
    is each seed's FID minus that one fp FID."""
    import json

    import numpy as np

    from cachequant.metrics.fid import save_reference

    net, ref = tmp_path / "inception.pt", tmp_path / "ref.npz"
    _stand_in_inception(net)
    monkeypatch.setenv("CACHEQUANT_INCEPTION", str(net))
    save_reference(ref, np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32) * 3, source="synthetic")
    work, out = tmp_path / "w", tmp_path / "seeds.json"
    code = script.main(["--table", "unet", "--model", "tiny-ddim", "--steps", "6", "--num-samples", "4",
                        "--batch-size", "2", "--calib-seeds", "0", "1", "--only", "naive-n10,w8a8,cache-n5",
                        "--device", "cpu",
                        "--ref-stats", str(ref), "--versus", "naive-n10", "--work", str(work), "--out", str(out)])
    assert code == 0
    fp0, fp1 = work / "seed0" / "unet" / "fp", work / "seed1" / "unet" / "fp"
    assert (fp0 / "samples.npz").stat().st_ino == (fp1 / "samples.npz").stat().st_ino
    data = json.loads(out.read_text())
    fp_fid = data["fp_fid"]
    assert fp_fid == json.loads((fp0 / "metrics.json").read_text())["fid"]
    assert {(r["variant"], r["seed"]) for r in data["rows"]} == \
        {(v, s) for v in ("naive-n10", "w8a8", "cache-n5") for s in (0, 1)}
    # cache only on the uniform schedule calibrates nothing seed-dependent: sampled with seed 0 only
    assert not (work / "seed1" / "unet" / "cache-n5").exists()
    cache = [r for r in data["rows"] if r["variant"] == "cache-n5"]
    assert cache[0]["fid"] == cache[1]["fid"] and cache[1]["same_as_seed"] == 0
    assert next(s for s in data["summary"] if s["variant"] == "cache-n5")["calibration_free"]
    for r in data["rows"]:
        if r.get("same_as_seed") is not None:
            r = dict(r, seed=r["same_as_seed"])
        m = json.loads((work / f"seed{r['seed']}" / "unet" / r["variant"] / "metrics.json").read_text())
        assert r["fid"] == m["fid"] and r["dfid_fp"] == pytest.approx(m["fid"] - fp_fid)
        assert r["dfid_fp_boot_std"] >= 0
    w8 = next(s for s in data["summary"] if s["variant"] == "w8a8")
    fids = [r["fid"] for r in data["rows"] if r["variant"] == "w8a8"]
    assert w8["fid_mean"] == pytest.approx(np.mean(fids)) and w8["fid_std"] == pytest.approx(np.std(fids, ddof=1))
    assert w8["dfid_fp_mean"] == pytest.approx(np.mean(fids) - fp_fid) and "delta_fid_mean" in w8
    printed = capsys.readouterr().out
    assert f"Full precision: FID {fp_fid:.2f}." in printed and f"{w8['fid_mean']:.2f} ± {w8['fid_std']:.2f}" in printed


def test_fid_arguments_are_checked_before_sampling(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--table", "unet", "--work", str(tmp_path), "--ref-stats", str(tmp_path / "none.npz")])
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--table", "unet", "--work", str(tmp_path), "--num-samples", "4", "--batch-size", "8"])
    assert "images per call" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_only_the_cache_only_rows_are_calibration_free(script):
    from harness.tables import TABLES

    free = {v.slug for v in TABLES["unet"].variants if script.calibration_free(v.config)}
    assert free == {"cache-n5", "cache-n10", "cache-n20"}
    assert not script.calibration_free(None)  # full precision is shared by share_fp, not repeated


def test_tf32_is_recorded_as_the_sampling_ran(script, tmp_path):
    """--matmul-tf32 switches TF32 on in the ablation.py processes that sample; the summary's
    environment must say so, although this process never switches it on itself."""
    import json

    import torch

    out = tmp_path / "seeds.json"
    assert not torch.backends.cuda.matmul.allow_tf32
    code = script.main(["--table", "unet", "--model", "tiny-ddim", "--steps", "6", "--num-samples", "2",
                        "--calib-seeds", "0", "--only", "cache-n5", "--device", "cpu", "--matmul-tf32",
                        "--work", str(tmp_path / "w"), "--out", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["environment"]["matmul_allow_tf32"] is True
    info = json.loads((tmp_path / "w" / "seed0" / "unet" / "cache-n5" / "info.json").read_text())
    assert info["run_key"]["matmul_tf32"] is True
