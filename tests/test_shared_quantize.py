"""One quantize pass for an attention's q, k and v projections (``KernelOptions.share_quantize``):
the same outputs, two fewer quantize passes per attention, and the tuner deciding for the group as
a whole. On a machine without a GPU the INT8 kernels run in Triton's interpreter."""

import numpy as np
import pytest
import torch

import cachequant as cq
from cachequant.backends.autotune import LayerTuner
from cachequant.backends.groups import SharedQuantize

pytestmark = pytest.mark.fresh_thread  # Triton's interpreter runs deep call chains (conftest)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_codes_are_reused_only_for_the_same_tensor_once_per_member():
    made = []
    group = SharedQuantize([(None, type("H", (), {"name": n})()) for n in ("q", "k", "v")])

    def codes(name, x):
        return group.codes(name, x, lambda: made.append(x) or x * 2)

    x, y = torch.ones(2), torch.ones(2)  # equal values, different tensors
    assert torch.equal(codes("q", x), x * 2) and len(made) == 1
    codes("k", x), codes("v", x)
    assert len(made) == 1 and group._x is None  # all three served: nothing held
    codes("q", x)
    codes("k", y)  # a different tensor object: quantized again
    codes("q", y)  # back again for an input it already took: quantized again
    assert len(made) == 3


@pytest.fixture(scope="module")
def dit_plan():
    pytest.importorskip("triton")
    from cachequant.models.tiny import tiny_dit_pipeline

    pipe = tiny_dit_pipeline(num_layers=2).to(DEV)
    cfg = cq.CacheQuantConfig(interval=1, schedule="uniform", dec=False, quant_attention=False,
                              calib_batch_size=2, dps_samples=2)
    return pipe, cq.calibrate(pipe, cfg, 2, class_labels=[0, 1], progress=False)


def _images(pipe):
    g = torch.Generator(DEV).manual_seed(0)
    return pipe(class_labels=[3], num_inference_steps=2, generator=g, guidance_scale=1.0, output_type="np").images


@pytest.mark.parametrize("backend", ["int8", pytest.param("fp8", marks=pytest.mark.skipif(
    DEV != "cuda", reason="Triton's interpreter has no fp8 arithmetic; runs on the GPU (device)"))])
def test_shared_quantize_computes_the_same_images_with_fewer_passes(dit_plan, monkeypatch, backend):
    """On a Hopper GPU the fp8 case runs the cuBLASLt GEMMs, as the SD3 / Flux rows do."""
    from cachequant.kernels import triton_quantize

    pipe, plan = dit_plan
    passes = []
    real = triton_quantize.quantize
    monkeypatch.setattr(triton_quantize, "quantize", lambda *a, **k: passes.append(1) or real(*a, **k))
    out, counts = {}, {}
    for share in (False, True):
        cq.accelerate(pipe, plan, backend=backend, share_quantize=share)
        rep = cq.kernel_report(pipe)
        passes.clear()
        out[share] = _images(pipe)
        counts[share] = len(passes)
        cq.restore(pipe)
    groups = [f"transformer_blocks.{i}.attn1.to_q+transformer_blocks.{i}.attn1.to_k+"
              f"transformer_blocks.{i}.attn1.to_v" for i in range(2)]
    assert rep["shared_quantize"] == groups
    np.testing.assert_array_equal(out[True], out[False])
    assert counts[False] - counts[True] == 2 * len(groups) * 2  # two passes saved per attention per step


class _Tuner(LayerTuner):
    """In memory; a layer alone measures 1 µs in 8-bit against 2 µs in float, a q/k/v group
    9 µs against 6 µs."""

    def choose(self, name, key, kernel, float_op, gemm_only=None):
        times = iter([9.0, 6.0] if key.startswith("shared|") else [1.0, 2.0, 1.0])
        self.measure = lambda fn: (fn(), next(times))[1]
        return super().choose(name, key, kernel, float_op, gemm_only)


def test_the_tuner_decides_for_the_group(dit_plan):
    """Each member alone is faster in 8-bit here, the group is not: every member runs its float
    op, and the report gives the group's timings and key."""
    from cachequant.session import session_of

    pipe, plan = dit_plan
    cq.accelerate(pipe, plan, backend="int8")
    sess = session_of(pipe.transformer)
    backend = sess.layers["transformer_blocks.0.attn1.to_q"].backend
    backend.tuner = _Tuner(None, measure=lambda fn: 0.0)
    _images(pipe)
    rep = cq.kernel_report(pipe)
    members = [f"transformer_blocks.{i}.attn1.{n}" for i in range(2) for n in ("to_q", "to_k", "to_v")]
    assert rep["tuned_layers"] == len(sess.layers)
    assert sorted(rep["float_layers"]) == sorted(members)
    assert all("6.0 µs vs 9.0 µs" in why and "shared|" in why for why in rep["float_layers"].values())
    assert not rep["float_layers_compiled"]  # compiled, each layer runs alone, where 8-bit wins
    cq.restore(pipe)
