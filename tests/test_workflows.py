"""Everyday diffusers workflows on an accelerated pipeline: each works (identity at interval 1,
cache + W8A8 + DEC runs, restore is bit-exact) or is refused with a message saying what and what
to do. Tiny random-weight pipelines built from configs in code."""

import numpy as np
import pytest
import torch

import cachequant as cq
from cachequant.models.tiny import make_scheduler, tiny_sd_pipeline, tiny_sdxl_pipeline
from cachequant.quant.layer import quant_hooks
from cachequant.session import session_of

PROMPTS = ["a red cat", "a small boat"]
# quant_io: conv_in quantized too, whose per-position tables and hooks some tests read
W8A8 = dict(interval=2, schedule="dps", weight_bits=8, act_bits=8, dec=True, calib_batch_size=2, dps_samples=2,
            quant_io=True)
IDENTITY = dict(interval=1, schedule="uniform", weight_bits=None, act_bits=None, calib_batch_size=2)


def sd(pipe, steps=4, n=1, seed=0, **kw):
    kw.setdefault("height", 16)
    kw.setdefault("width", 16)
    g = torch.Generator().manual_seed(seed)
    return np.asarray(pipe(PROMPTS[:n], num_inference_steps=steps, generator=g, output_type="np", **kw).images,
                      dtype=np.float64)


def plan_for(pipe, steps=4, pipeline_kwargs=None, **cfg):
    return cq.calibrate(pipe, cq.CacheQuantConfig(**{**W8A8, **cfg}), steps, prompts=PROMPTS, progress=False,
                        pipeline_kwargs=pipeline_kwargs)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, snap):
    now = model.state_dict()
    assert list(now) == list(snap)
    assert all(torch.equal(now[k], v) for k, v in snap.items())


def check_workflow(pipe, call, steps=4, pipeline_kwargs=None):
    """Identity at interval 1; cache + W8A8 + DEC: same shape, finite, deterministic, changed;
    restore: the original images and weights, bit for bit."""
    model = pipe.unet
    snap = state(model)
    ref = call(pipe)
    plan = cq.calibrate(pipe, cq.CacheQuantConfig(**IDENTITY), steps, prompts=PROMPTS, progress=False,
                        pipeline_kwargs=pipeline_kwargs)
    cq.accelerate(pipe, plan)
    np.testing.assert_array_equal(call(pipe), ref)
    cq.restore(pipe)
    plan = plan_for(pipe, steps, pipeline_kwargs)
    cq.accelerate(pipe, plan)
    out = call(pipe)
    assert out.shape == ref.shape and np.isfinite(out).all() and not np.array_equal(out, ref)
    np.testing.assert_array_equal(call(pipe), out)
    cq.restore(pipe)
    assert_same_state(model, snap)
    np.testing.assert_array_equal(call(pipe), ref)
    return plan


# -- model families and samplers -----------------------------------------------------------------


def test_sdxl_w8a8_end_to_end():
    pipe = tiny_sdxl_pipeline()
    plan = check_workflow(pipe, lambda p: sd(p, height=32, width=32), pipeline_kwargs=dict(height=32, width=32))
    assert plan.quant is not None and plan.cache.kind == "unet"
    names = {layer.name for layer in plan.quant.layers}
    assert "add_embedding.linear_1" in names  # SDXL's added text/time conditioning is quantized too


@pytest.mark.parametrize("kind,sched", [("img2img", "ddim"), ("img2img", "euler"), ("inpaint", "ddim")])
def test_img2img_strength_half_uses_each_positions_data(kind, sched):
    """Strength 0.5 of 10 steps starts at position 5: the plan knows it, every call reads the
    activation ranges, cache mode and DEC of the sampler's own position (not of the call count)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    cls = StableDiffusionImg2ImgPipeline if kind == "img2img" else StableDiffusionInpaintPipeline
    pipe = cls.from_pipe(tiny_sd_pipeline(scheduler=sched))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    extra = {} if kind == "img2img" else {"mask_image": (torch.rand(1, 1, 16, 16) > 0.5).float()}

    def call(p, strength=0.5):
        return sd(p, steps=10, image=image, strength=strength, **({"height": None, "width": None} if not extra
                                                                   else {}), **extra)

    kw = dict(image=image, strength=0.5, **extra)
    plan = check_workflow(pipe, call, steps=10, pipeline_kwargs=kw)
    assert plan.sampler.begin == 5 and plan.schedule[0] == 5 and plan.num_calls == 10
    table = plan.tensors["act.conv_in"][0, 0]  # conv_in's activation scale per position
    assert len(set(table[5:].tolist())) == 5  # distinct per position: a shifted index would show
    cq.accelerate(pipe, plan)
    module, hook = quant_hooks(pipe.unet)["conv_in"]
    clock = session_of(pipe.unet).clock
    seen, timestep = [], []

    def record(mod, args):
        pos = plan.sampler.timesteps.index(timestep[-1])  # the sampler's position of this call's timestep
        seen.append((pos, float(hook.act_params(mod)[0, 0]), clock.mode))

    pipe.unet.register_forward_pre_hook(lambda m, a, k: timestep.append(float(a[1])), with_kwargs=True)
    h = module.register_forward_pre_hook(record)
    call(pipe)
    assert [s[0] for s in seen] == [5, 6, 7, 8, 9]
    assert all(scale == float(table[pos]) for pos, scale, _ in seen)
    modes = {pos: mode for pos, _, mode in seen}
    assert all((modes[p] == "full") == (p in plan.schedule) for p in modes)
    seen.clear()
    call(pipe, strength=0.3)  # starts later, at a position the plan caches: that first call runs in full
    assert [s[0] for s in seen] == [7, 8, 9] and seen[0][2] == "full"
    assert all(scale == float(table[pos]) for pos, scale, _ in seen)
    with pytest.raises(cq.PlanMismatchError, match="start at position 5"):
        call(pipe, strength=0.8)
    h.remove()
    cq.restore(pipe)


def test_custom_sigmas_accepted_when_equal_refused_when_not():
    import inspect

    pipe = tiny_sd_pipeline(scheduler="euler")
    sigmas = [14.6, 6.5, 3.8, 2.2, 1.3, 0.0]

    def call(p, s=sigmas):
        return sd(p, steps=None, sigmas=s)

    plan = check_workflow(pipe, call, steps=5, pipeline_kwargs=dict(sigmas=sigmas))
    original = inspect.signature(pipe.scheduler.set_timesteps)
    cq.accelerate(pipe, plan)
    assert inspect.signature(pipe.scheduler.set_timesteps) == original  # diffusers looks for `sigmas` there
    call(pipe)
    with pytest.raises(cq.PlanMismatchError, match="timesteps differ from the calibrated ones at position 1"):
        call(pipe, [14.6, 6.0, 3.8, 2.2, 1.3, 0.0])
    with pytest.raises(cq.PlanMismatchError, match="timesteps differ"):
        sd(pipe, steps=5)  # the scheduler's own sigmas are other ones
    cq.restore(pipe)


@pytest.mark.parametrize("cls,calls", [("HeunDiscreteScheduler", 7), ("PNDMScheduler", 5)])
def test_multi_call_samplers_follow_the_sampler_position(cls, calls):
    import diffusers

    pipe = tiny_sd_pipeline()
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config)
    plan = check_workflow(pipe, sd)
    assert plan.num_calls == calls
    cq.accelerate(pipe, plan)
    clock = session_of(pipe.unet).clock
    seen = []
    pipe.unet.register_forward_pre_hook(lambda *a: seen.append((clock.position, clock.mode)))
    sd(pipe)
    assert [p for p, _ in seen] == list(range(calls))
    assert [p for p, m in seen if m == "full"] == plan.schedule
    cq.restore(pipe)


def test_interrupted_run_leaves_the_next_run_clean():
    pipe = tiny_sd_pipeline(scheduler="euler")
    plan = plan_for(pipe, 6)
    cq.accelerate(pipe, plan)
    full = sd(pipe, 6)

    def stop(p, i, t, kw):
        if i == 2:
            p._interrupt = True
        return kw

    sd(pipe, 6, callback_on_step_end=stop)
    np.testing.assert_array_equal(sd(pipe, 6), full)
    cq.restore(pipe)


# -- pipelines sharing a model, offloading, dtype --------------------------------------------------


def test_from_pipe_sharing_the_model():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = tiny_sd_pipeline(scheduler="euler")
    plan = plan_for(pipe)
    cq.accelerate(pipe, plan)
    ref = sd(pipe)
    same = StableDiffusionImg2ImgPipeline.from_pipe(pipe)  # shares the scheduler object: followed
    same.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16)
    sd(same, image=image, strength=1.0, height=None, width=None)
    other = StableDiffusionImg2ImgPipeline.from_pipe(pipe, scheduler=make_scheduler("euler"))
    other.set_progress_bar_config(disable=True)
    with pytest.raises(cq.WorkflowError, match=r"call cq.attach\(pipe\) on that pipeline"):
        sd(other, image=image, strength=1.0, height=None, width=None)
    cq.attach(other)
    a = sd(other, image=image, strength=1.0, height=None, width=None)
    b = sd(same, image=image, strength=1.0, height=None, width=None)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sd(pipe), ref)
    wrong = StableDiffusionImg2ImgPipeline.from_pipe(pipe, scheduler=make_scheduler("ddim"))
    with pytest.raises(cq.PlanMismatchError, match="uses DDIMScheduler"):
        cq.attach(wrong)
    cq.restore(pipe)
    assert "step" not in other.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__


@pytest.mark.parametrize("order", ["offload-after", "offload-before"])
def test_model_cpu_offload_composes(order):
    """accelerate's offload hook and cachequant's hooks compose in either order; restore keeps the
    offloading (diffusers re-installs its hooks after every call)."""
    pipe = tiny_sd_pipeline(scheduler="euler")
    ref = sd(pipe)
    plan = plan_for(pipe)
    cq.accelerate(pipe, plan)
    acc = sd(pipe)
    cq.restore(pipe)
    if order == "offload-before":
        pipe.enable_model_cpu_offload(device="cpu")
        cq.accelerate(pipe, plan)
    else:
        cq.accelerate(pipe, plan)
        pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the second run uses the offload hooks diffusers re-installed after the first
        np.testing.assert_array_equal(sd(pipe), acc)
    cq.restore(pipe)
    assert getattr(pipe.unet, "_hf_hook", None) is not None  # offloading stays on
    np.testing.assert_array_equal(sd(pipe), ref)


def test_sequential_offload_refused():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    pipe = tiny_sd_pipeline(scheduler="euler")
    plan = plan_for(pipe)
    # what enable_sequential_cpu_offload puts on every layer (the pipeline call itself needs a GPU)
    add_hook_to_module(pipe.unet.conv_in, AlignDevicesHook(execution_device="cpu"))
    with pytest.raises(cq.WorkflowError, match="sequential CPU offload"):
        cq.accelerate(pipe, plan)
    remove_hook_from_module(pipe.unet.conv_in)
    cq.accelerate(pipe, plan)
    add_hook_to_module(pipe.unet.conv_in, AlignDevicesHook(execution_device="cpu"))
    with pytest.raises(cq.WorkflowError, match="sequential CPU offload"):
        sd(pipe)
    remove_hook_from_module(pipe.unet.conv_in)
    cq.restore(pipe)


def test_bfloat16_after_accelerate():
    pipe = tiny_sd_pipeline(scheduler="euler")
    plan = plan_for(pipe)
    cq.accelerate(pipe, plan)
    acc = sd(pipe)
    pipe.to(torch.bfloat16)
    module, _ = quant_hooks(pipe.unet)["conv_in"]
    assert module.weight.dtype == torch.bfloat16
    assert all(b.dtype != torch.bfloat16 for n, b in module.named_buffers())  # tables not rounded
    out = sd(pipe)
    assert out.shape == acc.shape and np.isfinite(out).all()
    assert np.abs(out - acc).mean() < 0.05  # bf16 arithmetic, same plan
    cq.restore(pipe)
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16


# -- what the model looks like while accelerated ---------------------------------------------------


def test_quantized_layers_keep_their_interface_and_state_dict(tmp_path):
    from diffusers import UNet2DConditionModel

    pipe = tiny_sd_pipeline()
    unet = pipe.unet
    snap = state(unet)
    types = {n: type(m) for n, m in unet.named_modules()}
    weight = unet.conv_in.weight
    plan = plan_for(pipe)
    cq.accelerate(pipe, plan)
    assert {n: type(m) for n, m in unet.named_modules()} == types  # nothing replaced
    q = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert (q.in_features, q.out_features) == (32, 32) and q.weight.shape == (32, 32)
    assert unet.conv_in.weight is weight and unet.conv_in.kernel_size == (3, 3)
    assert_same_state(unet, snap)  # nothing of cachequant in the state dict
    unet.save_pretrained(tmp_path)  # the original checkpoint
    again = UNet2DConditionModel.from_pretrained(tmp_path)
    assert_same_state(again, snap)
    pipe2 = tiny_sd_pipeline()
    pipe2.unet = again
    cq.accelerate(pipe2, plan)  # the saved checkpoint is the plan's model
    np.testing.assert_array_equal(sd(pipe2), sd(pipe))
    cq.restore(pipe)
    cq.restore(pipe2)


# -- LoRA -------------------------------------------------------------------------------------------


def _lora(pipe, scale=None, name="style"):
    from peft import LoraConfig

    torch.manual_seed(5)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False), adapter_name=name)
    if scale is not None:
        pipe.fuse_lora(components=["unet"], lora_scale=scale, adapter_names=[name])
        pipe.unload_lora_weights()


def test_lora_fused_works_unfused_and_late_are_refused():
    pytest.importorskip("peft")
    pipe = tiny_sd_pipeline(scheduler="euler")
    _lora(pipe)  # unfused
    with pytest.raises(cq.WorkflowError, match="peft LoRA layer: .*Fuse the LoRA"):
        plan_for(pipe)
    fused = tiny_sd_pipeline(scheduler="euler")
    _lora(fused, scale=0.7)
    plan = check_workflow(fused, sd)  # calibrating a fused-LoRA model is an ordinary calibration
    other = tiny_sd_pipeline(scheduler="euler")
    _lora(other, scale=0.5)
    with pytest.raises(cq.PlanMismatchError, match="another LoRA scale"):
        cq.accelerate(other, plan)  # the fingerprint sees the other scale
    cq.accelerate(fused, plan)
    _lora(fused, name="late")  # loaded into the accelerated model
    with pytest.raises(cq.WorkflowError, match=r"loaded after cq.accelerate.*cq.restore\(pipe\) first"):
        sd(fused)
    cq.restore(fused)


# -- attention processors and other libraries' hooks ---------------------------------------------


def test_attention_processor_changes_are_refused_and_kept():
    pipe = tiny_sd_pipeline(scheduler="euler")
    plan = plan_for(pipe)
    assert plan.quant.attention
    cq.accelerate(pipe, plan)
    pipe.enable_attention_slicing()
    with pytest.raises(cq.WorkflowError, match="attention processor .* was replaced .*SlicedAttnProcessor"):
        sd(pipe)
    cq.restore(pipe)  # puts back only processors that are still its own
    procs = {type(m.processor).__name__ for m in pipe.unet.modules() if hasattr(m, "processor")}
    assert procs == {"SlicedAttnProcessor"}
    with pytest.raises(cq.WorkflowError, match="whose processor is now SlicedAttnProcessor"):
        cq.accelerate(pipe, plan)
    float_attn = plan_for(pipe, quant_attention=False)  # a plan that leaves attention in float
    cq.accelerate(pipe, float_attn)
    sd(pipe)
    cq.restore(pipe)
    assert {type(m.processor).__name__ for m in pipe.unet.modules() if hasattr(m, "processor")} == procs


def test_fused_qkv_projections_before_calibration_and_after_accelerate():
    pipe = tiny_sd_pipeline(scheduler="euler")
    pipe.fuse_qkv_projections()
    plan = plan_for(pipe)
    assert plan.quant.attention  # the fused processor keeps 8-bit attention matmuls
    assert "attention_kept_float" not in plan.diagnostics
    names = {layer.name for layer in plan.quant.layers}
    assert any(n.endswith("to_qkv") for n in names) and not any(n.endswith("attn1.to_q") for n in names)
    cq.accelerate(pipe, plan)
    sd(pipe)
    cq.restore(pipe)
    pipe = tiny_sd_pipeline(scheduler="euler")
    cq.accelerate(pipe, plan_for(pipe))
    pipe.fuse_qkv_projections()
    with pytest.raises(cq.WorkflowError, match="was replaced after cq.accelerate"):
        sd(pipe)
    cq.restore(pipe)


def test_diffusers_caches_are_refused_and_survive_restore(make_pipe):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    from cachequant.runtime.hooks import foreign_hooks

    pipe = make_pipe("dit")
    plan = cq.calibrate(pipe, cq.CacheQuantConfig(**W8A8), 4, class_labels=[0, 1], progress=False)
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(cq.WorkflowError, match="fbc_leader_block_hook"):
        cq.accelerate(pipe, plan)
    pipe = make_pipe("dit")
    cq.accelerate(pipe, plan)
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(cq.WorkflowError, match="hooks of other features were added"):
        pipe(class_labels=[0], num_inference_steps=4, output_type="np")
    theirs = foreign_hooks(pipe.transformer)
    cq.restore(pipe)
    assert foreign_hooks(pipe.transformer) == theirs  # restore removes only its own hooks


def test_controlnet_residuals_flow_through_the_cache():
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = tiny_sd_pipeline(scheduler="euler")
    torch.manual_seed(1)
    pipe = StableDiffusionControlNetPipeline.from_pipe(
        base, controlnet=ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16)))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    check_workflow(pipe, lambda p: sd(p, image=image), pipeline_kwargs=dict(image=image))
