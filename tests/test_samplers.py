"""Step indexing follows the sampler whatever the scheduler calls: one position per model call."""

import numpy as np
import pytest

import cachequant as cq
from cachequant.session import session_of
from conftest import run

STEPS = 6


@pytest.mark.parametrize("sched", ["ddim", "ddpm", "pndm", "dpm", "euler"])
def test_every_sampler_indexes_model_calls(sched, make_pipe):
    pipe = make_pipe("dit", scheduler=sched)
    cfg = cq.CacheQuantConfig(interval=2, schedule="uniform", weight_bits=8, act_bits=8, dec=True,
                              calib_batch_size=2, dps_samples=2)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=STEPS, progress=False, class_labels=[0, 1])
    calls = STEPS + 1 if sched == "pndm" else STEPS  # PLMS without PRK makes one extra model call
    assert plan.num_calls == calls
    assert list(plan.sampler.timesteps) == [float(t) for t in _timesteps(pipe, STEPS)]
    cq.accelerate(pipe, plan)
    model = pipe.transformer
    clock = session_of(model).clock
    seen, deep = [], []
    model.register_forward_pre_hook(lambda *a: seen.append(clock.position))
    model.transformer_blocks[1].norm1.register_forward_hook(lambda *a: deep.append(clock.position))
    for _ in range(2):
        seen.clear(), deep.clear()
        out = run(pipe, "dit", STEPS)
        assert seen == list(range(calls))
        assert deep == plan.schedule  # the cached span ran on full steps only
        assert np.isfinite(out).all()


def _timesteps(pipe, steps):
    import copy

    s = copy.deepcopy(pipe.scheduler)
    s.set_timesteps(steps)
    return s.timesteps


def test_sd_pndm_with_cfg_cache_and_quant(make_pipe):
    pipe = make_pipe("sd")  # PNDM (PLMS), classifier-free guidance: cond + uncond cached together
    ref = run(pipe, "sd", STEPS)
    cfg = cq.CacheQuantConfig(interval=3, schedule="dps", weight_bits=8, act_bits=8, dec=True,
                              calib_batch_size=2, dps_samples=2)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=STEPS, progress=False, prompts=["a cat", "a boat"])
    assert plan.num_calls == STEPS + 1 and len(plan.schedule) == 3
    cq.accelerate(pipe, plan)
    out = run(pipe, "sd", STEPS)
    assert out.shape == ref.shape and np.isfinite(out).all()
    store = session_of(pipe.unet).store
    assert store.feature(store_key(pipe)).shape[0] == 4  # 2 prompts x (cond, uncond)


def store_key(pipe):
    from cachequant.models.adapters import adapter_for

    plan_site = adapter_for(pipe.unet).resolve_site(pipe.unet, cq.CacheQuantConfig())
    return adapter_for(pipe.unet).layout(pipe.unet, plan_site).feature_key
