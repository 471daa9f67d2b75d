"""benchmarks/fp8_sqnr.py: the two properties the FP8 quality section rests on — e4m3's SQNR does
not depend on the scale (so no range search can recover what INT8 gets), and it is well below
INT8's with a searched range on near-Gaussian weights and activations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def fp8():
    from conftest import load_benchmark

    yield load_benchmark("fp8_sqnr")
    sys.modules.pop("fp8_sqnr", None)


def test_e4m3_sqnr_is_scale_invariant_and_below_int8_on_gaussian_tensors(fp8):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    r = fp8.weight_row(w)
    assert r["int8_per_channel"] > r["e4m3_per_tensor"] + 8  # ~41 vs ~31.5 dB
    assert abs(r["e4m3_per_tensor"] - r["e4m3_per_channel"]) < 1.0
    x = fp8.activations()["gaussian"]
    a = fp8.activation_row(x)
    assert a["int8_searched_range"] > a["e4m3_best_scale"] + 6
    # any scale that neither saturates nor underflows gives the same e4m3 error
    assert abs(a["e4m3_at_int8_range"] - a["e4m3_best_scale"]) < 0.5
    assert fp8.sqnr_db(x, fp8.e4m3(x, 1.0)) == pytest.approx(fp8.sqnr_db(x, fp8.e4m3(x, 1 / 16)), abs=0.3)


def test_outlier_channels_favour_e4m3(fp8):
    """Three channels twenty times larger: the per-tensor INT8 grid starves the rest, e4m3 does not."""
    a = fp8.activation_row(fp8.activations()["gaussian, 3 channels ×20"])
    assert a["e4m3_at_amax"] > a["int8_searched_range"] + 4


def test_gptq_on_the_e4m3_grid_lowers_the_output_error(fp8):
    """GPTQ's error feedback with e4m3 as the grid: every weight stays an e4m3 value at the layer's
    scale, and the output error on correlated inputs is below round-to-nearest's."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(96, 96, generator=g) / 96 ** 0.5 + torch.eye(96)
    x = (torch.randn(2048, 96, generator=g) @ mix).double()  # correlated input channels
    w = torch.randn(48, 96, generator=g).double()
    h = 2 * x.t() @ x / x.shape[0]
    s = float(w.abs().max()) / fp8.FP8_MAX
    q = fp8.gptq_e4m3(w, h, s)
    assert torch.equal(fp8.e4m3(q, s).double(), q)  # on the grid
    nearest = fp8.e4m3(w, s).double()
    y = x @ w.t()
    assert fp8.sqnr_db(y, x @ q.t()) > fp8.sqnr_db(y, x @ nearest.t()) + 1  # 33.7 vs 31.4 dB


def test_other_weights_are_measured_and_named(fp8, tmp_path):
    """--weights MODEL=DIR measures other weights of a zoo model (the first shipped DiT, which the
    committed SQNR table used) and the JSON names the weights that are not the first shipped."""
    first = Path(__file__).parents[1] / "results" / "training" / "weights" / "cifar10-dit-1.6M"
    out_old, out_new = tmp_path / "old.json", tmp_path / "new.json"
    assert fp8.main(["--models", "cifar10-dit", "--weights", f"cifar10-dit={first}", "--out", str(out_old)]) == 0
    assert fp8.main(["--models", "cifar10-dit", "--out", str(out_new)]) == 0
    old, new = json.loads(out_old.read_text()), json.loads(out_new.read_text())
    assert old["weights_sha1"] == {} and len(new["weights_sha1"]["cifar10-dit"]) == 40
    assert old["weights"]["cifar10-dit"]["layers"] != new["weights"]["cifar10-dit"]["layers"]
    with pytest.raises(SystemExit):
        fp8.main(["--models", "cifar10-dit", "--weights", f"cifar10-unet={first}"])
