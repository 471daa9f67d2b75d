"""benchmarks/act_sensitivity.py on a tiny random UNet (3 steps, 2 images): every quantized layer is
ranked from its calls, the ranking's worst layers are the ones left float, bad input is refused."""

from __future__ import annotations

import json
import sys

import pytest


def _study():
    from conftest import load_benchmark

    return load_benchmark("act_sensitivity")


def test_ranks_every_quantized_layer_and_floats_the_worst(tmp_path):
    import cachequant as cq
    from cachequant.cli.common import load_pipeline

    study = _study()
    try:
        out = tmp_path / "sens.json"
        assert study.main(["--model", "tiny-ddim", "--steps", "3", "--num-samples", "2", "--calib-samples", "2",
                           "--keep", "3", "--split", "--out", str(out)]) == 0
    finally:
        sys.modules.pop("act_sensitivity", None)
    res = json.loads(out.read_text())
    ranking = res["ranking"]
    sqnr = [r["output_sqnr_db"] for r in ranking]
    assert sqnr == sorted(sqnr) and all(0 < s < 200 for s in sqnr)
    # one measurement per layer call: 3 steps of one batched pipeline call
    assert {r["calls"] for r in ranking} == {3}
    pipe = load_pipeline("tiny-ddim", "cpu", None)
    plan = cq.calibrate(pipe, cq.CacheQuantConfig(**res["rows"][1]["config"]), num_inference_steps=3,
                        progress=False, num_samples=2)
    quantized = {layer.name for layer in plan.quant.layers}
    floated = res["rows"][1]["float_layers"]
    assert floated == [r["layer"] for r in ranking[:3]] and not quantized & set(floated)
    assert len(ranking) == len(quantized) + 3
    assert res["rows"][0]["psnr_vs_fp"] > 10 and res["rows"][1]["psnr_vs_fp"] > 10
    # one part at a time; on this model the 8-bit layer inputs carry the loss (measured: W8A8 31.7 dB,
    # weights alone 47.4, inputs alone 31.9, attention matmuls alone 52.1)
    parts = {r["variant"]: r["psnr_vs_fp"] for r in res["rows"][2:]}
    assert set(parts) == {"8-bit weights only", "8-bit layer inputs only", "8-bit attention matmuls only"}
    w8a8 = res["rows"][0]["psnr_vs_fp"]
    assert parts["8-bit weights only"] > w8a8 + 5 and parts["8-bit attention matmuls only"] > w8a8 + 5
    assert abs(parts["8-bit layer inputs only"] - w8a8) < 3
    assert not res["rows"][2]["config"]["quant_attention"] and res["rows"][4]["config"]["quant_attention"]


@pytest.mark.parametrize("keep", ["x", "0"])
def test_bad_keep_is_refused(keep):
    study = _study()
    try:
        with pytest.raises(SystemExit, match="--keep"):
            study.main(["--keep", keep, "--out", "/dev/null"])
    finally:
        sys.modules.pop("act_sensitivity", None)
