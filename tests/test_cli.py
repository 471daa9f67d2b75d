"""The command line end to end on the tiny model: calibrate -> info -> generate, and clear errors."""

import subprocess
import sys

import pytest

from cachequant.cli.main import main


def test_calibrate_info_generate(tmp_path, capsys):
    plan = tmp_path / "p.cqplan"
    rc = main(["calibrate", "--model", "tiny-ddim", "--steps", "6", "--interval", "2", "--schedule", "dps",
               "--bits", "w8a8", "--num-samples", "2", "--batch-size", "2", "--out", str(plan)])
    assert rc == 0 and plan.is_file()
    assert main(["info", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "UNet2DModel" in out and "DDIMScheduler, 6 steps = 6 model calls" in out and "W8A8" in out
    png = tmp_path / "g.png"
    assert main(["generate", "--model", "tiny-ddim", "--steps", "6", "--plan", str(plan), "--num-images", "2",
                 "--out", str(png)]) == 0
    from PIL import Image

    assert Image.open(png).size == (32, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "p.cqplan"]  # no temp files left


def test_cli_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.cqplan"
    bad.write_bytes(b"nope")
    assert main(["info", str(bad)]) == 2
    assert "not a readable cachequant plan" in capsys.readouterr().err
    plan = tmp_path / "p.cqplan"
    main(["calibrate", "--model", "tiny-ddim", "--steps", "4", "--interval", "2", "--bits", "fp",
          "--num-samples", "2", "--batch-size", "2", "--out", str(plan)])
    capsys.readouterr()
    rc = main(["generate", "--model", "tiny-ddim", "--steps", "5", "--plan", str(plan), "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "num_inference_steps=4" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert main(["generate", "--model", "no/such/model", "--out", str(tmp_path / "y.png")]) == 2
    assert "neither a built-in model" in capsys.readouterr().err


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "cachequant", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "calibrate" in r.stdout and "demo" in r.stdout


def test_calibrate_cache_site_flags(tmp_path, capsys):
    import cachequant as cq

    plan = tmp_path / "p.cqplan"
    args = ["calibrate", "--model", "tiny-ddim", "--steps", "4", "--interval", "2", "--bits", "fp",
            "--num-samples", "2", "--batch-size", "2"]
    assert main(args + ["--cache-layers", "1", "--out", str(plan)]) == 0
    assert cq.load_plan(plan).cache.site == {"layers": 1, "feature": "up_blocks.2.resnets.0"}
    bad = tmp_path / "bad.cqplan"
    rc = main(args + ["--cache-layers", "9", "--out", str(bad)])
    assert rc == 2 and "cache_layers must be in [1, 5]" in capsys.readouterr().err
    assert not bad.exists()
    with pytest.raises(SystemExit):  # argparse: the two site flags exclude each other
        main(args + ["--cache-layers", "1", "--cache-branch", "1", "--out", str(bad)])
