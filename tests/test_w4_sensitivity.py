"""benchmarks/w4_sensitivity.py on the shipped CIFAR UNet, shortened (10 steps, 2 images): the W4A8
finding of results/w4/README.md in small — GPTQ rounding recovers what nearest rounding loses."""

from __future__ import annotations

import json
import sys

import pytest


def test_gptq_recovers_w4a8_on_the_shipped_unet(tmp_path):
    from conftest import load_benchmark

    study = load_benchmark("w4_sensitivity")
    try:
        out = tmp_path / "w4.json"
        assert study.main(["--steps", "10", "--num-samples", "2", "--calib-samples", "2", "--groups", "none",
                           "--gptq", "--out", str(out)]) == 0
    finally:
        sys.modules.pop("w4_sensitivity", None)
    res = json.loads(out.read_text())
    psnr = {r["variant"]: r["psnr_vs_fp"] for r in res["variants"]}
    # measured on 2 CPU cores: W8A8 29.9, W4A8 20.7, GPTQ 33.5, GPTQ + shortcut convs at 8 bits 36.0 dB
    assert psnr["W4A8"] < psnr["W8A8"] - 5
    assert psnr["W4A8, GPTQ rounding"] > psnr["W4A8"] + 5
    assert psnr["W4A8, GPTQ rounding, shortcut 1x1 convs at 8 bits"] > psnr["W4A8, GPTQ rounding"]
    fit = next(r["gptq_fit"] for r in res["variants"] if r["variant"] == "W4A8, GPTQ rounding")
    assert fit["rel_output_error_gptq"] < fit["rel_output_error_nearest"]
    assert res["total_params"] > 6e6 and len(res["weight_errors_4bit"]) == 93


def test_unknown_group_is_refused():
    from conftest import load_benchmark

    study = load_benchmark("w4_sensitivity")
    try:
        with pytest.raises(SystemExit, match="unknown --groups"):
            study.main(["--groups", "nope", "--out", "/dev/null"])
    finally:
        sys.modules.pop("w4_sensitivity", None)
