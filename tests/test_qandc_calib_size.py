"""benchmarks/qandc_calib_size.py: the helpers behind the follow-up figures in results/qandc/README.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    from conftest import load_benchmark

    yield load_benchmark("qandc_calib_size")
    sys.modules.pop("qandc_calib_size", None)


def test_ranges_are_compared_only_where_both_plans_observed(study, tmp_path):
    from safetensors.numpy import save_file

    plan = tmp_path / "p.cqplan"
    # act.<layer>: (parts, [scale, zero point], T); no selected calibration entry at position 2
    meta = {"diagnostics": {"calibration_selection": {"per_step": {"0": 3, "1": 2}}}}
    save_file({"act.a": np.array([[[0.5, 1.0, 7.0], [0.0, 0.0, 0.0]]], np.float32),
               "w.a": np.ones((2, 4), np.float32)}, str(plan), metadata={"cachequant": json.dumps(meta)})
    scales = study.act_scales(plan)
    assert list(scales) == ["act.a.0.scale"]  # weight scales left out
    assert np.isnan(scales["act.a.0.scale"][2])  # an unobserved step is no range
    ref = {"act.a.0.scale": np.array([1.0, 1.0, 1.0])}
    r = study.range_vs(scales, ref)
    assert r["range_ratio_median"] == pytest.approx(0.75) and r["range_narrower_20pct"] == pytest.approx(0.5)
    assert r["most_narrowed"] == ["act.a.0 (1 steps)"]


def test_coverage_vs_fid_of_the_committed_table(study, capsys):
    """The correlation results/qandc/README.md quotes comes from the committed table JSON."""
    assert study.main(["--table-json", str(ROOT / "results" / "qandc" / "dit-ddim50-n3.json")]) == 0
    out = capsys.readouterr().out
    assert "over 9 selections: 0.78 (p = 0.014)" in out
    assert "| `tap` | 1 | 6 | 68.01 |" in out and "`baseline`" not in out  # selections only


def test_runs_are_checked_before_sampling(study, tmp_path):
    with pytest.raises(SystemExit):
        study.main(["--work", str(tmp_path), "--runs", "256-tap"])
    with pytest.raises(KeyError):
        study.main(["--work", str(tmp_path), "--runs", "256:no-such-variant"])
