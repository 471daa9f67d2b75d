"""The shipped CIFAR-10 models load offline and sample; the training script runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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


def test_training_script_runs_on_cpu_and_resumes_from_pieces(tmp_path):
    """Two steps, a checkpoint in manifest-checked pieces (optimizer moments in bf16), two more steps
    resumed from it: the step count, the curve and the weights carry over."""
    from conftest import mini_cifar_zip

    data = mini_cifar_zip(tmp_path)
    script = Path(__file__).parents[1] / "scripts" / "train_cifar.py"

    def run(*extra):
        r = subprocess.run([sys.executable, str(script), "--model", "dit", "--data", str(data), "--batch", "4",
                            "--out", str(tmp_path / "ck"), "--export", str(tmp_path / "ex"), *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads((tmp_path / "ck" / "train_info.json").read_text())

    info = run("--iters", "2")
    assert info["iterations"] == 2 and info["images_seen"] == 8
    manifest = json.loads((tmp_path / "ck" / "ckpt" / "manifest.json").read_text())
    assert all((tmp_path / "ck" / "ckpt" / p["name"]).is_file() for p in manifest["pieces"])
    assert (tmp_path / "ex" / "diffusion_pytorch_model.safetensors").is_file()
    train = _train_module()
    ck = train.load_checkpoint(tmp_path / "ck" / "ckpt")
    moments = [v for s in ck["opt"]["state"].values() for k, v in s.items() if k.startswith("exp_avg")]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)
    first = {k: v.clone() for k, v in ck["model"].items()}
    info = run("--iters", "4", "--resume", str(tmp_path / "ck" / "ckpt"))
    assert info["iterations"] == 4 and info["images_seen"] == 16
    assert [(r["from_step"], r["to_step"], r["batch"]) for r in info["runs"]] == [(0, 2, 4), (2, 4, 4)]
    again = train.load_checkpoint(tmp_path / "ck" / "ckpt")
    assert again["step"] == 4 and any(not torch.equal(first[k], again["model"][k]) for k in first)


def test_training_continues_from_an_fp16_export_and_refuses_a_mismatch(tmp_path):
    """``--init`` starts from an export: the weights begin at its fp16 EMA, the step and image counts
    and the list of runs carry on; --init with --resume, or an export of another model, is refused."""
    from conftest import mini_cifar_zip

    data = mini_cifar_zip(tmp_path)
    script = Path(__file__).parents[1] / "scripts" / "train_cifar.py"

    def run(model, out, *extra):
        return subprocess.run([sys.executable, str(script), "--model", model, "--data", str(data), "--batch", "4",
                               "--out", str(tmp_path / out), *extra], capture_output=True, text=True, timeout=300)

    r = run("dit", "a", "--iters", "3", "--export", str(tmp_path / "ex"))
    assert r.returncode == 0, r.stderr[-2000:]
    train = _train_module()
    model = train.build("dit")
    weights, info = train.load_export(tmp_path / "ex", "dit", model)
    assert info["iterations"] == 3 and all(v.dtype == torch.float32 for v in weights.values())
    r = run("dit", "b", "--iters", "5", "--init", str(tmp_path / "ex"), "--export", str(tmp_path / "ex2"))
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((tmp_path / "b" / "train_info.json").read_text())
    assert info["iterations"] == 5 and info["images_seen"] == 20
    assert [(x["from_step"], x["to_step"]) for x in info["runs"]] == [(0, 3), (3, 5)]
    again, _ = train.load_export(tmp_path / "ex2", "dit", model)
    assert any(not torch.equal(weights[k], again[k]) for k in weights)  # it trained from there

    r = run("dit", "c", "--iters", "4", "--init", str(tmp_path / "ex"), "--resume", str(tmp_path / "a" / "ckpt"))
    assert r.returncode != 0 and "--resume and --init" in r.stderr
    r = run("unet", "d", "--iters", "4", "--init", str(tmp_path / "ex"))
    assert r.returncode != 0 and "holds a dit export, not --model unet" in r.stderr
    (tmp_path / "ex" / "train_info.json").unlink()
    with pytest.raises(SystemExit, match="do not fit --model unet"):
        train.load_export(tmp_path / "ex", "unet", train.build("unet"))
    with pytest.raises(SystemExit, match="expected an fp16 export"):
        train.load_export(tmp_path, "dit", model)


def _train_module():
    import importlib.util

    script = Path(__file__).parents[1] / "scripts" / "train_cifar.py"
    spec = importlib.util.spec_from_file_location("train_cifar", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_checkpoint_pieces_round_trip_and_refuse_damage(tmp_path):
    """Pieces of at most the given size rejoin to the same state; a damaged or missing piece is
    refused with a message that names it, and a save replaces the previous checkpoint whole."""
    train = _train_module()
    state = {"w": torch.randn(1000), "step": 7}
    folder = train.save_checkpoint(state, tmp_path / "ckpt", piece_bytes=1024)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["pieces"]) > 2 and all(p["bytes"] <= 1024 for p in manifest["pieces"])
    back = train.load_checkpoint(folder)
    assert back["step"] == 7 and torch.equal(back["w"], state["w"])
    train.save_checkpoint({"w": torch.zeros(3), "step": 8}, folder, piece_bytes=1024)
    assert train.load_checkpoint(folder)["step"] == 8 and not (tmp_path / "ckpt.old").exists()
    piece = folder / json.loads((folder / "manifest.json").read_text())["pieces"][0]["name"]
    piece.write_bytes(b"x" + piece.read_bytes()[1:])
    with pytest.raises(SystemExit, match="piece00.bin does not match"):
        train.load_checkpoint(folder)
    piece.unlink()
    with pytest.raises(SystemExit, match="piece00.bin is missing"):
        train.load_checkpoint(folder)


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


def test_zoo_model_with_other_weights(tmp_path):
    """``weights=`` swaps a shipped model's weights for a folder of the same class (a retraining
    checkpoint), keeping its pipeline and sampler; a folder of another class or without weights is
    refused, saying why."""
    shipped = cq.zoo.load_pipeline("cifar10-unet")
    unet = shipped.unet
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    unet.save_pretrained(tmp_path / "mine")
    pipe = cq.zoo.load_pipeline("cifar10-unet", weights=tmp_path / "mine")
    assert type(pipe) is type(shipped) and type(pipe.scheduler) is type(shipped.scheduler)
    assert torch.equal(pipe.unet.conv_out.bias, unet.conv_out.bias)
    assert not torch.equal(pipe.unet.conv_out.bias, cq.zoo.load_pipeline("cifar10-unet").unet.conv_out.bias)
    with pytest.raises(ValueError, match="holds a UNet2DModel, but cifar10-dit is a DiTTransformer2DModel"):
        cq.zoo.load_pipeline("cifar10-dit", weights=tmp_path / "mine")
    with pytest.raises(FileNotFoundError, match="expected config.json and diffusion_pytorch_model.safetensors"):
        cq.zoo.load_pipeline("cifar10-unet", weights=tmp_path)


def test_run_records_name_the_weights_unless_they_are_the_first_shipped():
    """Records made before weights were recorded meant each model's first weights: those add
    nothing to a record, so the records stay valid; the retrained DiT the zoo ships now (and any
    other weights) is named by SHA-1, so its samples are never taken for the first DiT's."""
    first_dit = Path(__file__).parents[1] / "results" / "training" / "weights" / "cifar10-dit-1.6M"
    assert cq.zoo.weights_sha1("cifar10-dit", first_dit) == cq.zoo.FIRST_WEIGHTS_SHA1["cifar10-dit"]
    assert cq.zoo.weights_record("cifar10-dit", first_dit) == {}
    assert cq.zoo.weights_record("cifar10-unet") == {} and cq.zoo.weights_record("cifar10-mmdit") == {}
    shipped_dit = cq.zoo.weights_record("cifar10-dit")
    assert len(shipped_dit["weights_sha1"]) == 40
    assert shipped_dit["weights_sha1"] != cq.zoo.FIRST_WEIGHTS_SHA1["cifar10-dit"]
    with pytest.raises(ValueError, match="unknown zoo model"):
        cq.zoo.weights_sha1("tiny-ddim")
