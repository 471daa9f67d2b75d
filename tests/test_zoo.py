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
    assert cq.zoo.available() == ["cifar10-dit", "cifar10-unet"]
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
