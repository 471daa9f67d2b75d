"""Bad inputs, as a new user makes them: each gets one clear line early (exit status 2 on the
command line, a documented exception from the API), and no output file appears."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cachequant as cq
from cachequant.cli.main import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
GEN = ["generate", "--steps", "2", "--num-images", "1", "--quiet"]


@pytest.fixture(scope="module")
def ddim_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "ddim.cqplan"
    assert main(["calibrate", "--model", "tiny-ddim", "--steps", "2", "--interval", "2", "--bits", "w8a8",
                 "--num-samples", "2", "--batch-size", "2", "--quiet", "--out", str(path)]) == 0
    return path


def _cli(capsys, args, tmp_path):
    """Runs the command line in-process: (exit status, stderr, files created under tmp_path)."""
    before = set(tmp_path.rglob("*"))
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    return rc, err, sorted(str(p.relative_to(tmp_path)) for p in set(tmp_path.rglob("*")) - before)


CASES = [  # (id, arguments with {tmp}, message)
    ("euler-on-unconditional-unet", GEN + ["--model", "tiny-ddim", "--scheduler", "euler", "--out", "{tmp}/a.png"],
     "needs scaled model inputs"),
    ("prompt-on-unconditional", GEN + ["--model", "tiny-ddim", "--prompt", "a cat", "--out", "{tmp}/a.png"],
     "is unconditional: it takes no --prompt"),
    ("null-class-label", GEN + ["--model", "tiny-dit", "--class-labels", "1000", "--out", "{tmp}/a.png"],
     "1000 is not a class of this model"),
    ("negative-class-label", GEN + ["--model", "tiny-dit", "--class-labels", "-1", "--out", "{tmp}/a.png"],
     "-1 is not a class of this model"),
    ("class-label-not-a-number", GEN + ["--model", "tiny-dit", "--class-labels", "a,b", "--out", "{tmp}/a.png"],
     "argument --class-labels: expected comma-separated whole numbers"),
    ("prompt-on-class-model", GEN + ["--model", "tiny-dit", "--prompt", "a cat", "--out", "{tmp}/a.png"],
     "is class-conditional; give --class-labels"),
    ("text-model-without-prompt", GEN + ["--model", "tiny-sd", "--out", "{tmp}/a.png"],
     "is text-conditioned: give --prompt"),
    ("negative-scale", GEN + ["--model", "tiny-ddim", "--scale", "-2", "--out", "{tmp}/a.png"],
     "argument --scale: expected a whole number >= 1"),
    ("zero-images", GEN[:-3] + ["--num-images", "0", "--model", "tiny-ddim", "--out", "{tmp}/a.png"],
     "argument --num-images: expected a whole number >= 1"),
    ("zero-steps", ["demo", "--steps", "0"], "argument --steps: expected a whole number >= 1"),
    ("zero-interval", ["demo", "--interval", "0", "--out", "{tmp}/d.png"], "argument --interval: expected"),
    ("unknown-image-format", GEN + ["--model", "tiny-ddim", "--out", "{tmp}/a.gif"],
     "should end in .png or .jpg or .jpeg or .webp"),
    ("out-is-a-folder", GEN + ["--model", "tiny-ddim", "--out", "{tmp}"], "is a folder"),
    ("cuda-on-a-cpu-build", GEN + ["--model", "tiny-ddim", "--device", "cuda", "--out", "{tmp}/a.png"],
     "sees no CUDA GPU"),
    ("not-a-device", GEN + ["--model", "tiny-ddim", "--device", "tpu9", "--out", "{tmp}/a.png"], "is not a device"),
    ("not-a-pipeline-folder", GEN + ["--model", "{tmp}", "--out", "{tmp}/a.png"], "no model_index.json"),
    ("no-such-model", GEN + ["--model", "cifar11-unet", "--out", "{tmp}/a.png"], "neither a built-in model"),
    ("backend-without-plan", GEN + ["--model", "tiny-ddim", "--backend", "int8", "--out", "{tmp}/a.png"],
     "--backend set how a plan's quantized layers run: give --plan too"),
    ("missing-plan", GEN + ["--model", "tiny-ddim", "--plan", "{tmp}/none.cqplan", "--out", "{tmp}/a.png"],
     "--plan: .* does not exist"),
    ("zero-calibration-samples", ["calibrate", "--model", "tiny-ddim", "--num-samples", "0", "--out", "{tmp}/p.cqplan"],
     "argument --num-samples: expected a whole number >= 1"),
    ("plan-without-cqplan-suffix", ["calibrate", "--model", "tiny-ddim", "--out", "{tmp}/p.bin"],
     "should end in .cqplan"),
    ("missing-prompts-file", ["calibrate", "--model", "tiny-sd", "--prompts", "{tmp}/none.txt", "--out",
                              "{tmp}/p.cqplan"], "--prompts: .* does not exist"),
    ("prompts-and-labels", ["calibrate", "--model", "tiny-dit", "--prompts", "x", "--class-labels", "1", "--out",
                            "{tmp}/p.cqplan"], "not both"),
    ("w8-layers-with-w8a8", ["calibrate", "--model", "tiny-ddim", "--w8-layers", "conv_in", "--out",
                             "{tmp}/p.cqplan"], "w8_layers only applies to 4-bit weights"),
    ("float-layers-without-quantization", ["calibrate", "--model", "tiny-ddim", "--bits", "fp", "--float-layers",
                                           "conv_out", "--out", "{tmp}/p.cqplan"], "float_layers needs quantization"),
    ("float-layers-typo", ["calibrate", "--model", "tiny-ddim", "--float-layers", "up_blcks.*", "--out",
                           "{tmp}/p.cqplan"], r"float_layers pattern\(s\) \['up_blcks.\*'\] match no Linear"),
    ("vc-fit-without-vc", ["calibrate", "--model", "tiny-ddim", "--vc-fit", "closed", "--out", "{tmp}/p.cqplan"],
     "set vc=True as well"),
    ("e4m3-probs-without-quantization", ["calibrate", "--model", "tiny-ddim", "--bits", "fp", "--attention-probs",
                                         "e4m3", "--out", "{tmp}/p.cqplan"], "needs quant_attention=True and quantization"),
    ("tap-lambda-out-of-range", ["calibrate", "--model", "tiny-ddim", "--tap-lambda", "2", "--out", "{tmp}/p.cqplan"],
     "argument --tap-lambda: expected a number in"),
    ("evaluate-zero-samples", ["evaluate", "--model", "tiny-ddim", "--num-samples", "0", "--out-dir", "{tmp}/run"],
     "argument --num-samples"),
    ("evaluate-missing-ref-stats", ["evaluate", "--model", "tiny-ddim", "--num-samples", "2", "--ref-stats",
                                    "{tmp}/missing.npz", "--out-dir", "{tmp}/run"], "--ref-stats: .* does not exist"),
    ("evaluate-fp-dir-without-samples", ["evaluate", "--model", "tiny-ddim", "--num-samples", "2", "--fp-dir", "{tmp}",
                                         "--out-dir", "{tmp}/run"], "holds no samples.npz"),
    ("evaluate-tf32-on-cpu", ["evaluate", "--model", "tiny-ddim", "--num-samples", "2", "--matmul-tf32",
                              "--out-dir", "{tmp}/run"], "--matmul-tf32 sets how CUDA GPUs multiply"),
    ("weights-for-a-tiny-model", ["evaluate", "--model", "tiny-ddim", "--weights", "{tmp}", "--num-samples", "2",
                                  "--out-dir", "{tmp}/run"], "--weights replaces a shipped model's weights"),
    ("weights-folder-without-weights", ["calibrate", "--model", "cifar10-unet", "--weights", "{tmp}", "--out",
                                        "{tmp}/p.cqplan"], "--weights .*expected config.json"),
    ("ref-stats-missing-data", ["ref-stats", "--data", "{tmp}/none.zip", "--out", "{tmp}/r.npz"], "does not exist"),
    ("ref-stats-wrong-suffix", ["ref-stats", "--data", "{tmp}", "--out", "{tmp}/r.txt"], "should end in .npz"),
]


@pytest.mark.parametrize("args,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_command_lines_fail_early_and_clearly(args, message, tmp_path, capsys):
    rc, err, created = _cli(capsys, [a.replace("{tmp}", str(tmp_path)) for a in args], tmp_path)
    assert rc == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(message, err), err
    assert created == []


def test_a_plan_for_another_step_count_or_model(ddim_plan, tmp_path, capsys):
    rc, err, created = _cli(capsys, GEN[:2] + ["5", "--num-images", "1", "--quiet", "--model", "tiny-ddim", "--plan",
                                               str(ddim_plan), "--out", str(tmp_path / "a.png")], tmp_path)
    assert rc == 2 and "num_inference_steps=2" in err and created == []
    rc, err, created = _cli(capsys, GEN + ["--model", "tiny-dit", "--plan", str(ddim_plan), "--out",
                                           str(tmp_path / "a.png")], tmp_path)
    assert rc == 2 and "calibrated for a UNet2DModel, not a DiTTransformer2DModel" in err and created == []


def test_damaged_plan_metadata_is_refused_by_info(ddim_plan, tmp_path, capsys):
    from safetensors.torch import save_file

    plan = cq.load_plan(ddim_plan)
    meta = plan.to_meta()
    meta["sampler"]["num_inference_steps"] = -20
    bad = tmp_path / "bad.cqplan"
    save_file(plan.tensors, str(bad), metadata={"cachequant": json.dumps(meta)})
    rc, err, _ = _cli(capsys, ["info", str(bad)], tmp_path)
    assert rc == 2 and "num_inference_steps must be an integer >= 1, got -20" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_any_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, err, created = _cli(capsys, ["calibrate", "--model", "tiny-ddim", "--out", str(ro / "p.cqplan")], tmp_path)
    finally:
        ro.chmod(0o700)
    assert rc == 2 and "permission denied" in err and created == []


def test_unwritable_output_checked_without_root_privileges(tmp_path, monkeypatch, capsys):
    """The same check, made visible also where the tests run as root: os.access says no."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path)) else real(p, mode))
    rc, err, created = _cli(capsys, ["calibrate", "--model", "tiny-ddim", "--out", str(tmp_path / "p.cqplan")],
                            tmp_path)
    assert rc == 2 and "cannot write into" in err and created == []


def test_written_files_follow_the_umask(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert main(GEN + ["--model", "tiny-ddim", "--out", str(tmp_path / "a.jpg")]) == 0
    finally:
        os.umask(old)
    from PIL import Image

    assert (tmp_path / "a.jpg").stat().st_mode & 0o777 == 0o644
    assert Image.open(tmp_path / "a.jpg").format == "JPEG"  # the format the name asks for


def test_api_bad_inputs(make_pipe, tmp_path):
    pipe = make_pipe("dit")
    with pytest.raises(ValueError, match=r"class labels must be integers in \[0, 999\] for this model; got \[5000\]"):
        cq.calibrate(pipe, cq.CacheQuantConfig(), 4, class_labels=[5000], progress=False)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        cq.calibrate(pipe, cq.CacheQuantConfig(), 0, class_labels=[1], progress=False)
    with pytest.raises(ValueError, match="takes no text prompts"):
        cq.calibrate(pipe, cq.CacheQuantConfig(), 4, prompts=["a cat"], progress=False)
    with pytest.raises(TypeError, match="must be a cachequant.Plan"):
        cq.accelerate(pipe, "plan.cqplan")
    with pytest.raises(TypeError, match="must be a cachequant.CacheQuantConfig"):
        cq.calibrate(pipe, {"interval": 2}, 4, progress=False)
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        cq.CacheQuantConfig(interval=True)
    with pytest.raises(cq.PlanError, match="needs a file path"):
        cq.load_plan(None)
    with pytest.raises(RuntimeError, match="not accelerated"):
        cq.restore(pipe)


def test_ctrl_c_exits_130_in_one_line_and_leaves_no_file(tmp_path):
    out = tmp_path / "demo.png"
    proc = subprocess.Popen([sys.executable, "-m", "cachequant", "demo", "--model", "tiny-ddim", "--steps", "500",
                             "--quiet", "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(8)  # well into sampling
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1]
    assert not out.exists() and list(Path(tmp_path).iterdir()) == []


def test_help_shows_every_option_with_its_default():
    r = subprocess.run([sys.executable, "-m", "cachequant", "--help"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and all(c in r.stdout for c in ("evaluate", "ref-stats", "calibrate", "demo"))
    assert "``" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "cachequant", "calibrate", "--help"], capture_output=True, text=True,
                       env=ENV)
    assert "(default: 5)" in r.stdout and "(default: dps)" in r.stdout
    options = [line.split()[0] for line in r.stdout.splitlines() if line.strip().startswith("--")]
    assert options and all(f"{o} " in r.stdout or f"{o}\n" in r.stdout for o in options)
    assert "torchao" not in r.stderr and "accelerate" not in r.stderr  # no dependency noise
