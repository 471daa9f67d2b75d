"""interval = 1 without quantization must be a no-op; restore must give the model back exactly."""

import numpy as np
import pytest
import torch

import cachequant as cq
from conftest import calib_kwargs, run

KINDS = ["ddim", "sd", "dit"]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_same_model(model, snap):
    state, types = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert [type(m) for m in model.modules()] == types
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("kind", KINDS)
def test_interval1_no_quant_is_identical(kind, make_pipe):
    pipe = make_pipe(kind)
    ref = run(pipe, kind, steps=5)
    cfg = cq.CacheQuantConfig(interval=1, schedule="uniform", weight_bits=None, act_bits=None)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=5, progress=False, **calib_kwargs(kind, 2))
    assert plan.schedule == list(range(5 if kind != "sd" else 6))  # PNDM (SD's default) calls the model T+1 times
    cq.accelerate(pipe, plan)
    out = run(pipe, kind, steps=5)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_restore_is_exact_after_cache_and_quant(kind, make_pipe):
    pipe = make_pipe(kind)
    model = pipe.unet if kind != "dit" else pipe.transformer
    snap = _snapshot(model)
    ref = run(pipe, kind, steps=4)
    cfg = cq.CacheQuantConfig(interval=2, schedule="uniform", weight_bits=8, act_bits=8, dec=True,
                              calib_batch_size=2)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=4, progress=False, **calib_kwargs(kind, 2))
    _assert_same_model(model, snap)  # calibration leaves nothing behind
    cq.accelerate(pipe, plan)
    out = run(pipe, kind, steps=4)
    assert np.isfinite(out).all()
    assert not np.array_equal(out, ref)  # it really did something
    cq.restore(pipe)
    _assert_same_model(model, snap)
    np.testing.assert_array_equal(run(pipe, kind, steps=4), ref)
    assert "set_timesteps" not in pipe.scheduler.__dict__


def test_cache_skips_deep_blocks_on_cached_steps(make_pipe):
    pipe = make_pipe("ddim")
    cfg = cq.CacheQuantConfig(interval=3, schedule="uniform", weight_bits=None, act_bits=None, dec=False)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=10, progress=False, num_samples=2)
    assert plan.schedule == [0, 3, 6, 9]
    calls = {"mid": 0, "first_up": 0, "last_up": 0}
    # the blocks' own forwards still run (they drive the model); their layers' arithmetic is skipped
    pipe.unet.mid_block.resnets[0].conv1.register_forward_hook(lambda *a: calls.__setitem__("mid", calls["mid"] + 1))
    pipe.unet.up_blocks[0].resnets[0].conv1.register_forward_hook(
        lambda *a: calls.__setitem__("first_up", calls["first_up"] + 1))
    pipe.unet.up_blocks[-1].resnets[-1].conv1.register_forward_hook(
        lambda *a: calls.__setitem__("last_up", calls["last_up"] + 1))
    cq.accelerate(pipe, plan)
    run(pipe, "ddim", steps=10)
    assert calls == {"mid": 4, "first_up": 4, "last_up": 10}
    run(pipe, "ddim", steps=10)  # the counter resets at every pipeline call
    assert calls == {"mid": 8, "first_up": 8, "last_up": 20}


def test_unsupported_model_names_supported_classes():
    class Pipe:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="does not support Linear. Supported denoisers: ") as e:
        cq.calibrate(Pipe(), cq.CacheQuantConfig(), num_inference_steps=5)
    for cls in ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel"):
        assert cls in str(e.value)
