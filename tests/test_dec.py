"""Both halves of DEC reduce the error they target, measured independently of the fit code."""

import pytest
import torch

import cachequant as cq
from cachequant.models.adapters import adapter_for
from cachequant.quant.layer import quant_hooks
from cachequant.runtime.sampler import probe_timesteps
from cachequant.session import Session
from conftest import run


def _features(pipe, steps, n=4):
    """The cached feature at every step of an uncached full-precision run."""
    model = pipe.unet
    adapter = adapter_for(model)
    layout = adapter.layout(model, adapter.resolve_site(model, cq.CacheQuantConfig()))
    sess = Session.open(model, probe_timesteps(pipe.scheduler, steps), None, 0, type(pipe.scheduler).__name__, steps)
    sess.add_cache(layout)
    sess.attach_scheduler(pipe.scheduler)
    feats = []
    model.register_forward_hook(lambda *a: feats.append(sess.store.feature(layout.feature_key).clone()))
    run(pipe, "ddim", steps=steps, seed=7, n=n)
    sess.restore()
    return feats


def test_cache_dec_reduces_cached_feature_error(make_pipe):
    pipe = make_pipe("ddim")
    steps = 12
    cfg = cq.CacheQuantConfig(interval=4, schedule="uniform", weight_bits=None, act_bits=None, dec=True,
                              dps_samples=4)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=steps, progress=False, num_samples=4)
    a, b = plan.tensors["cache_dec"]
    full = set(plan.schedule)
    # the plan records how stale the reused feature is on its calibration trajectories, and DEC shrinks it
    reuse = plan.diagnostics["cache_reuse"]
    assert 0 < reuse["relative_l1_after_cache_dec"] < reuse["relative_l1"]
    assert torch.equal(a[sorted(full)], torch.ones(len(full), a.shape[1]))
    # held-out trajectories (other seed): error of the reused feature vs the fresh one
    feats = _features(pipe, steps)
    before = after = 0.0
    anchor = 0
    for t, x in enumerate(feats):
        if t in full:
            anchor = t
            continue
        c = feats[anchor]
        before += float((x - c).abs().mean())
        after += float((x - (a[t].view(1, -1, 1, 1) * c + b[t].view(1, -1, 1, 1))).abs().mean())
    assert after < 0.9 * before, (before, after)


def test_shift_only_cache_dec(make_pipe):
    """cache_dec_slope=False: slope 1 everywhere, the least-squares shift per step and channel, and
    still less held-out error than no correction (the tiny model's cached feature drifts in mean)."""
    from cachequant.correction import fit_cache_dec

    pipe = make_pipe("ddim")
    steps = 12
    cfg = cq.CacheQuantConfig(interval=4, schedule="uniform", weight_bits=None, act_bits=None, dec=True,
                              cache_dec_slope=False, dps_samples=4)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=steps, progress=False, num_samples=4)
    a, b = plan.tensors["cache_dec"]
    assert torch.equal(a, torch.ones_like(a)) and b.abs().sum() > 0
    feats = _features(pipe, steps)
    full = sorted(set(plan.schedule))
    a2, b2 = fit_cache_dec(feats, full, channel_dim=1, slope=False)
    anchor = 0
    for t, x in enumerate(feats):
        if t in full:
            anchor = t
            continue
        # the shift is the difference of the per-channel means, so the corrected feature has the fresh mean
        assert torch.allclose(b2[t].double(), (x - feats[anchor]).double().mean(dim=(0, 2, 3)), atol=1e-5)
    reuse = plan.diagnostics["cache_reuse"]
    assert 0 < reuse["relative_l1_after_cache_dec"] < reuse["relative_l1"]
    with pytest.raises(ValueError, match="cache_dec_slope"):
        cq.CacheQuantConfig(cache_dec_slope="no")


def test_quant_dec_reduces_consumer_output_error(make_pipe):
    """Output error of the first layer consuming the cached feature, with and without quant DEC."""
    errs = {}
    for quant_dec in (False, True):
        pipe = make_pipe("ddim")
        cfg = cq.CacheQuantConfig(interval=3, schedule="uniform", weight_bits=4, act_bits=8, cache_dec=True,
                                  quant_dec=quant_dec, calib_batch_size=4, dps_samples=4)
        plan = cq.calibrate(pipe, cfg, num_inference_steps=9, progress=False, num_samples=8)
        cq.accelerate(pipe, plan)
        name = "up_blocks.2.resnets.0.conv1"
        layer = pipe.unet.get_submodule(name)
        assert quant_hooks(pipe.unet)[name][1].has_dec == quant_dec
        acc = []

        def hook(mod, inp, out):
            acc.append(float(((out - mod._conv_forward(inp[0], mod.weight, mod.bias)) ** 2).mean()))

        layer.register_forward_hook(hook)
        run(pipe, "ddim", steps=9, seed=10_000, n=4)  # the calibration trajectories' seed
        errs[quant_dec] = sum(acc) / len(acc)
    assert errs[True] < errs[False], errs


@pytest.mark.parametrize("bits", [None, 8], ids=["cache-only", "w8a8"])
def test_closed_loop_cache_dec_fits_the_accelerated_trajectory_better(make_pipe, bits):
    """cache_dec_fit='closed' refits Eq. 8 on the trajectories the cached (and quantized) model
    follows. On those trajectories its least-squares coefficients leave a smaller squared error than
    the open-loop ones fitted on the float trajectories; full steps keep (1, 0); the rest of the
    plan (schedule, ranges) is the open-loop plan's."""
    pipe = make_pipe("ddim")
    kw = dict(interval=3, schedule="uniform", weight_bits=bits, act_bits=bits, dec=True, dps_samples=4,
              num_calib_samples=4, calib_batch_size=2)
    opened = cq.calibrate(pipe, cq.CacheQuantConfig(**kw), 9, progress=False)
    closed = cq.calibrate(pipe, cq.CacheQuantConfig(cache_dec_fit="closed", **kw), 9, progress=False)
    assert list(closed.schedule) == list(opened.schedule)
    diag = closed.diagnostics["cache_dec_closed_loop"]
    assert diag["mean_squared_closed_loop_dec"] <= diag["mean_squared_open_loop_dec"] * (1 + 1e-9)
    assert diag["mean_squared_closed_loop_dec"] < diag["mean_squared"]
    a = closed.tensors["cache_dec"][0]
    full = sorted(closed.schedule)
    assert torch.equal(a[full], torch.ones(len(full), a.shape[1]))
    assert not torch.equal(closed.tensors["cache_dec"], opened.tensors["cache_dec"])
    if bits:
        assert all(torch.equal(opened.tensors[k], closed.tensors[k]) for k in opened.tensors if k.startswith("act."))
    cq.accelerate(pipe, closed)
    out = run(pipe, "ddim", 9, n=2)
    cq.restore(pipe)
    assert out.shape == run(pipe, "ddim", 9, n=2).shape and bool((out == out).all())


def test_cache_dec_fit_is_checked():
    with pytest.raises(ValueError, match="cache_dec_fit must be one of open, closed"):
        cq.CacheQuantConfig(cache_dec_fit="loop")


def test_quantization_aware_dps_minimises_the_quantized_reuse_error(make_pipe, tmp_path):
    """dps_cost='quant': the schedule is chosen on the quantized model's features (teacher-forced
    on the float trajectories); its quantization-aware cost is no larger than that of the float-cost
    DPS schedule (the DP's optimum), it has the same number of full steps, and the plan runs."""
    pipe = make_pipe("ddim")
    kw = dict(interval=3, schedule="dps", weight_bits=8, act_bits=8, dec=True, dps_samples=4, num_calib_samples=4,
              calib_batch_size=2)
    plain = cq.calibrate(pipe, cq.CacheQuantConfig(**kw), 9, progress=False)
    plan = cq.calibrate(pipe, cq.CacheQuantConfig(dps_cost="quant", **kw), 9, progress=False)
    diag = plan.diagnostics["dps_quant"]
    assert diag["schedule_float_cost"] == list(plain.schedule)  # the paper's schedule, for the record
    assert diag["cost_quant"] <= diag["cost_quant_of_float_schedule"] * (1 + 1e-9)
    assert len(plan.schedule) == len(plain.schedule) == 3 and plan.schedule[0] == 0
    assert plan.config.dps_cost == "quant"
    assert cq.load_plan(plan.save(tmp_path / "q.cqplan")).config.dps_cost == "quant"
    cq.accelerate(pipe, plan)
    out = run(pipe, "ddim", 9, n=2)
    cq.restore(pipe)
    assert bool(torch.isfinite(torch.as_tensor(out)).all())


def test_quantization_aware_dps_needs_dps_cache_and_quantization():
    for bad in (dict(schedule="uniform"), dict(weight_bits=None, act_bits=None), dict(interval=1)):
        with pytest.raises(ValueError, match="dps_cost='quant' needs"):
            cq.CacheQuantConfig(dps_cost="quant", **bad)
    with pytest.raises(ValueError, match="dps_cost must be one of float, quant"):
        cq.CacheQuantConfig(dps_cost="l2")
