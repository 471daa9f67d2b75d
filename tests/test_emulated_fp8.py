"""The ``fp8-emulated`` backend: the FP8 kernels' arithmetic in float ops on any device.

It must compute what the FP8 kernels compute — checked on the CPU against ``torch._scaled_mm`` on
the same e4m3 codes (the cuBLASLt layers' arithmetic) and, on a GPU, against the Triton FP8 kernel
itself — and so stay within FP8's error bound of the INT8 reference on every layer shape the
kernels take (split inputs and quantization-DEC included). Through a pipeline it runs, reports
itself and restores.
"""

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="shares the kernel tests' layers (CI installs Triton)")

import cachequant as cq  # noqa: E402
from cachequant.backends.emulated import EmulatedFP8Backend  # noqa: E402
from cachequant.backends.options import KernelOptions  # noqa: E402
from cachequant.backends.pack import FP8_MAX, packed  # noqa: E402
from test_kernels import CUDA, SHAPES, T, Layer, _tiny_unet_plan  # noqa: E402


def _emulate(layer: Layer, fp8_gemm: str | None = None) -> EmulatedFP8Backend:
    backend = EmulatedFP8Backend(KernelOptions(backend="fp8-emulated", fp8_gemm=fp8_gemm).resolved())
    assert backend.unsupported(layer.module, layer.hook) is None
    backend.prepare(layer.module, layer.hook)
    layer.hook.backend = backend
    return backend


@pytest.mark.parametrize("fp8_gemm", ["triton", "cublaslt"])
@pytest.mark.parametrize("name,make,xshape,kw", SHAPES, ids=[s[0] for s in SHAPES])
def test_emulated_fp8_within_fp8_bound_of_the_reference(name, make, xshape, kw, fp8_gemm):
    """Per-channel (Triton GEMM) or per-layer (cuBLASLt) weight scales: e4m3 keeps 3 mantissa bits,
    a few percent per product averaged down over the reduction — the kernels' own bound. A wrong
    layout (conv weight order, split part, DEC factor) would be far outside it."""
    torch.manual_seed(0)
    layer = Layer(make(), xshape, **kw)
    refs = [layer.reference(t) for t in range(T)]
    _emulate(layer, fp8_gemm)
    for t in range(T):
        y = layer.out(t)
        assert y.shape == refs[t].shape and y.dtype == refs[t].dtype
        assert float((y - refs[t]).abs().max() / refs[t].abs().max()) < 0.08, t


@pytest.mark.parametrize("make,xshape", [(lambda: nn.Linear(64, 48), (2, 8, 64)),
                                         (lambda: nn.Conv2d(32, 48, 1), (2, 32, 4, 6))])
def test_emulated_fp8_is_the_cublaslt_product(make, xshape):
    """A tensor-wise layer's output is ``torch._scaled_mm(e4m3(x / s_t), W8ᵀ, s_t, s_w) + bias``.

    On the CPU ``_scaled_mm`` decodes and multiplies in fp32, so the two agree to fp32 rounding; a
    Hopper GPU's FP8 tensor cores accumulate with fewer mantissa bits than fp32 (measured on an H100:
    up to 4e-4 of the largest output at K = 64), hence 1e-3 of it there, as for the Triton kernel."""
    if not hasattr(torch, "_scaled_mm"):
        pytest.skip("torch._scaled_mm is missing")
    torch.manual_seed(0)
    layer = Layer(make(), xshape)
    _emulate(layer)
    assert layer.pack.gemm == "cublaslt"
    pk = packed(layer.module)
    w8 = pk["w"].view(torch.float8_e4m3fn)
    for t in range(T):
        x = layer.xs[t]
        x2d = (x.permute(0, 2, 3, 1) if x.dim() == 4 else x).reshape(-1, w8.shape[1]).float()
        s = pk["act_s"][0, t:t + 1]
        codes = torch.clamp(x2d / s, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        # the exact product (CPU: decode, multiply and sum in fp32); cuBLASLt refuses an fp32
        # output for some of these small shapes on the H100 (CUBLAS_STATUS_NOT_SUPPORTED)
        want = torch._scaled_mm(codes.cpu(), w8.t().cpu(), s.cpu(), pk["w_s"][:1].cpu(),
                                out_dtype=torch.float32).to(x.device) + pk["bias"]
        y = layer.out(t)
        got = (y.permute(0, 2, 3, 1) if y.dim() == 4 else y).reshape(want.shape)
        tol = 1e-3 if want.is_cuda else 1e-5
        torch.testing.assert_close(got.float(), want, rtol=0 if want.is_cuda else 1e-5,
                                   atol=tol * float(want.abs().max()))


@pytest.mark.skipif(not CUDA, reason="Triton's interpreter has no fp8 arithmetic; runs on the GPU (device)")
@pytest.mark.parametrize("name,make,xshape,kw", SHAPES, ids=[s[0] for s in SHAPES])
def test_emulated_fp8_equals_the_triton_fp8_kernel(name, make, xshape, kw):
    """Same codes, same scales: only the accumulation order differs (FP8 tensor cores accumulate with
    fewer mantissa bits than fp32, hence 1e-3 of the largest output)."""
    torch.manual_seed(0)
    layer = Layer(make(), xshape, **kw)
    layer.use_kernel("fp8", fp8_gemm="triton")
    kernel = [layer.out(t) for t in range(T)]
    layer.hook.backend.release(layer.module)
    _emulate(layer, "triton")
    for t in range(T):
        want = kernel[t].float()
        torch.testing.assert_close(layer.out(t).float(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_emulated_fp8_through_a_pipeline(make_pipe):
    """accelerate(backend='fp8-emulated') runs the cached, quantized UNet on the CPU: the images are
    within quantization noise of the INT8 reference's, the report names the backend, restore gives the float model back."""
    from conftest import run

    from cachequant.metrics import psnr

    pipe, plan = _tiny_unet_plan(make_pipe, 4, device="cpu")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cq.accelerate(pipe, plan, backend="fake")
    ref = run(pipe, "ddim", 4, n=1)
    cq.restore(pipe)
    cq.accelerate(pipe, plan, backend="fp8-emulated")
    report = cq.kernel_report(pipe)
    assert report["backend"] == "fp8-emulated" and report["kernel_layers"] > 0 and not report["fake_layers"]
    out = run(pipe, "ddim", 4, n=1)
    cq.restore(pipe)
    # The tiny random UNet is fragile under 8 bits (INT8 itself is ~24 dB from the float model on
    # this run, e4m3 ~22): the two 8-bit grids agree at that level, a wrong layout would not.
    assert 18 < psnr(out, ref) < 60
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
