"""One-pass fake quantization of fp32 activations on the GPU (the reference path, made cheap).

The fake-quant reference (:func:`cachequant.quant.quantizer.fake_quant`) is six elementwise torch
ops: divide, round, add, clamp, subtract, multiply, each a full read and write of the activation.
On the H200 the CIFAR DiT's cached W8A8 variants took 103 s per 10k samples against 86 s for full
precision, which executes 1.8× their MACs; by memory traffic (every quantized activation, attention
probabilities included, at batch 2,500 with CFG) these passes are the likely bulk of the difference,
an estimate; `benchmarks/fake_quant_speed.py` measures the passes. This kernel does the same arithmetic in one pass,
*bit-identically*: the same fp32 operations in the same order (IEEE division, round half to even
as ``torch.round``, add the zero point, clamp, subtract it, multiply), so a table sampled with it is
the reference's table. NaN inputs stay NaN, as in torch.

The division must be ``tl.div_rn``: Triton compiles a plain fp32 ``/`` to the GPU's approximate
division (up to 2 ulp off; the interpreter divides exactly, so CPU tests cannot see it). With it,
on an H200 about 6 elements in 10 million came out one quantization step off
(`results/fake-quant/README.md`).

The scale and zero point are 0-d device tensors (this call's entries of the per-step tables), read
in the kernel: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _fake_quant_kernel(x_ptr, y_ptr, s_ptr, z_ptr, n, qmin, qmax, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    s = tl.load(s_ptr)
    z = tl.load(z_ptr)
    y = tl.minimum(tl.maximum(tl.div_rn(x, s), -4194304.0), 4194304.0)  # |y| < 2^22: the rounding below is exact
    y = (y + 12582912.0) - 12582912.0  # 1.5·2^23: round half to even, as torch.round
    q = tl.minimum(tl.maximum(y + z, qmin), qmax)
    out = (q - z) * s
    out = tl.where(x != x, x, out)  # NaN in, NaN out (max/min would swallow it)
    tl.store(y_ptr + offs, out, mask=mask)


def supported(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> bool:
    """fp32 activations with one (0-d or 1-element) scale and zero point: the per-tensor case."""
    return (x.dtype == torch.float32 and scale.numel() == 1 and zero_point.numel() == 1
            and scale.dtype == torch.float32 and zero_point.dtype == torch.float32
            and scale.device == x.device == zero_point.device)


def fake_quant_fused(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) − z) · s`` in one pass; bit-identical to
    :func:`cachequant.quant.quantizer.fake_quant` for fp32 inputs."""
    if not supported(x, scale, zero_point):
        raise ValueError("fake_quant_fused needs fp32 x and a single fp32 scale / zero point on x's device; "
                         f"got x {x.dtype} on {x.device}, scale {tuple(scale.shape)} {scale.dtype}, "
                         f"zero point {tuple(zero_point.shape)} {zero_point.dtype}")
    qmin, qmax = 0, 2**bits - 1
    xc = x.contiguous()
    y = torch.empty_like(xc)
    n = xc.numel()
    if n:
        _fake_quant_kernel[(triton.cdiv(n, _BLOCK),)](xc, y, scale.reshape(()), zero_point.reshape(()), n,
                                                     float(qmin), float(qmax), BLOCK=_BLOCK)
    return y.view(x.shape)
