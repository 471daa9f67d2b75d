"""GPTQ weight rounding: exact properties of the algorithm, the Hessian accumulator, and the plan
round trip (codes stored, used by the reference path and by the INT8 packing)."""

import numpy as np
import pytest
import torch
from torch import nn

import cachequant as cq
from cachequant.quant.gptq import HessianAccumulator, gptq_round
from cachequant.quant.quantizer import fake_quant, weight_qparams
from conftest import calib_kwargs, run


def _out_err(w, q, x):
    return float(((w - q) @ x).norm() / (w @ x).norm())


def test_gptq_on_a_diagonal_hessian_is_nearest_rounding():
    # No correlation between inputs: no error is worth moving to another column.
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    s, z = weight_qparams(w, 4)
    h = torch.diag(torch.rand(40) + 0.5)
    torch.testing.assert_close(gptq_round(w, h, s, z, 4, block=7), fake_quant(w, s, z, 4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_lowers_output_error_and_stays_on_the_grid(bits):
    torch.manual_seed(1)
    k, n = 64, 2000
    mix = torch.randn(k, k) / k**0.5 + torch.eye(k)
    x = (mix @ torch.randn(k, n)).double() + 0.5  # correlated inputs with a mean, like post-SiLU features
    w = torch.randn(32, k).double()
    s, z = weight_qparams(w.float(), bits)
    h = 2 * x @ x.t() / n
    q = gptq_round(w, h, s, z, bits, block=16)
    codes = q / s.double() + z.double()
    assert torch.allclose(codes, codes.round(), atol=1e-6) and codes.min() >= 0 and codes.max() <= 2**bits - 1
    nearest = fake_quant(w.float(), s, z, bits).double()
    assert _out_err(w, q, x) < 0.85 * _out_err(w, nearest, x)  # measured: 0.75× at 4 bits


def test_hessian_accumulator_matches_unfolded_inputs():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    acc = HessianAccumulator(conv, positions=10**6)
    acc.add(x)
    cols = torch.nn.functional.unfold(x, 3, padding=1).permute(1, 0, 2).reshape(27, -1).double()
    torch.testing.assert_close(acc.hessian(), 2 * cols @ cols.t() / cols.shape[1], rtol=1e-5, atol=1e-6)
    lin = nn.Linear(6, 2)
    acc = HessianAccumulator(lin, positions=7, seed=3)  # subsampled: 7 of 2 × 5 rows
    acc.add(torch.randn(2, 5, 6))
    assert acc.n == 7 and acc.hessian().shape == (6, 6)
    with pytest.raises(ValueError, match="grouped"):
        HessianAccumulator(nn.Conv2d(4, 4, 3, groups=2))


def test_gptq_plan_round_trip_and_lower_error(make_pipe, tmp_path):
    pipe = make_pipe("ddim")
    model = pipe.unet
    inputs = []
    h = model.register_forward_pre_hook(lambda m, a, k: inputs.append((a, k)), with_kwargs=True)
    run(pipe, "ddim", steps=4, seed=123, n=2)
    h.remove()
    with torch.no_grad():
        ref = [model(*a, **k)[0] for a, k in inputs]

    def err(plan):
        cq.accelerate(pipe, plan)
        e = []
        with torch.no_grad():
            for i, ((a, k), r) in enumerate(zip(inputs, ref)):
                cq.set_step(pipe, i)
                e.append(float((model(*a, **k)[0] - r).norm() / r.norm()))
        cq.restore(pipe)
        return float(np.mean(e))

    base = dict(interval=1, schedule="uniform", weight_bits=4, act_bits=8, dec=False, calib_batch_size=4)
    near = cq.calibrate(pipe, cq.CacheQuantConfig(**base), num_inference_steps=4, progress=False,
                        **calib_kwargs("ddim", 8))
    gq = cq.calibrate(pipe, cq.CacheQuantConfig(**base, weight_rounding="gptq"), num_inference_steps=4,
                      progress=False, **calib_kwargs("ddim", 8))
    d = gq.diagnostics["gptq"]
    assert d["layers"] > 10 and d["rel_output_error_gptq"] < d["rel_output_error_nearest"]
    codes = [k for k in gq.tensors if k.endswith(".codes")]
    assert codes and all(gq.tensors[k].dtype == torch.uint8 for k in codes)
    assert not any(k.endswith(".codes") for k in near.tensors)
    gq.save(tmp_path / "g.cqplan")
    again = cq.load_plan(tmp_path / "g.cqplan")
    assert again.config.weight_rounding == "gptq"
    e_near, e_gptq, e_again = err(near), err(gq), err(again)
    assert e_gptq < e_near, (e_gptq, e_near)
    assert e_again == pytest.approx(e_gptq, rel=1e-6)
    # the model's own float weights are untouched: restore() gives back the original model
    with torch.no_grad():
        after = [model(*a, **k)[0] for a, k in inputs]
    for a, r in zip(after, ref):
        torch.testing.assert_close(a, r)


def test_int8_packing_uses_the_plan_codes(make_pipe):
    from cachequant.backends.pack import pack_layer, packed
    from cachequant.quant.layer import quant_hooks

    pipe = make_pipe("ddim")
    cfg = cq.CacheQuantConfig(interval=1, schedule="uniform", weight_bits=8, act_bits=8, dec=False,
                              calib_batch_size=2, weight_rounding="gptq")
    plan = cq.calibrate(pipe, cfg, num_inference_steps=3, progress=False, num_samples=2)
    cq.accelerate(pipe, plan)
    try:
        layers = [(m, h) for m, h in quant_hooks(pipe.unet).values() if m._buffers.get("_cachequant_codes") is not None]
        assert layers
        changed = 0
        for module, hook in layers[:6]:
            s, z = hook._w_scale_zero(module)
            nearest = torch.clamp(torch.round(module.weight.float() / s) + z, 0, 255)
            codes = hook.weight_codes(module)
            changed += int((nearest != codes).sum())
            pack_layer(module, hook, "int8")
            codes = codes.permute(0, 2, 3, 1) if codes.dim() == 4 else codes[:, None, None, :]
            expect = (codes - 128).to(torch.int8).reshape(codes.shape[0], -1)
            assert torch.equal(packed(module)["w"].cpu().reshape(expect.shape), expect)
        assert changed > 0  # GPTQ moved some codes away from nearest
    finally:
        cq.restore(pipe)


def test_weight_rounding_config_errors():
    with pytest.raises(ValueError, match="weight_rounding must be"):
        cq.CacheQuantConfig(weight_rounding="adaround")
    with pytest.raises(ValueError, match="needs quantized weights"):
        cq.CacheQuantConfig(weight_bits=None, act_bits=None, weight_rounding="gptq")
