"""torch.compile of an accelerated denoiser: no graph breaks on the reference path and on the
kernel path (one graph per full / cached mode), the compiled model computes what the eager one
does, regional compilation works, and restore finds the model behind the compiled wrapper."""

import numpy as np
import pytest
import torch

import cachequant as cq
from cachequant.models.tiny import tiny_dit_pipeline, tiny_sd_pipeline
from cachequant.session import session_of

PROMPTS = ["a red cat", "a small boat"]
CFG = dict(interval=2, schedule="uniform", weight_bits=8, act_bits=8, dec=True, calib_batch_size=2, dps_samples=2)


def sd(pipe, steps=4):
    g = torch.Generator().manual_seed(0)
    return np.asarray(pipe(PROMPTS[:1], num_inference_steps=steps, generator=g, output_type="np", height=16,
                           width=16).images)


@pytest.fixture(scope="module")
def sd_plan():
    pipe = tiny_sd_pipeline(scheduler="euler")
    return cq.calibrate(pipe, cq.CacheQuantConfig(**CFG), 4, prompts=PROMPTS, progress=False)


def _graph_breaks(model, args, kwargs) -> dict[str, int]:
    """Graph breaks of one call at a full position and one at a cached position."""
    clock = session_of(model).clock
    clock.start_run()
    out = {}
    for mode, position in (("full", 0), ("cached", 1)):
        clock.set(position)
        assert clock.mode == mode
        torch._dynamo.reset()
        with torch.no_grad():
            explanation = torch._dynamo.explain(model)(*args, **kwargs)
        out[mode] = explanation.graph_break_count
        assert explanation.graph_count == 1
    return out


def test_zero_graph_breaks_on_the_reference_path(sd_plan):
    pipe = tiny_sd_pipeline(scheduler="euler")
    cq.accelerate(pipe, sd_plan)
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor(500.0), torch.randn(2, 16, 32)
    assert _graph_breaks(pipe.unet, (x, t), {"encoder_hidden_states": ehs}) == {"full": 0, "cached": 0}
    cq.restore(pipe)
    dit = tiny_dit_pipeline()
    plan = cq.calibrate(dit, cq.CacheQuantConfig(**CFG), 4, class_labels=[0, 1], progress=False)
    cq.accelerate(dit, plan)
    args = (torch.randn(2, 4, 8, 8),)
    kw = {"timestep": torch.tensor([500, 500]), "class_labels": torch.tensor([0, 1])}
    assert _graph_breaks(dit.transformer, args, kw) == {"full": 0, "cached": 0}
    cq.restore(dit)


@pytest.mark.fresh_thread  # Triton's interpreter on the CPU (conftest.pytest_pyfunc_call)
def test_zero_graph_breaks_on_the_kernel_path(make_pipe):
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = make_pipe("ddim").to(dev)
    plan = cq.calibrate(pipe, cq.CacheQuantConfig(**{**CFG, "quant_attention": False}), 2, num_samples=2,
                        progress=False)
    cq.accelerate(pipe, plan, backend="int8")  # Triton's interpreter on a machine without a GPU
    assert cq.kernel_report(pipe)["kernel_layers"] > 0
    x, t = torch.randn(1, 3, 16, 16, device=dev), torch.tensor(500, device=dev)
    assert _graph_breaks(pipe.unet, (x, t), {}) == {"full": 0, "cached": 0}
    cq.restore(pipe)


def test_compiled_model_computes_the_eager_images_and_restores(sd_plan):
    pipe = tiny_sd_pipeline(scheduler="euler")
    ref = sd(pipe)
    cq.accelerate(pipe, sd_plan)
    eager = sd(pipe)
    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
    np.testing.assert_array_equal(sd(pipe), eager)
    np.testing.assert_array_equal(sd(pipe), eager)  # the second run: the graphs of both modes reused
    cq.restore(pipe)  # finds the accelerated model behind the compiled wrapper
    torch._dynamo.reset()
    assert not cq.is_accelerated(pipe)
    np.testing.assert_array_equal(sd(pipe), ref)


def test_regional_compilation(sd_plan):
    pipe = tiny_sd_pipeline(scheduler="euler")
    if not hasattr(pipe.unet, "compile_repeated_blocks"):
        pytest.skip("this diffusers has no regional compilation")
    cq.accelerate(pipe, sd_plan)
    eager = sd(pipe)
    torch._dynamo.reset()
    pipe.unet.compile_repeated_blocks(fullgraph=True, backend="eager")
    np.testing.assert_array_equal(sd(pipe), eager)
    cq.restore(pipe)
    torch._dynamo.reset()


def test_compiled_cached_transformer_settles_before_the_graph_capture():
    """``enable_cuda_graphs`` captures a key's third call (``WARMUP_CALLS`` eager calls first):
    under torch.compile no call from there on may compile, since a freshly compiled Triton kernel
    autotunes on its first launch, which invalidates a capture. The first full call of a cached
    transformer fills the empty feature cache that dynamo guards on, so its next full call
    recompiles; this counts compilations per (mode, branch) on the tiny SD3 pipeline, cache only."""
    from cachequant.backends.graphs import WARMUP_CALLS
    from cachequant.models.tiny_families import TINY_FAMILIES

    pipe, kw = TINY_FAMILIES["tiny-sd3"]()
    plan = cq.calibrate(pipe, cq.CacheQuantConfig(interval=3, schedule="uniform", weight_bits=None, act_bits=None,
                                                  calib_batch_size=2, dps_samples=2),
                        6, prompts=PROMPTS, pipeline_kwargs=kw, progress=False)
    cq.accelerate(pipe, plan)
    model = pipe.transformer
    clock = session_of(model).clock
    compiled, calls = [0], []

    def counting(gm, example_inputs):
        compiled[0] += 1
        return gm.forward

    def before(mod, args, kwargs):
        calls.append([(clock.mode, clock.forced, clock.branch), compiled[0]])

    def after(mod, args, kwargs, out):
        calls[-1][1] = compiled[0] - calls[-1][1]

    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=counting)
    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    try:
        for _ in range(2):
            pipe(prompt=PROMPTS[:1], num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                 output_type="latent", **kw)
    finally:
        for h in hooks:
            h.remove()
        model.__dict__.pop("forward", None)
        cq.restore(pipe)
    seen: dict = {}
    late = []
    for key, n in calls:
        i = seen[key] = seen.get(key, -1) + 1
        if i >= WARMUP_CALLS and n:
            late.append((key, i, n))
    assert {k[0] for k in seen} == {"full", "cached"} and compiled[0] >= 2
    assert not late, f"compiled at or after the capture call (key, call index, graphs): {late}"
