"""PixArt's transformer through the same adapter, driven by a minimal sampling loop.

(A real PixArt pipeline needs a T5 text encoder; the adapter only sees the transformer, so a small
loop with fixed caption embeddings exercises exactly the same code.)
"""

from types import SimpleNamespace

import numpy as np
import torch

import cachequant as cq
from cachequant.models.tiny import make_scheduler


class MiniPixArtPipe:
    def __init__(self):
        from diffusers import PixArtTransformer2DModel

        torch.manual_seed(0)
        self.transformer = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
            cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12,
            norm_type="ada_norm_single", use_additional_conditions=False).eval()
        self.scheduler = make_scheduler("dpm")
        self.captions = torch.randn(1, 5, 12)

    @torch.no_grad()
    def __call__(self, batch_size=1, num_inference_steps=10, generator=None, output_type="np"):
        self.scheduler.set_timesteps(num_inference_steps)
        x = torch.randn(batch_size, 4, 8, 8, generator=generator)
        cond = self.captions.expand(batch_size, -1, -1)
        for t in self.scheduler.timesteps:
            out = self.transformer(x, encoder_hidden_states=cond, timestep=t.expand(batch_size),
                                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            x = self.scheduler.step(out[:, :4], t, x).prev_sample
        return SimpleNamespace(images=x.numpy())


def _run(pipe):
    return pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(3)).images


def test_pixart_identity_cache_quant_restore():
    pipe = MiniPixArtPipe()
    ref = _run(pipe)
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    plan = cq.calibrate(pipe, cq.CacheQuantConfig(interval=1, schedule="uniform", weight_bits=None, act_bits=None),
                        num_inference_steps=6, progress=False, num_samples=2)
    cq.accelerate(pipe, plan)
    np.testing.assert_array_equal(_run(pipe), ref)
    cq.restore(pipe)

    cfg = cq.CacheQuantConfig(interval=2, schedule="dps", calib_batch_size=2, dps_samples=2)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=6, progress=False, num_samples=2)
    assert plan.cache.site["span"] == [1, 3] and plan.tensors["cache_dec"].shape == (2, 6, 16)
    cq.accelerate(pipe, plan)
    ran = []
    pipe.transformer.transformer_blocks[2].attn1.register_forward_hook(lambda *a: ran.append(1))
    out = _run(pipe)
    assert len(ran) == len(plan.schedule) and np.isfinite(out).all()
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.5, rel
    cq.restore(pipe)
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, state[k])
    np.testing.assert_array_equal(_run(pipe), ref)
