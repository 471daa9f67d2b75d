"""TAP and VC through the public API: options, plan contents, effect on the variance they target."""

import numpy as np
import pytest
import torch

import cachequant as cq
from conftest import run


def _variance_gap(pipe, plan_or_none, steps, seed=0):
    """Mean |var(accelerated output) / var(full-precision output) − 1| per step and channel, with every
    call fed the full-precision trajectory's input (cached steps reuse the model's own stored feature)."""
    model = pipe.transformer
    calls = []
    h = model.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    run(pipe, "dit", steps, seed=seed, n=4)
    h.remove()
    with torch.no_grad():
        ref = [model(*a, **k)[0][:, :4] for a, k in calls]
        cq.accelerate(pipe, plan_or_none)
        out = []
        for i, (a, k) in enumerate(calls):
            cq.set_step(pipe, i)
            out.append(model(*a, **k)[0][:, :4])
        cq.restore(pipe)
    gaps = [(o.var(dim=(0, 2, 3)) / r.var(dim=(0, 2, 3)) - 1).abs().mean().item() for o, r in zip(out, ref)]
    return float(np.mean(gaps[len(gaps) // 2:]))  # the later half of sampling, where VC matters


def test_tap_and_vc_options_end_to_end(make_pipe, tmp_path):
    pipe = make_pipe("dit", scheduler="ddpm")
    steps = 8
    base = dict(interval=2, schedule="uniform", weight_bits=4, act_bits=8, dec=False, calib_batch_size=4,
                dps_samples=4)
    plan_tap = cq.calibrate(pipe, cq.CacheQuantConfig(**base, calibration="tap", calib_select=24, tap_clusters=8),
                            num_inference_steps=steps, progress=False, class_labels=list(range(8)))
    sel = plan_tap.diagnostics["calibration_selection"]
    assert sel["method"] == "tap" and sel["pool"] == 8 * steps and sel["selected"] == 24
    assert len(sel["per_step"]) >= steps // 2  # spread over the trajectory, not bunched

    plan_vc = cq.calibrate(pipe, cq.CacheQuantConfig(**base, calibration="tap", calib_select=24, tap_clusters=8,
                                                     vc=True),
                           num_inference_steps=steps, progress=False, class_labels=list(range(8)))
    assert plan_vc.tensors["vc"].shape == (steps, 4)
    assert not torch.equal(plan_vc.tensors["vc"], torch.ones(steps, 4))
    plan_vc.save(tmp_path / "vc.cqplan")
    loaded = cq.load_plan(tmp_path / "vc.cqplan")
    cq.accelerate(pipe, loaded)
    out = run(pipe, "dit", steps)
    cq.restore(pipe)
    assert np.isfinite(out).all()
    # VC shrinks the variance mismatch it is fitted to remove, on the trajectories it was fitted on
    # (seed 0, labels 0-3: the first calibration batch; held-out behaviour is tested on synthetic drift)
    assert _variance_gap(pipe, plan_vc, steps) < _variance_gap(pipe, plan_tap, steps)


@pytest.mark.parametrize("method", ["random", "uniform-per-step", "kmeans"])
def test_other_selection_methods_calibrate(make_pipe, method):
    pipe = make_pipe("ddim")
    cfg = cq.CacheQuantConfig(interval=2, schedule="uniform", calibration=method, calib_select=10, tap_clusters=4,
                              calib_batch_size=4, dps_samples=2, dec=False)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=4, progress=False, num_samples=4)
    assert plan.diagnostics["calibration_selection"]["selected"] == 10
    cq.accelerate(pipe, plan)
    assert np.isfinite(run(pipe, "ddim", 4)).all()


def test_config_rejects_unknown_selection():
    with pytest.raises(ValueError, match="calibration must be one of trajectory, tap"):
        cq.CacheQuantConfig(calibration="spectral")


def test_closed_loop_vc_is_fitted_on_the_accelerated_models_own_trajectories(make_pipe):
    """``vc_fit="closed"``: the factors are Eq. s* on (x̂, x) where x̂ is the accelerated model's output
    along the trajectory it follows from the calibration noise and x the float model on the same
    inputs — recomputed here by hand from a plan without VC and compared."""
    from cachequant.correction.vc import VCStats

    pipe = make_pipe("dit", scheduler="ddim")
    steps, labels = 6, list(range(4))
    base = dict(interval=2, schedule="uniform", weight_bits=8, act_bits=8, dec=False, calib_batch_size=4,
                dps_samples=4, num_calib_samples=4)
    calib = dict(num_inference_steps=steps, progress=False, class_labels=labels)
    closed = cq.calibrate(pipe, cq.CacheQuantConfig(**base, vc=True, vc_fit="closed"), **calib)
    opened = cq.calibrate(pipe, cq.CacheQuantConfig(**base, vc=True), **calib)
    plain = cq.calibrate(pipe, cq.CacheQuantConfig(**base), **calib)
    assert closed.diagnostics["vc"]["fit"] == "closed" and opened.diagnostics["vc"]["fit"] == "open"

    model, calls = pipe.transformer, []
    cq.accelerate(pipe, plain, backend="fake")
    h = model.register_forward_hook(lambda m, a, k, o: calls.append((a, k, o[0].detach().clone())), with_kwargs=True)
    pipe(class_labels=labels, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
         output_type="np")
    h.remove()
    cq.restore(pipe)
    st = VCStats(steps, 4, gamma=10.0)
    with torch.no_grad():
        for t, (a, k, pred) in enumerate(calls):
            st.update(t, pred, model(*a, **k)[0])
    torch.testing.assert_close(closed.tensors["vc"], st.solve(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(closed.tensors["vc"], opened.tensors["vc"], rtol=0, atol=1e-6)  # other inputs


def test_closed_loop_vc_needs_vc():
    with pytest.raises(ValueError, match="set vc=True"):
        cq.CacheQuantConfig(vc_fit="closed")
    with pytest.raises(ValueError, match="vc_fit must be one of"):
        cq.CacheQuantConfig(vc=True, vc_fit="loop")
