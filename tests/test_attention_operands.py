"""benchmarks/attention_operands.py: quantizing a chosen subset of the attention operands. With all
four selected it computes exactly what the plan computes; with none, what a plan without 8-bit
attention computes from the same layer ranges; the package's operand quantizer is put back."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import cachequant as cq
from cachequant.quant import attention


@pytest.fixture(scope="module")
def script():
    from conftest import load_benchmark

    yield load_benchmark("attention_operands")
    sys.modules.pop("attention_operands", None)


def test_operand_subsets_reproduce_the_plan_and_restore(script, make_pipe):
    pipe = make_pipe("dit")
    cfg = cq.CacheQuantConfig(interval=1, weight_bits=8, act_bits=8, dec=False, calib_batch_size=2)
    plan = cq.calibrate(pipe, cfg, 4, class_labels=[0, 1], progress=False)
    assert plan.quant.attention  # the tiny DiT's attention matmuls are in the plan

    def draw():
        with torch.inference_mode():
            out = pipe(class_labels=[3, 7], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                       output_type="np")
        return np.asarray(out.images)

    real = attention._OperandQuant.__call__
    got = script.operand_images(pipe, plan, draw, {"all": ("q", "k", "p", "v"), "none": (), "only p": ("p",)})
    assert attention._OperandQuant.__call__ is real
    cq.accelerate(pipe, plan)
    plain = draw()
    cq.restore(pipe)
    assert np.array_equal(got["all"], plain)
    assert not np.array_equal(got["none"], plain) and not np.array_equal(got["only p"], got["none"])


def test_e4m3_probabilities_keep_a_relative_step():
    """The e4m3 grid at scale 1/448 keeps every probability from 1e-4 to 1 within e4m3's relative
    rounding (2⁻⁴), where an 8-bit uniform grid over [0, 0.5] rounds all of them below 0.001 to 0."""
    p = torch.logspace(-4, 0, 200, dtype=torch.float64)
    from cachequant.quant.attention import e4m3_probabilities

    q = e4m3_probabilities(p)
    assert float(((q - p).abs() / p).max()) <= 2 ** -4
    assert torch.all(q >= 0) and float(q.max()) == 1.0
