"""Quantizers and quantized layers: real error properties, not smoke."""

import numpy as np
import pytest
import torch

import cachequant as cq
from cachequant.quant.layer import quant_hooks
from cachequant.quant.observers import RangeObserver
from cachequant.quant.quantizer import activation_range, fake_quant, params_from_range, weight_qparams
from conftest import calib_kwargs, run


def test_weight_mse_search_beats_minmax_and_4bit_is_worse():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[:, 0] *= 8  # outliers, as in real layers
    errs = {}
    for bits in (8, 4):
        s, z = weight_qparams(w, bits)
        errs[bits] = float((fake_quant(w, s, z, bits) - w).pow(2).mean())
        s0, z0 = params_from_range(w.min(1).values[:, None], w.max(1).values[:, None], bits)
        minmax = float((fake_quant(w, s0, z0, bits) - w).pow(2).mean())
        assert errs[bits] <= minmax
        if bits == 4:  # at 4 bits clipping the outliers pays off clearly
            assert errs[bits] < 0.97 * minmax
    assert errs[4] > 10 * errs[8]


def test_per_step_ranges_beat_one_global_range_when_scale_drifts():
    """Activations whose scale drifts over the trajectory (as in diffusion): per-step ranges win."""
    torch.manual_seed(0)
    T = 10
    scales = torch.logspace(-1, 1, T)  # 0.1 .. 10 across the trajectory
    xs = [torch.randn(64, 32) * scales[t] + 0.5 * scales[t] for t in range(T)]
    obs = RangeObserver(8)
    for t in range(T):
        obs.observe(xs[t], t, 0)
    errors = {}
    for per_step in (True, False):
        table = obs.table(T, per_step=per_step)
        err = 0.0
        for t in range(T):
            q = fake_quant(xs[t], table[0, t], table[1, t], 8)
            err += float(((q - xs[t]) ** 2).mean() / scales[t] ** 2)  # relative error per step
        errors[per_step] = err / T
    assert errors[True] < 0.1 * errors[False]


def _outlier_tokens(entries: int) -> torch.Tensor:
    """DiT-like (B, 256 tokens, 240 channels) activations, three channels carrying large values."""
    x = torch.randn(entries, 256, 240, generator=torch.Generator().manual_seed(1))
    x[..., [7, 100, 201]] *= 40.0
    return x


def _range_error(x: torch.Tensor, lo: float, hi: float) -> float:
    s, z = params_from_range(torch.tensor(lo), torch.tensor(hi), 8)
    return float((x - fake_quant(x, s, z, 8)).abs().pow(2.4).mean())


def test_activation_range_sees_every_channel_whatever_the_entry_count():
    """The error of each candidate range is measured on a subsample; a strided one aliases with the
    channel axis (with 17 entries, stride 64 visits 15 of 240 channels and misses the outliers), so
    the range would depend on the entry count. For both counts the chosen range must be as good on
    the whole tensor as the whole-tensor search's, and the two counts must agree."""
    his = {}
    for entries in (16, 17):
        x = _outlier_tokens(entries)
        lo, hi = activation_range(x, 8)
        lo_full, hi_full = activation_range(x, 8, max_elems=x.numel())
        assert _range_error(x, lo, hi) < 1.05 * _range_error(x, lo_full, hi_full), (entries, hi, hi_full)
        his[entries] = hi
    assert his[16] == pytest.approx(his[17], rel=0.05)
    # a strided subsample of the 17-entry tensor indeed misses the outlier channels
    stride = 17 * 256 * 240 // (1 << 14) + 1
    assert not {(k * stride) % 240 for k in range(17 * 256 * 240 // stride)} & {7, 100, 201}


def test_range_table_fills_unobserved_positions_from_the_nearest():
    obs = RangeObserver(8)
    obs.observe(torch.linspace(-1, 1, 100), 2, 0)
    obs.observe(torch.linspace(-4, 4, 100), 5, 0)
    table = obs.table(7, begin=1)
    assert torch.equal(table[:, 0], torch.tensor([1.0, 0.0]))  # before the first position: never run
    assert torch.equal(table[:, 1], table[:, 2]) and torch.equal(table[:, 3], table[:, 2])
    assert torch.equal(table[:, 4], table[:, 5]) and torch.equal(table[:, 6], table[:, 5])
    assert table[0, 5] > 3 * table[0, 2]


def _denoiser_error(kind, make_pipe, weight_bits, steps=6):
    """Relative L2 error of the quantized denoiser's output on the full-precision trajectory's inputs."""
    pipe = make_pipe(kind)
    model = pipe.unet if kind == "ddim" else pipe.transformer
    inputs = []
    h = model.register_forward_pre_hook(lambda m, a, k: inputs.append((a, k)), with_kwargs=True)
    run(pipe, kind, steps=steps, seed=123, n=2)
    h.remove()
    with torch.no_grad():
        ref = [model(*a, **k)[0] for a, k in inputs]
    cfg = cq.CacheQuantConfig(interval=1, schedule="uniform", weight_bits=weight_bits, act_bits=8, dec=False,
                              calib_batch_size=4)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=steps, progress=False, **calib_kwargs(kind, 8))
    cq.accelerate(pipe, plan)
    errs = []
    with torch.no_grad():
        for i, ((a, k), r) in enumerate(zip(inputs, ref)):
            cq.set_step(pipe, i)  # driving the model directly: each call at its position
            errs.append(float((model(*a, **k)[0] - r).norm() / r.norm()))
    return float(np.mean(errs))


@pytest.mark.parametrize("kind", ["ddim", "dit"])
def test_w8a8_error_small_and_w4a8_larger(kind, make_pipe):
    e8 = _denoiser_error(kind, make_pipe, 8)
    e4 = _denoiser_error(kind, make_pipe, 4)
    assert e8 < 0.08, e8  # random-weight tiny models: ~1.5 % (DiT) and ~5 % (UNet) measured
    assert e4 > 2 * e8, (e4, e8)


def test_w4_keeps_first_and_last_layers_at_8_bits(make_pipe):
    pipe = make_pipe("ddim")  # quant_io: quantized at all (by default they stay float)
    cfg = cq.CacheQuantConfig(interval=1, schedule="uniform", weight_bits=4, act_bits=8, calib_batch_size=2,
                              quant_io=True)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=3, progress=False, num_samples=2)
    bits = {layer.name: layer.weight_bits for layer in plan.quant.layers}
    assert bits["conv_in"] == 8 and bits["conv_out"] == 8
    assert bits["mid_block.resnets.0.conv1"] == 4
    # skip-concatenated inputs get split quantizers
    splits = {layer.name: layer.split for layer in plan.quant.layers if layer.split}
    assert splits["up_blocks.2.resnets.0.conv1"] == 32 and splits["up_blocks.2.resnets.1.conv1"] == 16
    assert plan.tensors["act.up_blocks.2.resnets.0.conv1"].shape == (2, 2, 3)  # (parts, scale/zero, positions)


def test_w8_layers_mixed_precision_round_trips_and_rejects_typos(make_pipe, tmp_path):
    pipe = make_pipe("ddim")
    cfg = cq.CacheQuantConfig(interval=1, schedule="uniform", weight_bits=4, act_bits=8, calib_batch_size=2,
                              w8_layers=("mid_block.*", "*.time_emb_proj"), quant_io=True)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=3, progress=False, num_samples=2)
    bits = {layer.name: layer.weight_bits for layer in plan.quant.layers}
    assert bits["mid_block.resnets.0.conv1"] == 8 and bits["down_blocks.0.resnets.0.time_emb_proj"] == 8
    assert bits["down_blocks.0.resnets.0.conv1"] == 4 and bits["conv_in"] == 8
    plan.save(tmp_path / "p.cqplan")
    again = cq.load_plan(tmp_path / "p.cqplan")
    assert again.config.w8_layers == ("mid_block.*", "*.time_emb_proj")
    # the 8-bit layers really carry 8-bit weight codes once applied
    cq.accelerate(pipe, again)
    layers = {n: h for n, (m, h) in quant_hooks(pipe.unet).items()}
    assert layers["mid_block.resnets.0.conv1"].weight_bits == 8 and layers["up_blocks.0.resnets.0.conv1"].weight_bits == 4
    cq.restore(pipe)
    with pytest.raises(ValueError, match="match no Linear"):
        cq.calibrate(pipe, cq.CacheQuantConfig(interval=1, weight_bits=4, w8_layers=("mid_blok.*",)),
                     num_inference_steps=3, progress=False, num_samples=2)
    with pytest.raises(ValueError, match="only applies to 4-bit"):
        cq.CacheQuantConfig(weight_bits=8, w8_layers=("mid_block.*",))
    with pytest.raises(ValueError, match="sequence of non-empty"):
        cq.CacheQuantConfig(weight_bits=4, w8_layers="mid_block.*")


def test_float_layers_stay_float_round_trip_and_reject_typos(make_pipe, tmp_path):
    pipe = make_pipe("ddim")
    cfg = cq.CacheQuantConfig(interval=1, schedule="uniform", calib_batch_size=2,
                              float_layers=("up_blocks.0.resnets.*.conv1", "conv_out"))
    plan = cq.calibrate(pipe, cfg, num_inference_steps=3, progress=False, num_samples=2)
    names = {layer.name for layer in plan.quant.layers}
    kept = {"up_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.1.conv1", "conv_out"}
    assert not names & kept and "up_blocks.0.resnets.0.conv2" in names
    assert kept <= set(plan.diagnostics["layers_kept_float"])
    plan.save(tmp_path / "p.cqplan")
    again = cq.load_plan(tmp_path / "p.cqplan")
    assert again.config.float_layers == ("up_blocks.0.resnets.*.conv1", "conv_out")
    cq.accelerate(pipe, again)
    hooked = set(quant_hooks(pipe.unet))
    assert not hooked & kept and "up_blocks.0.resnets.0.conv2" in hooked
    # a float layer computes its float op; a quantized neighbour does not
    x = torch.randn(1, pipe.unet.conv_out.in_channels, 8, 8)
    conv = pipe.unet.conv_out
    assert torch.equal(conv(x), conv._conv_forward(x, conv.weight, conv.bias))
    q = pipe.unet.get_submodule("up_blocks.0.resnets.0.conv2")
    xq = torch.randn(1, q.in_channels, 8, 8)
    assert not torch.equal(q(xq), q._conv_forward(xq, q.weight, q.bias))
    cq.restore(pipe)
    with pytest.raises(ValueError, match="float_layers pattern.*match no Linear"):
        cq.calibrate(pipe, cq.CacheQuantConfig(interval=1, float_layers=("up_blcks.*",)),
                     num_inference_steps=3, progress=False, num_samples=2)
    with pytest.raises(ValueError, match="needs quantization"):
        cq.CacheQuantConfig(weight_bits=None, act_bits=None, float_layers=("conv_out",))
    with pytest.raises(ValueError, match="sequence of non-empty"):
        cq.CacheQuantConfig(float_layers="conv_out")


def test_first_and_last_layers_stay_float_unless_quant_io(make_pipe, tmp_path):
    """By default the layer reading the noisy sample and the one writing the prediction stay float
    (CacheQuantConfig.quant_io); quant_io=True quantizes them too, and a plan written before the
    field existed, which quantized them, reads as quant_io=True."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    for kind, io, kw in (("ddim", {"conv_in", "conv_out"}, {"num_samples": 2}),
                         ("dit", {"pos_embed.proj", "proj_out_2"}, {"class_labels": [0, 1]})):
        pipe = make_pipe(kind)
        plans = {q: cq.calibrate(pipe, cq.CacheQuantConfig(interval=1, schedule="uniform", calib_batch_size=2,
                                                           quant_io=q), num_inference_steps=3, progress=False, **kw)
                 for q in (False, True)}
        names = {q: {layer.name for layer in p.quant.layers} for q, p in plans.items()}
        assert io <= names[True] and not io & names[False], kind
        assert names[True] - names[False] == io, kind
        assert io <= set(plans[False].diagnostics["layers_kept_float"])
        cq.accelerate(pipe, plans[False])
        assert not io & set(quant_hooks(pipe.unet if kind == "ddim" else pipe.transformer))
        cq.restore(pipe)

    path = tmp_path / "old.cqplan"
    plans[True].save(path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = json.loads(f.metadata()["cachequant"]), {k: f.get_tensor(k) for k in f.keys()}
    del meta["config"]["quant_io"]
    save_file(tensors, str(path), metadata={"cachequant": json.dumps(meta)})
    assert cq.load_plan(path).config.quant_io is True
    assert cq.CacheQuantConfig().quant_io is False


def test_attention_matmuls_are_quantized(make_pipe):
    pipe = make_pipe("dit")
    cfg = cq.CacheQuantConfig(interval=1, schedule="uniform", calib_batch_size=2)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=3, progress=False, class_labels=[0, 1])
    attn = plan.quant.attention
    assert len(attn) == 4
    t = plan.tensors[f"attn.{attn[0]}"]
    assert t.shape == (4, 2, 3)  # q, k, softmax, v x (scale, zero point) x positions
    assert bool((t[:, 0] != 1).all())  # a range per step, all calibrated


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_fused_qkv_projections_quantize_as_one_layer_like_the_three(kind, make_pipe):
    """``pipe.fuse_qkv_projections()`` before calibrating: q, k and v come from one ``to_qkv`` GEMM
    (k and v from one ``to_kv`` in cross-attention), and its attention keeps 8-bit matmuls. The three
    projections read the same input, so their per-step input ranges and per-output-channel weight
    grids are those of the one fused layer: the fused 8-bit model computes what the unfused one does."""
    def sample(fuse):
        pipe = make_pipe(kind)
        if fuse and kind == "sd":
            pipe.fuse_qkv_projections()
        elif fuse:  # DiTTransformer2DModel has no fuse_qkv_projections(): what it does, module by module
            from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

            for m in pipe.transformer.modules():
                if isinstance(m, Attention):
                    m.fuse_projections()
                    m.set_processor(FusedAttnProcessor2_0())
        cal = {"prompts": ["a cat", "a dog"]} if kind == "sd" else {"class_labels": [0, 1]}
        kw = {"prompt": ["a cat", "a dog"]} if kind == "sd" else {"class_labels": [0, 1]}
        cfg = cq.CacheQuantConfig(interval=2, schedule="uniform", calib_batch_size=2, dps_samples=2)
        plan = cq.calibrate(pipe, cfg, num_inference_steps=4, progress=False, **cal)
        cq.accelerate(pipe, plan)
        out = pipe(**kw, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
        return plan, out

    plan_f, fused = sample(True)
    plan_u, unfused = sample(False)
    names = [s.name for s in plan_f.quant.layers]
    assert any(n.endswith("to_qkv") for n in names) and not any(n.endswith(".to_q") and "attn1" in n for n in names)
    assert plan_f.quant.attention == plan_u.quant.attention and len(plan_f.quant.attention) > 0
    assert "attention_kept_float" not in plan_f.diagnostics
    np.testing.assert_allclose(fused, unfused, atol=2e-3)
