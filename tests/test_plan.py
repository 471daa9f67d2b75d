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
    assert loaded.to_meta() == json.loads(json.dumps(plan.to_meta()))
    assert set(loaded.tensors) == set(plan.tensors)
    assert all(torch.equal(loaded.tensors[k], plan.tensors[k]) for k in plan.tensors)
    cq.accelerate(b, loaded)
    np.testing.assert_array_equal(run(a, "ddim", 9), run(b, "ddim", 9))
    with open(path, "rb") as f:
        assert b"pickle" not in f.read(64) and path.stat().st_size > 0


def test_plan_records_what_was_calibrated(calibrated, make_pipe):
    plan, _ = calibrated
    assert plan.sampler.scheduler == "DDIMScheduler" and plan.sampler.num_inference_steps == 9
    assert plan.sampler.begin == 0 and plan.num_calls == 9 and plan.sampler.calls_per_step == 1
    import copy
    probe = copy.deepcopy(make_pipe("ddim").scheduler)
    probe.set_timesteps(9)
    assert list(plan.sampler.timesteps) == [float(t) for t in probe.timesteps]
    assert len(plan.fingerprint.weights_sha256) == 64 and plan.fingerprint.cls == "UNet2DModel"
    assert plan.fingerprint.dtype == "float32" and plan.info["cachequant_version"] == cq.__version__
    assert plan.cache.kind == "unet" and plan.schedule[0] == 0 and len(plan.schedule) == 3
    assert plan.quant.act_bits == 8 and plan.quant.layers and plan.tensors["cache_dec"].shape[:2] == (2, 9)


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
    ref = run(pipe, "ddim", steps=9)
    pipe.scheduler = make_scheduler("ddpm")  # swapped after accelerate
    with pytest.raises(cq.PlanMismatchError, match="uses DDPMScheduler"):
        run(pipe, "ddim", steps=9)
    pipe.scheduler = make_scheduler("ddim")  # another object of the calibrated class: followed
    np.testing.assert_array_equal(run(pipe, "ddim", steps=9), ref)


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


def _resaved(plan, path, meta=None, tensors=None):
    """The plan written with its metadata or tensors changed, bypassing Plan's own types."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in (tensors if tensors is not None else plan.tensors).items()}, str(path),
              metadata={"cachequant": json.dumps(meta if meta is not None else plan.to_meta())})
    return path


def test_plan_missing_or_misshapen_tensor_fails_cleanly(calibrated, tmp_path):
    plan, _ = calibrated
    t = {k: v for k, v in plan.tensors.items() if k != "w.down_blocks.0.resnets.0.conv1"}
    with pytest.raises(cq.PlanError, match="tensor 'w.down_blocks.0.resnets.0.conv1' is missing"):
        cq.load_plan(_resaved(plan, tmp_path / "a.cqplan", tensors=t))
    t = dict(plan.tensors, **{"act.down_blocks.0.resnets.0.conv1": plan.tensors["act.down_blocks.0.resnets.0.conv1"][..., :4]})
    with pytest.raises(cq.PlanError, match=r"tensor 'act.down_blocks.0.resnets.0.conv1' is \(1, 2, 4\)"):
        cq.load_plan(_resaved(plan, tmp_path / "b.cqplan", tensors=t))
    t = dict(plan.tensors, cache_dec=plan.tensors["cache_dec"] * float("nan"))
    with pytest.raises(cq.PlanError, match="non-finite"):
        cq.load_plan(_resaved(plan, tmp_path / "c.cqplan", tensors=t))


@pytest.mark.parametrize("field, value, message", [
    (("sampler", "num_inference_steps"), -20, "num_inference_steps must be an integer >= 1"),
    (("cache", "schedule"), [0, 5, 999], "must be increasing positions in"),
    (("cache", "schedule"), [3, 5], "starting at the first calibrated position 0"),
    (("config", "interval"), True, "interval must be an integer"),
    (("sampler", "begin"), 12, "sampler.begin must be an integer in"),
    (("sampler", "calls_per_step"), 0, "sampler.calls_per_step must be an integer >= 1"),
    (("format_version",), 1, "plan format version 1"),
])
def test_plan_metadata_validated_on_load(calibrated, tmp_path, field, value, message):
    plan, _ = calibrated
    meta = plan.to_meta()
    node = meta
    for k in field[:-1]:
        node = node[k]
    node[field[-1]] = value
    with pytest.raises(cq.PlanError, match=message):
        cq.load_plan(_resaved(plan, tmp_path / "m.cqplan", meta=meta))


def test_failed_accelerate_leaves_the_pipeline_untouched(calibrated, make_pipe):
    plan, _ = calibrated
    pipe = make_pipe("ddim")
    ref = run(pipe, "ddim", 9)
    with pytest.raises(ValueError, match="backend 'int8' cannot run here"):
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("TRITON_INTERPRET", raising=False)
            cq.accelerate(pipe, plan, backend="int8")
    assert not cq.is_accelerated(pipe)
    assert not any(k.startswith("_cachequant") for k, _ in pipe.unet.named_buffers())
    np.testing.assert_array_equal(run(pipe, "ddim", 9), ref)


def test_save_refuses_a_directory_or_none(calibrated, tmp_path):
    plan, _ = calibrated
    with pytest.raises(IsADirectoryError, match="is a directory"):
        plan.save(tmp_path)
    with pytest.raises(TypeError, match="needs a file path"):
        plan.save(None)
    with pytest.raises(cq.PlanError, match="needs a file path"):
        cq.load_plan(None)


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
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        cq.CacheQuantConfig(interval=True)
