"""Plan files: round trip, and every kind of misuse fails with a clear message."""

import json

import numpy as np
import pytest
import torch

import cachequant as cq
from cachequant.models.tiny import make_scheduler
from conftest import run


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from cachequant.models.tiny import tiny_ddim_pipeline

    pipe = tiny_ddim_pipeline()
    cfg = cq.CacheQuantConfig(interval=3, schedule="dps", weight_bits=8, act_bits=8, dec=True,
                              calib_batch_size=2, dps_samples=2)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=9, progress=False, num_samples=4)
    path = tmp_path_factory.mktemp("plans") / "tiny.cqplan"
    plan.save(path)
    return plan, path


def test_round_trip_gives_identical_outputs(calibrated, make_pipe):
    plan, path = calibrated
    a, b = make_pipe("ddim"), make_pipe("ddim")
    cq.accelerate(a, plan)
    loaded = cq.load_plan(path)
    assert loaded.meta == json.loads(json.dumps(plan.meta))
    assert set(loaded.tensors) == set(plan.tensors)
    cq.accelerate(b, loaded)
    np.testing.assert_array_equal(run(a, "ddim", 9), run(b, "ddim", 9))
    with open(path, "rb") as f:
        assert b"pickle" not in f.read(64) and path.stat().st_size > 0


def test_plan_records_what_was_calibrated(calibrated):
    plan, _ = calibrated
    m = plan.meta
    assert m["sampler"]["scheduler"] == "DDIMScheduler" and m["sampler"]["num_inference_steps"] == 9
    assert len(m["model"]["weights_sha256"]) == 64 and m["model"]["class"] == "UNet2DModel"
    assert m["cachequant_version"] == cq.__version__
    assert m["schedule"][0] == 0 and len(m["schedule"]) == 3


def test_other_weights_rejected(calibrated, make_pipe):
    plan, _ = calibrated
    with pytest.raises(cq.PlanMismatchError, match="different weights"):
        cq.accelerate(make_pipe("ddim", seed=1), plan)


def test_other_architecture_rejected(calibrated):
    from diffusers import DDIMPipeline, UNet2DModel

    plan, _ = calibrated
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(16, 32, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    with pytest.raises(cq.PlanMismatchError, match="layers_per_block: plan 1 vs model 2"):
        cq.accelerate(DDIMPipeline(unet=unet, scheduler=make_scheduler("ddim")), plan)


def test_other_model_class_rejected(calibrated, make_pipe):
    plan, _ = calibrated
    with pytest.raises(cq.PlanMismatchError, match="calibrated for a UNet2DModel, not a DiTTransformer2DModel"):
        cq.accelerate(make_pipe("dit"), plan)


def test_other_step_count_rejected_when_called(calibrated, make_pipe):
    plan, _ = calibrated
    pipe = make_pipe("ddim")
    cq.accelerate(pipe, plan)
    with pytest.raises(cq.PlanMismatchError, match="num_inference_steps=9"):
        run(pipe, "ddim", steps=10)
    run(pipe, "ddim", steps=9)  # and the right count still works afterwards


def test_other_scheduler_rejected(calibrated, make_pipe):
    plan, _ = calibrated
    pipe = make_pipe("ddim")
    pipe.scheduler = make_scheduler("euler")
    with pytest.raises(cq.PlanMismatchError, match="calibrated with DDIMScheduler .* uses EulerDiscreteScheduler"):
        cq.accelerate(pipe, plan)
    pipe = make_pipe("ddim")
    cq.accelerate(pipe, plan)
    pipe.scheduler = make_scheduler("ddpm")  # swapped after accelerate
    with pytest.raises(cq.PlanMismatchError, match="uses DDPMScheduler"):
        run(pipe, "ddim", steps=9)


def test_other_scheduler_config_rejected(calibrated, make_pipe):
    plan, _ = calibrated
    pipe = make_pipe("ddim")
    pipe.scheduler = make_scheduler("ddim", timestep_spacing="trailing")
    cq.accelerate(pipe, plan)
    with pytest.raises(cq.PlanMismatchError, match="timesteps differ"):
        run(pipe, "ddim", steps=9)


def test_damaged_and_foreign_files_fail_cleanly(calibrated, tmp_path):
    from safetensors.torch import save_file

    _, path = calibrated
    data = path.read_bytes()
    cases = {
        "truncated.cqplan": data[: len(data) // 2],
        "garbage.cqplan": b"\x00\x01 not a plan at all" * 10,
        "empty.cqplan": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(cq.PlanError, match="not a readable cachequant plan"):
            cq.load_plan(tmp_path / name)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"a": "b"})
    with pytest.raises(cq.PlanError, match="not a cachequant plan"):
        cq.load_plan(tmp_path / "foreign.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "badjson.cqplan"), metadata={"cachequant": "{oops"})
    with pytest.raises(cq.PlanError, match="metadata is damaged"):
        cq.load_plan(tmp_path / "badjson.cqplan")
    with pytest.raises(cq.PlanError, match="not found"):
        cq.load_plan(tmp_path / "missing.cqplan")


def test_plan_missing_tensor_fails_cleanly(calibrated, make_pipe, tmp_path):
    plan, _ = calibrated
    broken = cq.Plan(plan.meta, {k: v for k, v in plan.tensors.items() if not k.startswith("w.conv_in")})
    broken.save(tmp_path / "b.cqplan")
    pipe = make_pipe("ddim")
    with pytest.raises(ValueError, match="has no tensor 'w.conv_in.scale'"):
        cq.accelerate(pipe, cq.load_plan(tmp_path / "b.cqplan"))
    assert not cq.is_accelerated(pipe)  # a failed accelerate leaves the pipeline untouched


def test_save_is_atomic(calibrated, tmp_path, monkeypatch):
    import safetensors.torch as st

    plan, _ = calibrated
    target = tmp_path / "p.cqplan"
    target.write_bytes(b"previous")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        plan.save(target)
    assert target.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_config_errors():
    with pytest.raises(ValueError, match="schedule must be one of"):
        cq.CacheQuantConfig(schedule="fast")
    with pytest.raises(ValueError, match="weight_bits must be 4 or 8"):
        cq.CacheQuantConfig(weight_bits=3)
    with pytest.raises(ValueError, match="both be set"):
        cq.CacheQuantConfig(weight_bits=8, act_bits=None)
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        cq.CacheQuantConfig(interval=0)
