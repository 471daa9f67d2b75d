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
