"""``CacheQuantConfig.attention_probs``: the softmax probabilities of the 8-bit attention on an
e4m3 grid at the fixed scale 1/448 instead of their per-step uniform 8-bit range.

The tests: the grid is what the option says (p rounded to e4m3, q / k / v still on their ranges);
on softmax rows of the kind attention produces, it gives a much smaller P·V error than the uniform
range; the option travels with the plan, and a plan written before it existed reads as
``uniform``; bad settings are refused when the config is made."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cachequant as cq
from cachequant.plan import Plan
from cachequant.quant.attention import _OperandQuant
from cachequant.quant.quantizer import E4M3_MAX, e4m3_round, fake_quant, params_from_range


@pytest.mark.parametrize("kw,message", [
    ({"attention_probs": "fp8"}, "attention_probs must be one of uniform, e4m3"),
    ({"attention_probs": "e4m3", "quant_attention": False}, "needs quant_attention=True"),
    ({"attention_probs": "e4m3", "weight_bits": None, "act_bits": None}, "needs quant_attention=True and quantization"),
])
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        cq.CacheQuantConfig(**kw)


def _attention_rows(tokens: int = 257, rows: int = 512) -> torch.Tensor:
    """Softmax rows like a trained model's: most diffuse (scores of spread 1), a few peaked (spread
    6), whose largest probabilities set the calibrated range of p."""
    g = torch.Generator().manual_seed(0)
    spread = torch.ones(rows, 1)
    spread[::16] = 6.0
    return torch.softmax(torch.randn(rows, tokens, generator=g, dtype=torch.float64) * spread, dim=-1)


def test_e4m3_probabilities_give_a_smaller_pv_error_than_the_uniform_range():
    p = _attention_rows()
    v = torch.randn(p.shape[1], 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s, z = params_from_range(p.min(), p.max(), 8)  # the calibrated range: [0, the largest probability]
    uniform = fake_quant(p, s, z, 8)
    e4m3 = e4m3_round(p, 1.0 / E4M3_MAX).double()  # decoded in fp32: exact for e4m3 values
    ref = p @ v

    def err(q):
        return float((q @ v - ref).norm() / ref.norm())

    print(f"P·V relative error: uniform {err(uniform):.4f}, e4m3 {err(e4m3):.4f}; p max {float(p.max()):.3f}")
    assert err(e4m3) < 0.5 * err(uniform)
    normal = p >= 2 ** -6 / E4M3_MAX  # e4m3's normal range at this scale; below it the step is fixed
    assert float(((e4m3 - p).abs() / p)[normal].max()) <= 2 ** -4  # relative rounding of 3 mantissa bits


@pytest.fixture(scope="module")
def dit():
    from cachequant.models.tiny import tiny_dit_pipeline

    pipe = tiny_dit_pipeline()
    base = dict(interval=2, schedule="uniform", weight_bits=8, act_bits=8, dec=True, calib_batch_size=2, dps_samples=2)
    plans = {probs: cq.calibrate(pipe, cq.CacheQuantConfig(**base, attention_probs=probs), 4, class_labels=[0, 1],
                                 progress=False) for probs in ("uniform", "e4m3")}
    return pipe, plans


def _draw(pipe) -> np.ndarray:
    with torch.inference_mode():
        out = pipe(class_labels=[3, 7], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                   output_type="np")
    return np.asarray(out.images)


def test_accelerated_operands_follow_the_plan(dit, tmp_path):
    pipe, plans = dit
    path = tmp_path / "e4m3.cqplan"
    plans["e4m3"].save(path)
    plan = cq.load_plan(path)
    assert plan.config.attention_probs == "e4m3" and plan.quant.attention
    cq.accelerate(pipe, plan)
    try:
        from cachequant.session import session_of

        procs = session_of(pipe.transformer).processors
        assert procs
        x = torch.rand(2, 4, 9, 9)
        for proc in procs.values():
            op = proc.operand
            assert isinstance(op, _OperandQuant) and op.probs == "e4m3"
            torch.testing.assert_close(op("p", x), e4m3_round(x, 1.0 / E4M3_MAX), rtol=0, atol=0)
            assert not torch.equal(op("q", x), e4m3_round(x, 1.0 / E4M3_MAX))  # q keeps its 8-bit range
        e4m3 = _draw(pipe)
        assert np.array_equal(e4m3, _draw(pipe)) and np.isfinite(e4m3).all()
    finally:
        cq.restore(pipe)
    cq.accelerate(pipe, plans["uniform"])
    uniform = _draw(pipe)
    cq.restore(pipe)
    assert not np.array_equal(e4m3, uniform)


def test_a_plan_from_before_the_option_reads_as_uniform(dit):
    _, plans = dit
    meta = plans["uniform"].to_meta()
    del meta["config"]["attention_probs"]
    assert Plan.from_meta(meta, plans["uniform"].tensors).config.attention_probs == "uniform"


def test_the_operand_study_uses_the_plans_e4m3_grid():
    """``benchmarks/attention_operands.py``'s "p e4m3" setting calls the helper the plan option's
    operand quantizer computes with."""
    import sys

    from conftest import load_benchmark

    try:
        script = load_benchmark("attention_operands")
        op = _OperandQuant(None, None, 8, probs="e4m3")
        p = torch.softmax(torch.randn(3, 5, 40), -1)
        assert torch.equal(script.attention.e4m3_probabilities(p), op("p", p))
    finally:
        sys.modules.pop("attention_operands", None)
