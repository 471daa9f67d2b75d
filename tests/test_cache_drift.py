"""The relative reuse error (``correction.relative_reuse_error``) is the DPS cost of the schedule,
normalized; benchmarks/cache_drift.py fits DPS / cache-DEC on one seed and measures on another."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def drift():
    from conftest import load_benchmark

    yield load_benchmark("cache_drift")
    sys.modules.pop("cache_drift", None)


def _feats(seed: int, T: int = 11):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    # a drifting feature with a per-channel scale / shift change each step, plus noise
    return [base * (1 + 0.1 * t) + 0.05 * t + 0.02 * torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
            for t in range(T)]


def test_reuse_error_is_normalized_schedule_cost():
    from cachequant.cache.schedules import make_schedule, schedule_cost
    from cachequant.correction import relative_reuse_error

    feats = _feats(0)
    for n in (2, 3, 5):
        sched = make_schedule("uniform", len(feats), n)
        den = sum(float(x.abs().sum()) for t, x in enumerate(feats) if t not in set(sched))
        got = relative_reuse_error(feats, sched)
        assert got["relative_l1"] == pytest.approx(schedule_cost(feats, sched) / den, rel=1e-9)
        assert len(got["relative_l1_by_fifth"]) == 5
        cached = [t for t in range(len(feats)) if t not in set(sched)]
        per_step = [float((feats[t] - feats[max(s for s in sched if s < t)]).abs().mean()) for t in cached]
        assert got["mean_l1"] == pytest.approx(sum(per_step) / len(per_step), rel=1e-9)
        assert got["cached_steps"] == len(cached)
    # a feature that never changes is reused without error
    assert relative_reuse_error([feats[0]] * 7, [0, 3, 6])["relative_l1"] == 0.0
    with pytest.raises(ValueError, match="step 0"):
        relative_reuse_error(feats, [1, 4])


def test_rows_dps_and_cache_dec_reduce_error(drift):
    fit, held_out = _feats(1), _feats(2)
    rows = drift.interval_rows(fit, held_out, 3, channel_dim=1)
    assert set(rows) == {"uniform", "uniform+cache-dec", "dps", "dps+cache-dec", "dps+shift-dec"}
    # the affine drift is what cache-DEC models: it removes most of the error on held-out data
    assert rows["uniform+cache-dec"]["relative_l1"] < 0.5 * rows["uniform"]["relative_l1"]
    assert rows["dps+cache-dec"]["relative_l1"] < 0.5 * rows["dps"]["relative_l1"]
    # same number of full steps for both schedules: K = ceil(11 / 3)
    assert rows["dps"]["full_steps"] == rows["uniform"]["full_steps"] == 4


def test_bad_runs_are_refused(drift):
    for bad in ("ddpm", "ddpm:1", "euler:50", "ddim:x"):
        with pytest.raises(SystemExit, match="SCHEDULER:STEPS"):
            drift.parse_runs(bad)
    assert drift.parse_runs("ddpm:250, ddim:50") == [("ddpm", 250), ("ddim", 50)]


def test_tiny_dit_run_writes_json_and_is_deterministic(drift, tmp_path):
    out = tmp_path / "drift.json"
    data = drift.main(["--model", "tiny-dit", "--runs", "ddim:6,ddpm:6", "--num-samples", "2",
                       "--intervals", "2,3", "--out", str(out)])
    assert json.loads(out.read_text()) == data
    assert [r["model_calls"] for r in data["runs"]] == [6, 6]
    again = drift.main(["--model", "tiny-dit", "--runs", "ddim:6", "--num-samples", "2", "--intervals", "2,3"])
    assert again["runs"][0]["intervals"] == data["runs"][0]["intervals"]



def test_other_weights_are_loaded_and_recorded(drift):
    """--weights measures a zoo model with other weights (here the first shipped DiT, which the
    committed drift results used) and the JSON names them unless they are the first shipped; a
    model outside the zoo refuses the option."""
    from cachequant.cli.common import UsageError

    first = Path(__file__).parents[1] / "results" / "training" / "weights" / "cifar10-dit-1.6M"
    common = ["--model", "cifar10-dit", "--runs", "ddim:4", "--num-samples", "1", "--intervals", "2"]
    old, new = drift.main([*common, "--weights", str(first)]), drift.main(common)
    assert "weights_sha1" not in old and len(new["weights_sha1"]) == 40
    assert old["runs"][0]["intervals"] != new["runs"][0]["intervals"]
    with pytest.raises(UsageError, match="--weights replaces a shipped model's weights"):
        drift.main(["--model", "tiny-dit", "--weights", str(first), "--runs", "ddim:4"])

def test_spread_ratio_is_the_correlation_after_cache_dec():
    """Y = X_s + independent noise: the least-squares cache-DEC slope regresses X_t on X_s, so the
    corrected reused feature keeps the fraction ρ = σ_s / sqrt(σ_s² + σ_n²) of the fresh spread."""
    from cachequant.correction import fit_cache_dec, reuse_spread_ratio

    g = torch.Generator().manual_seed(3)
    sigma_n = 0.75
    base = torch.randn(64, 4, 16, 16, generator=g, dtype=torch.float64)
    feats = [base] + [base + sigma_n * torch.randn(base.shape, generator=g, dtype=torch.float64) for _ in range(3)]
    sched = [0]
    dec = fit_cache_dec(feats, sched, channel_dim=1)
    rho = 1 / (1 + sigma_n ** 2) ** 0.5
    got = reuse_spread_ratio(feats, sched, dec, channel_dim=1)
    assert got["spread_ratio"] == pytest.approx(rho, rel=0.02)
    # a shift-only cache-DEC (slope 1) cannot change the reused feature's spread
    shift = fit_cache_dec(feats, sched, channel_dim=1, slope=False)
    assert reuse_spread_ratio(feats, sched, shift, channel_dim=1)["spread_ratio"] == pytest.approx(
        reuse_spread_ratio(feats, sched, channel_dim=1)["spread_ratio"], rel=1e-12)
    # without the correction the reused feature keeps its own spread, which is smaller than the
    # fresh one's by the same factor here
    assert reuse_spread_ratio(feats, sched, channel_dim=1)["spread_ratio"] == pytest.approx(rho, rel=0.02)
    # a purely affine drift is undone exactly: full spread kept
    affine = [base * (1 + 0.5 * t) + t for t in range(4)]
    dec = fit_cache_dec(affine, sched, channel_dim=1)
    assert reuse_spread_ratio(affine, sched, dec, channel_dim=1)["spread_ratio"] == pytest.approx(1.0, rel=1e-9)
    assert reuse_spread_ratio(affine, sched, channel_dim=1)["spread_ratio"] < 0.6
    with pytest.raises(ValueError, match="step 0"):
        reuse_spread_ratio(feats, [1])
