"""Flux, SD3, Sana and Wan through their real diffusers pipelines, and a family described by a user.

The pipelines are built from tiny configs in code (``cachequant.models.tiny_families``): real
text encoders (CLIP, CLIP with projection, T5, Gemma-2, UMT5) and VAEs with one or two layers, and
byte-level tokenizers made in code (no tokenizer file exists offline), so prompts go through the
pipelines' own text encoding. Runs stop at the latents (``output_type="latent"``): the VAE decode
adds nothing cachequant touches. Every sampler is ``FlowMatchEulerDiscreteScheduler`` (Flux with
dynamic shifting, the others with shift 3).
"""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import cachequant as cq
from cachequant.models.adapters import (
    BlockStack,
    TransformerDescription,
    adapter_for,
    register,
    unregister,
)
from cachequant.models.tiny_families import TINY_FAMILIES

PROMPTS = ["a red cat", "a small boat"]
STEPS = 6


def _latents(pipe, kw, steps=STEPS):
    out = pipe(prompt=PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
               output_type="latent", **kw)
    x = out.images if hasattr(out, "images") else out.frames
    return x.float().numpy().astype(np.float64)


def _calibrate(pipe, kw, **cfg):
    cfg = {"calib_batch_size": 2, "dps_samples": 2, **cfg}
    return cq.calibrate(pipe, cq.CacheQuantConfig(**cfg), STEPS, prompts=PROMPTS, pipeline_kwargs=kw, progress=False)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _accelerated_run(pipe, kw, plan, state: dict, ref: np.ndarray) -> np.ndarray:
    """Latents of ``plan`` accelerated, after checking two runs agree bit for bit and are finite,
    and that ``restore`` gives back every weight and buffer (``state``) and the plain output."""
    cq.accelerate(pipe, plan)
    out = _latents(pipe, kw)
    again = _latents(pipe, kw)
    cq.restore(pipe)
    assert np.isfinite(out).all() and np.array_equal(out, again)
    after = pipe.transformer.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    np.testing.assert_array_equal(_latents(pipe, kw), ref)
    return out


@pytest.fixture(scope="module")
def pipes():
    return {name: make() for name, make in TINY_FAMILIES.items()}


@pytest.mark.parametrize("family", ["tiny-flux", "tiny-sd3", "tiny-sana", "tiny-wan"])
def test_family_identity_cache_quant_restore(pipes, family):
    pipe, kw = pipes[family]
    model = pipe.transformer
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _latents(pipe, kw)

    plan = _calibrate(pipe, kw, interval=1, schedule="uniform", weight_bits=None, act_bits=None)
    assert plan.sampler.sigmas is not None and len(plan.sampler.sigmas) == STEPS + 1
    cq.accelerate(pipe, plan)
    np.testing.assert_array_equal(_latents(pipe, kw), ref)
    cq.restore(pipe)

    plan = _calibrate(pipe, kw, interval=2, schedule="dps", weight_bits=8, act_bits=8, dec=True)
    assert plan.cache.kind == "transformer" and plan.cache.site["span"] == [1, 2]
    two_streams = family in ("tiny-flux", "tiny-sd3")
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    # cache-DEC per hidden channel, for each stream (image and text tokens for joint blocks)
    assert plan.tensors["cache_dec"].shape == (2, STEPS, hidden * (2 if two_streams else 1))
    kept = set(plan.diagnostics["layers_kept_float"])
    quantized = {s.name for s in plan.quant.layers}
    io = adapter_for(model).keep_8bit(model)  # first and last layers: float by default (quant_io)
    assert io <= kept and not kept & quantized
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in kept - io)

    out = _accelerated_run(pipe, kw, plan, state, ref)
    assert 0 < _rel(out, ref) < 0.5


@pytest.mark.parametrize("family", ["tiny-flux", "tiny-sd3"])
def test_cached_span_is_skipped_for_both_streams(pipes, family):
    pipe, kw = pipes[family]
    model = pipe.transformer
    plan = _calibrate(pipe, kw, interval=2, schedule="uniform", weight_bits=None, act_bits=None, dec=False)
    name = adapter_for(model).layout(model, plan.cache.site).modules[0]
    ran, seen = [], []
    inner = model.get_submodule(name).attn
    h1 = inner.register_forward_hook(lambda *a: ran.append(1))
    cq.accelerate(pipe, plan)
    h2 = model.get_submodule(name).register_forward_hook(lambda m, a, kw_, out: seen.append(out), with_kwargs=True)
    _latents(pipe, kw)
    cq.restore(pipe)
    h1.remove(), h2.remove()
    assert len(ran) == len(plan.schedule) < STEPS  # the block's attention ran on full steps only
    assert all(isinstance(o, tuple) and len(o) == 2 and all(isinstance(t, torch.Tensor) for t in o) for o in seen)


def test_span_across_stacks_and_text_pre_only_block(pipes):
    """Flux: a span from the dual-stream into the single-stream blocks; SD3: a span ending at the
    last, text-pre-only block (only the image stream has a deviation there)."""
    for family, span, dec_channels in (("tiny-flux", (0, 2), 64), ("tiny-sd3", (1, 3), 32)):
        pipe, kw = pipes[family]
        ref = _latents(pipe, kw)
        plan = _calibrate(pipe, kw, interval=2, schedule="uniform", weight_bits=None, act_bits=None, dit_span=span)
        assert plan.tensors["cache_dec"].shape[2] == dec_channels
        cq.accelerate(pipe, plan)
        out = _latents(pipe, kw)
        cq.restore(pipe)
        assert np.isfinite(out).all() and 0 < _rel(out, ref) < 0.5


def _predictions(pipe, kw):
    """Every transformer output of one run (the error of the model itself, before the sampler
    averages it into the latents)."""
    outs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o.sample))
    try:
        _latents(pipe, kw)
    finally:
        handle.remove()
    return torch.stack(outs).double()


@pytest.mark.parametrize("family", ["tiny-flux", "tiny-sd3", "tiny-sana", "tiny-wan"])
def test_w8a8_beats_w4a8(pipes, family):
    pipe, kw = pipes[family]
    ref = _predictions(pipe, kw)
    errs = {}
    for bits in (8, 4):
        plan = _calibrate(pipe, kw, interval=1, schedule="uniform", weight_bits=bits, act_bits=8)
        cq.accelerate(pipe, plan)
        errs[bits] = float((_predictions(pipe, kw) - ref).norm() / ref.norm())
        cq.restore(pipe)
    assert 0 < errs[8] < errs[4], errs


def test_modulation_layers_are_a_choice(pipes):
    pipe, kw = pipes["tiny-flux"]
    plan = _calibrate(pipe, kw, interval=1, schedule="uniform", weight_bits=8, act_bits=8, quant_modulation=True,
                      quant_io=True)
    names = {s.name for s in plan.quant.layers}
    assert {"transformer_blocks.0.norm1.linear", "norm_out.linear"} <= names
    assert "layers_kept_float" not in plan.diagnostics


def test_plan_refused_on_another_model_sampler_or_sigmas(pipes):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
    )

    pipe, kw = pipes["tiny-flux"]
    plan = _calibrate(pipe, kw, interval=2, schedule="uniform", weight_bits=8, act_bits=8)
    other, _ = pipes["tiny-sd3"]
    with pytest.raises(cq.PlanMismatchError, match="FluxTransformer2DModel"):
        cq.accelerate(other, plan)

    scheduler = pipe.scheduler
    try:
        pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(scheduler.config)
        with pytest.raises(cq.PlanMismatchError, match="FlowMatchEulerDiscreteScheduler"):
            cq.accelerate(pipe, plan)
        # another shift: the sampler's timesteps and sigmas both move
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, base_shift=0.2, max_shift=0.4)
        cq.accelerate(pipe, plan)
        with pytest.raises(cq.PlanMismatchError, match="timesteps|sigmas"):
            _latents(pipe, kw)
        cq.restore(pipe)
    finally:
        pipe.scheduler = scheduler

    # the same timesteps with other noise levels: refused by the sigmas alone
    sig = list(plan.sampler.sigmas)
    sig[-1] = 0.01
    moved = dataclasses.replace(plan, sampler=dataclasses.replace(plan.sampler, sigmas=tuple(sig)))
    cq.accelerate(pipe, moved)
    with pytest.raises(cq.PlanMismatchError, match="sigmas differ .* position 6"):
        _latents(pipe, kw)
    cq.restore(pipe)


def test_sigmas_are_saved_in_the_plan(pipes, tmp_path):
    pipe, kw = pipes["tiny-wan"]
    plan = _calibrate(pipe, kw, interval=1, schedule="uniform", weight_bits=None, act_bits=None)
    back = cq.load_plan(plan.save(tmp_path / "wan.cqplan"))
    assert back.sampler.sigmas == plan.sampler.sigmas and back.sampler.sigmas[-1] == 0.0


# -- guidance as separate calls: WanPipeline with guidance_scale > 1 calls the model twice per step --


def _guided(pipes, scale=2.0):
    """The tiny Wan pipeline with guidance: per step a conditional, then an unconditional call."""
    pipe, kw = pipes["tiny-wan"]
    return pipe, {**kw, "guidance_scale": scale}


def _cachequant_hooks(model):
    from cachequant.runtime.hooks import hooks_in

    return [h for _, h in hooks_in(model) if h.startswith("cachequant.")]


def test_wan_guidance_no_cache_no_quant_is_the_plain_pipeline(pipes):
    pipe, kw = _guided(pipes)
    ref = _latents(pipe, kw)
    plan = _calibrate(pipe, kw, interval=1, schedule="uniform", weight_bits=None, act_bits=None)
    assert plan.sampler.calls_per_step == 2 and plan.num_calls == STEPS  # positions stay one per step
    cq.accelerate(pipe, plan)
    np.testing.assert_array_equal(_latents(pipe, kw), ref)
    cq.restore(pipe)


def test_wan_guidance_cache_w8a8_dec_and_restore(pipes):
    pipe, kw = _guided(pipes)
    model = pipe.transformer
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _latents(pipe, kw)
    plan = _calibrate(pipe, kw, interval=2, schedule="dps", weight_bits=8, act_bits=8, dec=True)
    assert plan.sampler.calls_per_step == 2 and len(plan.schedule) == STEPS // 2
    assert plan.info["calibration"]["pipeline_kwargs"]["guidance_scale"] == "2.0"
    assert plan.tensors["cache_dec"].shape[:2] == (2, STEPS)  # per position, fitted on both branches
    out = _accelerated_run(pipe, kw, plan, state, ref)
    assert 0 < _rel(out, ref) < 0.05
    # restore also left no hook or held table
    assert not _cachequant_hooks(model) and not cq.is_accelerated(pipe)
    assert not [k for m in model.modules() for k in m._buffers if k.startswith("_cachequant")]


def test_wan_guidance_each_branch_reuses_its_own_cache(pipes):
    """On a cached step, the span adds to each call's input the deviation that the *same* branch
    computed at the last full step — not the one the other branch stored last (a shared cache
    would hand the conditional call the unconditional deviation)."""
    pipe, kw = _guided(pipes)
    model = pipe.transformer
    plan = _calibrate(pipe, kw, interval=2, schedule="uniform", weight_bits=None, act_bits=None, dec=False)
    (name,) = adapter_for(model).layout(model, plan.cache.site).modules  # span [1, 2): one block
    deltas = []  # per call, in order: the block's output minus its input
    cq.accelerate(pipe, plan)
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, a, k, out: deltas.append((out - (k["hidden_states"] if "hidden_states" in k else a[0])).double()),
        with_kwargs=True)
    try:
        _latents(pipe, kw)
    finally:
        handle.remove()
        cq.restore(pipe)
    assert len(deltas) == 2 * STEPS and plan.schedule == [0, 2, 4]
    for pos in range(STEPS):
        if pos in plan.schedule:
            continue
        for branch in (0, 1):
            reused, own, other = deltas[2 * pos + branch], deltas[2 * (pos - 1) + branch], deltas[2 * (pos - 1) + 1 - branch]
            assert torch.allclose(reused, own, atol=1e-5 * float(own.abs().max()))
            assert (reused - other).norm() > 0.01 * other.norm()  # the branches' deviations do differ


def test_wan_plan_refused_at_another_guidance(pipes, tmp_path):
    pipe, kw1 = _guided(pipes, 1.0)
    _, kw2 = _guided(pipes, 2.0)
    cfg = dict(interval=2, schedule="uniform", weight_bits=None, act_bits=None)
    one, two = _calibrate(pipe, kw1, **cfg), _calibrate(pipe, kw2, **cfg)
    assert (one.sampler.calls_per_step, two.sampler.calls_per_step) == (1, 2)
    back = cq.load_plan(two.save(tmp_path / "wan-g2.cqplan"))
    assert back.sampler.calls_per_step == 2
    ref = _latents(pipe, kw2)
    cq.accelerate(pipe, one)
    with pytest.raises(cq.PlanMismatchError, match="called 2 times at sampler position 0.* 1 call.*guidance_scale you"):
        _latents(pipe, kw2)
    cq.restore(pipe)
    cq.accelerate(pipe, back)
    with pytest.raises(cq.PlanMismatchError, match="with 2 model calls per scheduler step.* 1 time.*guidance_scale you"):
        _latents(pipe, kw1)
    out = _latents(pipe, kw2)  # the next run, at the calibrated guidance, starts clean
    cq.restore(pipe)
    assert np.isfinite(out).all() and 0 < _rel(out, ref) < 0.05
    # a plan written before the field existed was calibrated with one call per step
    meta = one.to_meta()
    del meta["sampler"]["calls_per_step"]
    assert cq.Plan.from_meta(meta, one.tensors).sampler.calls_per_step == 1


def test_branches_of_a_step_share_one_range():
    from cachequant.quant.observers import RangeObserver
    from cachequant.quant.quantizer import activation_range

    cond, uncond = torch.linspace(-1, 1, 1000), torch.linspace(-3, 0.5, 1000)
    obs = RangeObserver(8)
    obs.observe(cond, 0, 0)
    obs.observe(uncond, 0, 0, branch=1)
    obs.observe(cond, 1, 0)
    (lo0, hi0), (lo1, hi1) = activation_range(cond, 8), activation_range(uncond, 8)
    assert obs.history == [(0, 0, min(lo0, lo1), max(hi0, hi1)), (1, 0, lo0, hi0)]


# -- a family the user describes -------------------------------------------------------------------


class _Block(nn.Module):
    """Two streams, called positionally, returned as (image, text)."""

    def __init__(self, dim):
        super().__init__()
        self.mod = nn.Linear(dim, 2 * dim)
        self.mix = nn.Linear(dim, dim)
        self.ctx = nn.Linear(dim, dim)

    def forward(self, x, ctx, temb):
        scale, shift = self.mod(temb).unsqueeze(1).chunk(2, dim=-1)
        h = torch.cat([ctx, x], dim=1)
        h = h + torch.tanh(self.mix(h * (1 + scale) + shift))
        return h[:, ctx.shape[1]:], ctx + 0.5 * torch.tanh(self.ctx(h[:, : ctx.shape[1]]))


class TinyMMDiT(nn.Module):
    def __init__(self, dim=16, channels=4):
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        self.time = nn.Linear(1, dim)
        self.text = nn.Parameter(torch.randn(1, 3, dim))
        self.layers = nn.ModuleList(_Block(dim) for _ in range(3))
        self.out = nn.Linear(dim, channels)

    def forward(self, sample, timestep):
        b, c, hh, ww = sample.shape
        x = self.embed(sample.flatten(2).transpose(1, 2))
        temb = torch.sin(self.time(timestep.reshape(-1, 1).float().expand(b, 1) / 1000))
        ctx = self.text.expand(b, -1, -1)
        for blk in self.layers:
            x, ctx = blk(x, ctx, temb)
        return (self.out(x).transpose(1, 2).reshape(b, c, hh, ww),)


class TinyFlowPipe:
    def __init__(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        torch.manual_seed(0)
        self.transformer = TinyMMDiT().eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)

    @torch.no_grad()
    def __call__(self, batch_size=1, num_inference_steps=6, generator=None, output_type="np"):
        self.scheduler.set_timesteps(num_inference_steps)
        x = torch.randn(batch_size, 4, 8, 8, generator=generator)
        for t in self.scheduler.timesteps:
            v = self.transformer(x, t.expand(batch_size))[0]
            x = self.scheduler.step(v, t, x).prev_sample
        return dataclasses.make_dataclass("Out", ["images"])(x.numpy())


def test_user_described_family():
    pipe = TinyFlowPipe()
    with pytest.raises(TypeError, match="TinyMMDiT"):
        adapter_for(pipe.transformer)
    desc = TransformerDescription(
        name="tiny-mmdit", classes=("TinyMMDiT",),
        stacks=(BlockStack("layers", streams=("x", "ctx"), returns=("x", "ctx")),),
        conditioning=("temb",), first_layers=("embed",), last_layers=("out",), float_layers=("layers.*.mod", "time"))
    register(desc)
    try:
        run = lambda: pipe(batch_size=2, generator=torch.Generator().manual_seed(1)).images
        ref = run()
        cfg = cq.CacheQuantConfig(interval=2, schedule="dps", calib_batch_size=2, dps_samples=2)
        plan = cq.calibrate(pipe, cfg, num_inference_steps=6, num_samples=2, progress=False)
        assert plan.info["adapter"] == "tiny-mmdit" and plan.tensors["cache_dec"].shape == (2, 6, 32)
        assert set(plan.diagnostics["layers_kept_float"]) == {"time", "layers.0.mod", "layers.1.mod", "layers.2.mod",
                                                                "embed", "out"}  # + first and last (quant_io)
        cq.accelerate(pipe, plan)
        out = run()
        cq.restore(pipe)
        assert np.isfinite(out).all() and 0 < _rel(out, ref) < 0.5
        np.testing.assert_array_equal(run(), ref)
    finally:
        unregister(desc)


def test_bad_descriptions_are_refused_early():
    with pytest.raises(ValueError, match="returns"):
        BlockStack("layers", streams=("x", "ctx"))
    with pytest.raises(ValueError, match="order"):
        BlockStack("layers", streams=("x", "ctx"), returns=("x", "y"))
    with pytest.raises(TypeError, match="BlockStack"):
        TransformerDescription(name="bad", classes=("X",), stacks=("layers",))
    with pytest.raises(TypeError, match="Adapter or a TransformerDescription"):
        register("TinyMMDiT")
    model = TinyMMDiT()
    cfg = cq.CacheQuantConfig(interval=2)
    wrong = TransformerDescription(name="w", classes=("TinyMMDiT",), stacks=(BlockStack("layers", streams=("h",)),))
    with pytest.raises(ValueError, match="no parameter h"):
        wrong.resolve_site(model, cfg)
    missing = TransformerDescription(name="m", classes=("TinyMMDiT",), stacks=(BlockStack("blocks"),))
    with pytest.raises(ValueError, match="no module 'blocks'"):
        missing.resolve_site(model, cfg)


def test_mmdit_training_script_smoke(tmp_path, monkeypatch):
    """``scripts/train_cifar.py --model mmdit`` (the ``cifar10-mmdit`` recipe): two flow-matching
    steps on four images, an export that loads as an SD3 transformer cachequant describes."""
    import runpy
    import sys
    from pathlib import Path

    from diffusers import SD3Transformer2DModel

    from conftest import mini_cifar_zip

    data = mini_cifar_zip(tmp_path)
    script = Path(__file__).parents[1] / "scripts" / "train_cifar.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--model", "mmdit", "--data", str(data), "--iters", "2",
                                      "--batch", "4", "--out", str(tmp_path / "ck"), "--export", str(tmp_path / "ex")])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    model = SD3Transformer2DModel.from_pretrained(tmp_path / "ex")
    assert sum(p.numel() for p in model.parameters()) <= 8_000_000
    site = adapter_for(model).resolve_site(model, cq.CacheQuantConfig(interval=2))
    assert site["span"] == [1, 5]


@pytest.mark.parametrize("family", ["tiny-flux", "tiny-sd3"])
def test_fused_qkv_projections_keep_8bit_attention_and_compute_the_same(family):
    """``transformer.fuse_qkv_projections()`` before calibrating: one GEMM for q, k and v of each
    stream, the attention matmuls still 8-bit, and the W8A8 latents those of the unfused model (the
    three projections share their input, so the fused layer's ranges and weight grids are theirs)."""
    def run(fuse):
        pipe, kw = TINY_FAMILIES[family]()
        if fuse:
            pipe.transformer.fuse_qkv_projections()
        plan = _calibrate(pipe, kw, interval=2, schedule="uniform", weight_bits=8, act_bits=8, dec=False)
        cq.accelerate(pipe, plan)
        return plan, _latents(pipe, kw)

    (plan_f, fused), (plan_u, unfused) = run(True), run(False)
    names = {s.name for s in plan_f.quant.layers}
    assert any(n.endswith(".to_qkv") for n in names) and not any(n.endswith(".to_k") for n in names)
    assert plan_f.quant.attention == plan_u.quant.attention and plan_f.quant.attention
    assert "attention_kept_float" not in plan_f.diagnostics
    assert _rel(fused, unfused) < 1e-3
