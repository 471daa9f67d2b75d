"""Calibration-sample selection: TAP covers every cluster and every step range."""

import numpy as np
import pytest

from cachequant.calibration.select import METHODS, select, tap_select


def _pool(seed=0, steps=20, per_step=40):
    """A pool shaped like cached trajectories: 4 well-separated data modes x 20 steps."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, 16)) * 10
    feats, ts, modes = [], [], []
    for t in range(steps):
        for i in range(per_step):
            m = i % 4
            feats.append(centers[m] + rng.normal(size=16) + 0.05 * t)
            ts.append(t)
            modes.append(m)
    return np.array(feats), np.array(ts), np.array(modes)


def test_tap_picks_from_every_cluster_and_every_step_range():
    feats, ts, modes = _pool()
    idx, groups = tap_select(feats, ts, 80, lam=0.5, num_subsamples=3, fraction=1 / 5, clusters=24, seed=0,
                             return_clusters=True)
    assert len(idx) == 80 and len(set(idx)) == 80
    # every cluster found by any parallel subsample contributes
    assert all(np.intersect1d(g, idx).size > 0 for g in groups)
    # every data mode and every quarter of the trajectory is represented
    assert set(modes[idx]) == {0, 1, 2, 3}
    assert set(ts[idx] // 5) == {0, 1, 2, 3}


def test_tap_is_deterministic_and_lambda_matters():
    feats, ts, _ = _pool(1)
    a = tap_select(feats, ts, 40, lam=0.5, fraction=1 / 5, clusters=12, seed=3)
    assert np.array_equal(a, tap_select(feats, ts, 40, lam=0.5, fraction=1 / 5, clusters=12, seed=3))
    _, g_time = tap_select(feats, ts, 40, lam=0.0, fraction=1 / 5, clusters=12, seed=3, return_clusters=True)
    # lambda = 0: clusters are pure time bands (each spans few steps)
    assert max(np.ptp(ts[g]) for g in g_time if len(g)) <= 10


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_distinct_valid_indices(method):
    feats, ts, _ = _pool(2, steps=10, per_step=20)
    idx = select(method, feats, ts, 30, clusters=10, seed=0)
    assert len(idx) == 30 and len(set(idx)) == 30 and idx.min() >= 0 and idx.max() < len(feats)
    if method in ("uniform-per-step", "tap-per-step"):
        assert np.bincount(ts[idx]).tolist() == [3] * 10


def test_tap_per_step_covers_every_step_and_every_mode_within_it():
    """TAP stratified by step: the same quota from every step, and inside a step one pick per
    spectral cluster — with 4 data modes per step and 4 picks per step, every mode at every step,
    which an equal random draw per step does not achieve."""
    feats, ts, modes = _pool(5, steps=10, per_step=20)
    for seed in range(3):
        idx = select("tap-per-step", feats, ts, 40, seed=seed)
        assert np.bincount(ts[idx]).tolist() == [4] * 10
        assert all(set(modes[idx][ts[idx] == s]) == {0, 1, 2, 3} for s in range(10))
    flat = [select("uniform-per-step", feats, ts, 40, seed=seed) for seed in range(3)]
    assert not all(all(set(modes[i][ts[i] == s]) == {0, 1, 2, 3} for s in range(10)) for i in flat)
    info: dict = {}
    a = select("tap-per-step", feats, ts, 25, seed=1, info=info)
    assert np.array_equal(a, select("tap-per-step", feats, ts, 25, seed=1))  # deterministic
    assert sorted(np.bincount(ts[a]).tolist()) == [2] * 5 + [3] * 5 and info == {"clusters": 25}


def test_bad_inputs():
    feats, ts, _ = _pool(3, steps=2, per_step=4)
    with pytest.raises(ValueError, match="must be one of"):
        select("spectral", feats, ts, 2)
    with pytest.raises(ValueError, match="lambda must be in"):
        tap_select(feats, ts, 2, lam=1.5)


def test_tap_clusters_decide_when_the_pool_is_small_next_to_the_selection():
    """The ablation's proportions (1,600 pool entries, 256 to select, fraction 1/20): the parallel
    subsamples must hold more than the selection, so the clustering (and λ) choose the samples
    instead of a random top-up."""
    feats, ts, _ = _pool(4, steps=40, per_step=40)
    idx, groups = tap_select(feats, ts, 256, lam=0.5, seed=0, return_clusters=True)
    candidates = np.unique(np.concatenate(groups))
    assert len(candidates) >= 2 * 256 * 0.8  # random subsamples overlap a little
    assert np.isin(idx, candidates).all()  # nothing topped up at random
    lo, hi = (set(tap_select(feats, ts, 256, lam=lam, seed=0)) for lam in (0.1, 0.9))
    assert len(lo ^ hi) > 0.2 * 256  # λ changes the selection
    info: dict = {}
    assert np.array_equal(select("tap", feats, ts, 256, seed=0, info=info), idx)  # what calibration records
    assert info == {"clusters": len(groups), "candidates": len(candidates), "random_top_up": 0}
    info = {}
    select("kmeans", feats, ts, 256, seed=0, clusters=50, info=info)
    assert info == {"clusters": 50}


def test_selection_report_script(tmp_path):
    """benchmarks/selection_report.py on the tiny DiT: the diagnostics a calibration records."""
    import json

    from conftest import load_benchmark

    mod = load_benchmark("selection_report")
    out = tmp_path / "sel.json"
    assert mod.main(["--model", "tiny-dit", "--steps", "6", "--calib-samples", "4", "--calib-select", "8",
                     "--settings", "tap:0.3", "kmeans", "--out", str(out)]) == 0
    rows = {r["setting"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["tap:0.3"]["random_top_up"] == 0 and rows["tap:0.3"]["candidates"] >= 8
    assert rows["kmeans"]["clusters"] >= 2 and len(rows["kmeans"]["selected_entries"]) == 8
