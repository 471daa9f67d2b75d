"""8-bit attention matmuls (QKᵀ and softmax·V) for Flux, SD3, Sana's cross-attention and Wan.

Their own processors run wrapped (``cachequant/quant/sdpa.py``): the one SDPA call of a module
call is computed explicitly with q, k, the probabilities and v through ``operand``. The tests: the
explicit attention is SDPA's arithmetic (masks, causal, grouped heads); with an identity operand the
wrapped model computes what the model computes and restoring gives it back bit for bit; a
calibration puts the modules' operands in the plan, and accelerating with them is deterministic and
close to, but not equal to, the same plan with float attention; Sana's linear self-attention and
Wan's image-to-video cross-attention stay float, with the reason in the plan.
"""

import dataclasses
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cachequant as cq
from cachequant.models.tiny_families import TINY_FAMILIES
from cachequant.quant.attention import ATTN, _OperandQuant, quant_processor, set_processor
from cachequant.quant.sdpa import explicit_attention
from cachequant.quant.specs import attention_modules, attention_support

PROMPTS = ["a red cat", "a small boat"]
STEPS = 4
FAMILIES = ["tiny-flux", "tiny-sd3", "tiny-sana", "tiny-wan"]
WRAPPED = {"tiny-flux": "FluxAttnProcessor", "tiny-sd3": "JointAttnProcessor2_0",
           "tiny-sana": "SanaAttnProcessor2_0", "tiny-wan": "WanAttnProcessor"}


def _latents(pipe, kw):
    out = pipe(prompt=PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
               output_type="latent", **kw)
    x = out.images if hasattr(out, "images") else out.frames
    return x.float().numpy().astype(np.float64)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def pipes():
    return {name: TINY_FAMILIES[name]() for name in FAMILIES}


def _identity(k, x):
    return x


@pytest.mark.parametrize("kw", [{}, {"scale": 0.3}, {"is_causal": True}, {"mask": "bool"}, {"mask": "float"},
                                {"gqa": True}])
def test_explicit_attention_is_sdpa(kw):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g)
    k, v = (torch.randn(2, 2 if kw.get("gqa") else 4, 5 if "mask" in kw else 7, 8, generator=g) for _ in range(2))
    args = {"scale": kw.get("scale"), "is_causal": kw.get("is_causal", False), "enable_gqa": kw.get("gqa", False)}
    if kw.get("mask") == "bool":
        args["attn_mask"] = torch.rand(2, 1, 7, 5, generator=g) > 0.3
        args["attn_mask"][0, 0, 3] = False  # a query that sees no key: zeros, as SDPA's math path
    elif kw.get("mask") == "float":
        args["attn_mask"] = torch.randn(2, 4, 7, 5, generator=g)
    seen = {}
    out = explicit_attention(lambda name, x: seen.setdefault(name, x), q, k, v, **args)
    ref = F.scaled_dot_product_attention(q, k, v, **args)
    torch.testing.assert_close(out, ref.nan_to_num(0.0), rtol=1e-5, atol=1e-6)
    blocks = []  # queries in blocks of 2 rows (then 1): the rows of the whole, masks sliced with them
    for budget in (2 * 8 * k.shape[-2], 1):
        got = explicit_attention(lambda name, x: blocks.append(x.shape) or x if name == "p" else x, q, k, v,
                                 max_scores=budget, **args)
        torch.testing.assert_close(got, out, rtol=1e-6, atol=1e-7)
    assert [b[-2] for b in blocks] == [2, 2, 2, 1] + [1] * 7
    assert list(seen) == ["q", "k", "v", "p"]
    assert torch.allclose(seen["p"].sum(-1)[seen["p"].sum(-1) > 0], torch.tensor(1.0))
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        explicit_attention(_identity, q, k, v, dropout_p=0.1, enable_gqa=kw.get("gqa", False))


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_operand_reproduces_the_model_and_restores(pipes, family):
    pipe, kw = pipes[family]
    model = pipe.transformer
    ref = _latents(pipe, kw)
    names, _ = attention_modules(model)
    assert names and all(type(model.get_submodule(n).processor).__name__ == WRAPPED[family] for n in names)
    originals = {n: model.get_submodule(n).processor for n in names}
    backends = {n: getattr(p, "_attention_backend", None) for n, p in originals.items()}

    calls = {n: [] for n in names}
    undo = []
    for n in names:
        module = model.get_submodule(n)
        proc = quant_processor(module, lambda k, x, n=n: calls[n].append(k) or x)
        # the module passes a processor the keyword arguments its signature names: the wrapper keeps it
        assert inspect.signature(proc.__call__) == inspect.signature(originals[n].__call__)
        undo.append(set_processor(module, proc))
    out = _latents(pipe, kw)
    for fn in undo:
        fn()

    # every module call went through the explicit attention once (q, k, v, p), and it is SDPA's
    # arithmetic: not bit for bit (SDPA's CPU kernel sums in blocks), within float32 rounding
    assert all(c and len(c) % 4 == 0 and set(c) == {"q", "k", "p", "v"} for c in calls.values())
    assert _rel(out, ref) < 1e-6 and np.abs(out - ref).max() < 1e-5, (_rel(out, ref), np.abs(out - ref).max())
    for n, p in originals.items():
        assert model.get_submodule(n).processor is p
        assert getattr(p, "_attention_backend", None) == backends[n]  # the original is never modified
    np.testing.assert_array_equal(_latents(pipe, kw), ref)


def test_sana_linear_attention_stays_float_and_says_why(pipes):
    names, kept = attention_modules(pipes["tiny-sana"][0].transformer)
    assert all(n.endswith("attn2") for n in names) and len(names) == 3  # cross-attention: softmax attention
    assert set(kept) == {n.replace("attn2", "attn1") for n in names}
    assert set(kept.values()) == {"SanaLinearAttnProcessor2_0"}


def test_wan_image_to_video_cross_attention_stays_float():
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    t2v = WanAttention(dim=16, heads=2, dim_head=8, processor=WanAttnProcessor(), is_cross_attention=True)
    i2v = WanAttention(dim=16, heads=2, dim_head=8, added_kv_proj_dim=16, processor=WanAttnProcessor(),
                       is_cross_attention=True)
    assert attention_support(t2v) is None
    assert "two attentions per call" in attention_support(i2v)
    with pytest.raises(ValueError, match="cannot be quantized"):
        quant_processor(i2v, _identity)


@pytest.mark.parametrize("family", FAMILIES)
def test_8bit_attention_calibrates_accelerates_and_restores(pipes, family, monkeypatch):
    pipe, kw = pipes[family]
    model = pipe.transformer
    ref = _latents(pipe, kw)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}

    plan = cq.calibrate(pipe, cq.CacheQuantConfig(interval=1, schedule="uniform", weight_bits=8, act_bits=8,
                                                  calib_batch_size=2), STEPS, prompts=PROMPTS,
                        pipeline_kwargs=kw, progress=False)
    names, _ = attention_modules(model)
    assert set(plan.quant.attention) == set(names)
    kept = plan.diagnostics.get("attention_kept_float", {})
    assert not set(kept) & set(names)
    if family == "tiny-sana":
        assert "linear attention" in plan.diagnostics["attention_kept_float_why"]["SanaLinearAttnProcessor2_0"]
    else:
        assert not kept
    for n in names:
        t = plan.tensors[f"attn.{n}"]
        assert t.shape == (4, 2, STEPS) and bool((t[:, 0] != 1).all())  # q, k, p, v: a range per step

    cq.accelerate(pipe, plan)
    assert all(model.get_submodule(n).processor is not processors[n] for n in names)
    out = _latents(pipe, kw)
    again = _latents(pipe, kw)
    with monkeypatch.context() as mp:  # queries in blocks of a few rows: the same rows, the same latents
        mp.setattr(_OperandQuant, "max_scores", 64)
        blocked = _latents(pipe, kw)
    cq.restore(pipe)
    np.testing.assert_allclose(blocked, out, rtol=1e-5, atol=1e-5)
    # the same plan with float attention: only the attention matmuls differ
    float_attn = dataclasses.replace(plan, quant=dataclasses.replace(plan.quant, attention=()))
    cq.accelerate(pipe, float_attn)
    out_float_attn = _latents(pipe, kw)
    cq.restore(pipe)

    assert np.isfinite(out).all() and np.array_equal(out, again)
    assert 0 < _rel(out, out_float_attn) < 0.05, _rel(out, out_float_attn)
    assert _rel(out, ref) < 0.1
    np.testing.assert_array_equal(_latents(pipe, kw), ref)
    assert all(m.processor is processors[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    assert not any(k.startswith(ATTN) for m in model.modules() for k in m._buffers)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize("family", ["tiny-flux", "tiny-wan"])
def test_compiles_without_graph_break(pipes, family):
    """Flux and Wan reach SDPA through diffusers' dispatcher and call Python-level Tensor methods
    (``unflatten``) inside the wrapped processor: one graph, and the eager model's latents."""
    pipe, kw = pipes[family]
    model = pipe.transformer
    plan = cq.calibrate(pipe, cq.CacheQuantConfig(interval=1, schedule="uniform", weight_bits=8, act_bits=8,
                                                  calib_batch_size=2), STEPS, prompts=PROMPTS,
                        pipeline_kwargs=kw, progress=False)
    cq.accelerate(pipe, plan)
    eager = _latents(pipe, kw)
    torch._dynamo.reset()
    try:
        pipe.transformer = torch.compile(model, fullgraph=True, backend="eager")  # a graph break raises
        np.testing.assert_array_equal(_latents(pipe, kw), eager)
        cq.restore(pipe)
    finally:
        pipe.transformer = model
        torch._dynamo.reset()
