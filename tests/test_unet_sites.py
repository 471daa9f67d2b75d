"""UNet cache sites: whole up blocks (``cache_branch``) or any number of up layers (``cache_layers``).

The property that makes a site correct: on a step whose cached feature is fresh (stored by the
full forward at the same inputs), the cached forward must give the full forward's output exactly,
so every skip feature, attention call and upsampler runs as the block's own forward runs it.
"""

import pytest
import torch

import cachequant as cq
from cachequant.models.adapters import adapter_for
from cachequant.session import Session
from conftest import calib_kwargs, run


def _sd_like():
    """SD 1.5's block layout in miniature: cross-attention in the last up blocks, 3 layers each."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def _models():
    from cachequant.models.tiny import tiny_ddim_pipeline, tiny_sd_pipeline

    return {"unet2d": tiny_ddim_pipeline().unet, "tiny-sd": tiny_sd_pipeline().unet, "sd-like": _sd_like()}


MODELS = _models()


def _inputs(name, model, odd=False):
    g = torch.Generator().manual_seed(1)
    hw = (10, 6) if odd else (model.config.sample_size,) * 2  # odd: diffusers forwards upsample sizes
    x = torch.randn(2, model.config.in_channels, *hw, generator=g)
    kw = {"timestep": torch.tensor([500, 20])}
    if name != "unet2d":
        kw["encoder_hidden_states"] = torch.randn(2, 5, model.config.cross_attention_dim, generator=g)
    return x, kw


def _full_vs_cached(name, site, odd=False):
    """The model's output on a full call, then on a cached call at the same inputs."""
    model = MODELS[name]
    sess = Session.open(model, [1.0, 0.0], full_steps=[0], begin=0, scheduler_name="-", num_inference_steps=2,
                        guard=False)
    try:
        sess.add_cache(adapter_for(model).layout(model, site))
        x, kw = _inputs(name, model, odd)
        sess.clock.start_run()
        with torch.no_grad():
            sess.clock.set(0)
            full = model(x, **kw).sample
            sess.clock.set(1)
            assert sess.clock.mode == "cached"
            cached = model(x, **kw).sample
    finally:
        sess.close()
    return full, cached


def _total_up_layers(model):
    return sum(len(b.resnets) for b in model.up_blocks)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_layer_site_reproduces_the_full_forward_from_a_fresh_cache(name):
    model = MODELS[name]
    for layers in range(1, _total_up_layers(model)):
        site = adapter_for(model).resolve_site(model, cq.CacheQuantConfig(cache_layers=layers))
        full, cached = _full_vs_cached(name, site)
        torch.testing.assert_close(cached, full, rtol=0, atol=0, msg=f"cache_layers={layers}: {site}")


def test_odd_sizes_forward_the_upsample_size_through_a_split_block():
    model = MODELS["sd-like"]
    for layers in (2, 4, 5):  # split blocks: the last, the middle one
        site = adapter_for(model).resolve_site(model, cq.CacheQuantConfig(cache_layers=layers))
        full, cached = _full_vs_cached("sd-like", site, odd=True)
        torch.testing.assert_close(cached, full, rtol=0, atol=0)


def test_sites_name_their_feature_and_default_per_class():
    sd, ddpm = MODELS["sd-like"], MODELS["unet2d"]
    resolve = adapter_for(sd).resolve_site
    assert resolve(sd, cq.CacheQuantConfig()) == {"layers": 1, "feature": "up_blocks.2.attentions.1"}
    assert resolve(sd, cq.CacheQuantConfig(cache_branch=1)) == {"layers": 3, "feature": "up_blocks.1.upsamplers.0"}
    assert resolve(sd, cq.CacheQuantConfig(cache_layers=3)) == resolve(sd, cq.CacheQuantConfig(cache_branch=1))
    assert resolve(ddpm, cq.CacheQuantConfig()) == {"layers": 2, "feature": "up_blocks.1.upsamplers.0"}
    assert resolve(ddpm, cq.CacheQuantConfig(cache_layers=1))["feature"] == "up_blocks.2.resnets.0"
    # the quantization-DEC consumers are the first layer reading the cached feature
    assert set(adapter_for(sd).cache_consumers(sd, resolve(sd, cq.CacheQuantConfig()))) == {
        "up_blocks.2.resnets.2.conv1", "up_blocks.2.resnets.2.conv_shortcut"}


def test_layout_skips_everything_deep_and_nothing_shallow():
    """SD's default site: the last up layer, conv_in and the head are live; every other resnet,
    attention, sampler and the mid block is skipped, the boundary last of all."""
    model = MODELS["sd-like"]
    layout = adapter_for(model).layout(model, {"layers": 1})
    assert layout.boundary == layout.modules[-1] == "up_blocks.2.attentions.1"
    live = {"up_blocks.2.resnets.2", "up_blocks.2.attentions.2"}
    units = {n for n, m in model.named_modules() if n.count(".") == 3 and n.split(".")[2] in
             ("resnets", "attentions", "downsamplers", "upsamplers")}
    assert set(layout.modules) == (units - live) | {"mid_block"}


@pytest.mark.parametrize("kw, match", [
    ({"cache_branch": 1, "cache_layers": 1}, "not both"),
    ({"cache_layers": 0}, "integer >= 1"),
    ({"cache_branch": True}, "integer >= 1"),
])
def test_bad_site_configs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        cq.CacheQuantConfig(**kw)


def test_site_out_of_range_names_the_limit():
    model = MODELS["sd-like"]
    with pytest.raises(ValueError, match=r"cache_layers must be in \[1, 8\]"):
        adapter_for(model).resolve_site(model, cq.CacheQuantConfig(cache_layers=9))
    with pytest.raises(ValueError, match=r"cache_branch must be in \[1, 2\]"):
        adapter_for(model).resolve_site(model, cq.CacheQuantConfig(cache_branch=3))


def test_sd_default_cached_step_runs_one_up_layer(make_pipe):
    """SD's default site (DeepCache's shallowest branch): a cached step runs conv_in, the last up
    layer and the head; no down block and no other up layer."""
    pipe = make_pipe("sd")
    cfg = cq.CacheQuantConfig(interval=3, schedule="uniform", weight_bits=None, act_bits=None, dec=False)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=9, progress=False, **calib_kwargs("sd", 2))
    assert plan.cache.site["layers"] == 1
    unet = pipe.unet
    n_full = len(plan.schedule)
    watched = {"conv_in": unet.conv_in, "down0": unet.down_blocks[0].resnets[0].conv1,
               "last_up_first": unet.up_blocks[-1].resnets[0].conv1, "last_up_last": unet.up_blocks[-1].resnets[-1].conv1}
    calls = dict.fromkeys(watched, 0)
    for k, m in watched.items():
        m.register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1))
    cq.accelerate(pipe, plan)
    run(pipe, "sd", steps=9)
    n_calls = plan.num_calls
    assert calls == {"conv_in": n_calls, "down0": n_full, "last_up_first": n_full, "last_up_last": n_calls}
