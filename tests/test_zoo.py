"""The shipped CIFAR-10 models load offline and sample; the training script runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import cachequant as cq
from cachequant.zoo import WEIGHTS


def test_zoo_models_load_and_sample():
    assert cq.zoo.available() == ["cifar10-dit", "cifar10-mmdit", "cifar10-unet"]
    for name in cq.zoo.available():
        f = WEIGHTS / name / "diffusion_pytorch_model.safetensors"
        assert f.stat().st_size <= 16 * 2**20
    unet = cq.zoo.load_pipeline("cifar10-unet")
    assert sum(p.numel() for p in unet.unet.parameters()) <= 8_000_000
    im = unet(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert im.shape == (2, 32, 32, 3) and 0 <= im.min() and im.max() <= 1
    dit = cq.zoo.load_pipeline("cifar10-dit")
    assert sum(p.numel() for p in dit.transformer.parameters()) <= 8_000_000
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = dit(class_labels=[3, 7], guidance_scale=1.0, num_inference_steps=2, generator=g(), output_type="np").images
    b = dit(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=2, generator=g(), output_type="np").images
    assert a.shape == (2, 32, 32, 3) and not np.allclose(a, b)  # guidance changes the result
    mm = cq.zoo.load_pipeline("cifar10-mmdit")
    assert sum(p.numel() for p in mm.transformer.parameters()) <= 8_000_000
    assert type(mm.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    im = mm(class_labels=[3, 7], num_inference_steps=2, generator=g(), output_type="np").images
    assert im.shape == (2, 32, 32, 3) and 0 <= im.min() and im.max() <= 1


def test_zoo_dit_accelerates(tmp_path):
    pipe = cq.zoo.load_pipeline("cifar10-dit")
    cfg = cq.CacheQuantConfig(interval=2, schedule="uniform", calib_batch_size=2, dps_samples=2)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=4, progress=False, class_labels=[0, 1])
    assert plan.info["calibration"]["inputs"] == "class"
    cq.accelerate(pipe, plan)
    im = pipe(class_labels=[0, 1], num_inference_steps=4, output_type="np").images
    assert np.isfinite(im).all()


def test_training_script_runs_on_cpu(tmp_path):
    from conftest import mini_cifar_zip

    data = mini_cifar_zip(tmp_path)
    script = Path(__file__).parents[1] / "scripts" / "train_cifar.py"
    r = subprocess.run([sys.executable, str(script), "--model", "dit", "--data", str(data), "--iters", "2",
                        "--batch", "4", "--out", str(tmp_path / "ck"), "--export", str(tmp_path / "ex")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((tmp_path / "ck" / "train_info.json").read_text())
    assert info["iterations"] == 2 and (tmp_path / "ck" / "ckpt.pt").is_file()
    assert (tmp_path / "ex" / "diffusion_pytorch_model.safetensors").is_file()


def _tiny_mmdit_pipe():
    """The ``cifar10-mmdit`` pipeline around a small random SD3 transformer of the same interface."""
    from diffusers import SD3Transformer2DModel

    from cachequant.models.tiny import make_scheduler
    from cachequant.zoo.pipelines import NUM_LABELS, MMDiTPixelPipeline

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=3, num_layers=3,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=NUM_LABELS,
                                  caption_projection_dim=16, pooled_projection_dim=NUM_LABELS,
                                  pos_embed_max_size=4).eval()
    pipe = MMDiTPixelPipeline(transformer=model, scheduler=make_scheduler("flow-euler"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_mmdit_pipeline_samples_and_accelerates():
    """Rectified-flow sampling with CFG in one batch; labels outside the ten classes refused; the
    plan records the flow-matching sigmas (1 -> 0) and CacheQuant runs on it."""
    import pytest

    from cachequant.pipecall import num_classes

    pipe = _tiny_mmdit_pipe()
    assert num_classes(pipe) == 10
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = pipe(class_labels=[3, 7], guidance_scale=1.0, num_inference_steps=4, generator=g(), output_type="np").images
    b = pipe(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=4, generator=g(), output_type="np").images
    assert a.shape == (2, 8, 8, 3) and not np.allclose(a, b)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        pipe(class_labels=[10], num_inference_steps=2)
    cfg = cq.CacheQuantConfig(interval=2, schedule="uniform", calib_batch_size=2, dps_samples=2)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=4, progress=False, class_labels=[0, 1],
                        pipeline_kwargs={"guidance_scale": 1.5})
    assert plan.sampler.sigmas[0] == 1.0 and plan.sampler.sigmas[-1] == 0.0
    cq.accelerate(pipe, plan)
    c = pipe(class_labels=[3, 7], guidance_scale=1.5, num_inference_steps=4, generator=g(), output_type="np").images
    cq.restore(pipe)
    assert np.isfinite(c).all()


def test_zoo_refuses_a_sampler_the_model_was_not_trained_for():
    import pytest

    with pytest.raises(ValueError, match="flow-euler"):
        cq.zoo.load_pipeline("cifar10-unet", scheduler="flow-euler")
