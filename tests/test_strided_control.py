"""benchmarks/strided_search_control.py: its sample is the pre-fix one (so the control really puts
the aliasing back), and it refuses a bad variant before any sampling."""

from __future__ import annotations

import sys

import pytest

from cachequant.quant import quantizer
from cachequant.quant.quantizer import activation_range
from test_quant import _outlier_tokens  # the aliasing test's activations: three outlier channels


@pytest.fixture(scope="module")
def script():
    from conftest import load_benchmark

    yield load_benchmark("strided_search_control")
    for name in ("strided_search_control", "calib_seeds", "ablation"):
        sys.modules.pop(name, None)


def test_the_control_brings_the_entry_count_dependence_back(script, monkeypatch):
    """With the strided sample the 17-entry tensor's range misses the outlier channels (hi far below
    the 16-entry one); with the current sample both counts agree. Importing the script leaves the
    library's sample alone."""
    assert quantizer._error_sample is not script.strided_error_sample
    current = {n: activation_range(_outlier_tokens(n), 8)[1] for n in (16, 17)}
    monkeypatch.setattr(quantizer, "_error_sample", script.strided_error_sample)
    strided = {n: activation_range(_outlier_tokens(n), 8)[1] for n in (16, 17)}
    assert current[17] == pytest.approx(current[16], rel=0.05)
    assert strided[17] < 0.5 * strided[16]


def test_unknown_variant_is_refused_before_sampling(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--table", "qandc-fair", "--only", "tap-800,nope", "--work", str(tmp_path / "w")])
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    assert quantizer._error_sample is not script.strided_error_sample
