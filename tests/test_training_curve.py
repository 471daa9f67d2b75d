"""benchmarks/training_curve.py: a resumed model's step counts become images seen run by run, the
figure and its numbers are written from train.sh's files, and bad arguments are refused."""

from __future__ import annotations

import json
import sys

import pytest


@pytest.fixture(scope="module")
def script():
    from conftest import load_benchmark

    yield load_benchmark("training_curve")
    sys.modules.pop("training_curve", None)


def test_images_follow_each_runs_batch(script):
    info = {"iterations": 30, "runs": [{"from_step": 0, "to_step": 10, "batch": 256},
                                      {"from_step": 10, "to_step": 30, "batch": 512}]}
    assert script.images_at(info, 10) == 2560
    assert script.images_at(info, 20) == 2560 + 10 * 512
    assert script.images_at({"iterations": 5, "batch": 8}, 4) == 32  # an early file without runs


def test_figure_and_numbers_from_train_sh_files(script, tmp_path):
    run = tmp_path / "unet-run1"
    run.mkdir()
    (run / "train_info-unet.json").write_text(json.dumps(
        {"iterations": 1000, "images_seen": 512000, "runs": [{"from_step": 0, "to_step": 1000, "batch": 512}],
         "curve": [[500, 0.03, 10.0], [1000, 0.028, 20.0]]}))
    (run / "fid-unet.json").write_text(json.dumps({"metrics": {"fid": 20.5, "precision": 0.6, "recall": 0.5}}))
    (run / "fid-unet-cache-n5.json").write_text(json.dumps({"metrics": {"fid": 99.0}}))  # not the model's own FID
    table, shipped = tmp_path / "table.json", tmp_path / "train_info.json"
    table.write_text(json.dumps({"rows": [{"variant": "fp", "metrics": {"fid": 42.0}}]}))
    shipped.write_text(json.dumps({"iterations": 100, "batch": 256}))
    out = tmp_path / "curve.png"
    assert script.main(["--run", str(run), "--fp-row", str(table), str(shipped), "shipped", "--target", "12",
                        "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    points = {p["label"]: p for p in json.loads(out.with_suffix(".json").read_text())["points"]}
    assert points["unet-run1"]["fid"] == 20.5 and points["unet-run1"]["images"] == 512000
    assert points["shipped"] == {"label": "shipped", "images": 25600, "fid": 42.0, "precision": None, "recall": None}


def test_bad_arguments_are_refused(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path / "c.png")])
    assert "at least one --run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--run", str(tmp_path / "none"), "--out", str(tmp_path / "c.png")])
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--run", str(tmp_path), "--out", str(tmp_path / "c.jpg")])
    assert "give a .png path" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="expected one train_info"):
        script.main(["--run", str(tmp_path), "--out", str(tmp_path / "c.png")])
