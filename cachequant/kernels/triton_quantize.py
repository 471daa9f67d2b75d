"""Pass 1 of the default kernel pair: quantize an activation tensor to 8-bit codes, once.

One read of the fp16/bf16/fp32 activation and one write of 1 byte per element, with the scale and
zero point of the *current model call* read from device memory (``step_ptr``), so the pass is
CUDA-graph capturable. The GEMM (:mod:`triton_gemm`) then streams 8-bit operands only, and a 3×3
convolution reads each code from L2 up to nine times instead of re-quantizing it nine times.

Codes: INT8 ``q' = clamp(round(x / s) + z, 0, 255) − 128`` (the reference's order of operations, so
codes are bit-identical to :func:`cachequant.quant.quantizer.quantize_codes` − 128); FP8 e4m3 of
``x / s8``, stored as raw bytes. Inputs that are a two-part concatenation take the scale of the part
their channel belongs to (``SPLIT``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import fp8_code, int8_code


@triton.jit
def _per_part(ptr, T, step, offs_c, SPLIT, HAS_SPLIT: tl.constexpr):
    """This call's value from a (parts, T) table: per channel when the input is a concatenation."""
    v = tl.load(ptr + step)
    if HAS_SPLIT:
        v = tl.where(offs_c < SPLIT, v, tl.load(ptr + T + step))[None, :]
    return v


@triton.jit(do_not_specialize=["M", "SPLIT", "T"])
def _quantize_kernel(x_ptr, q_ptr, step_ptr, act_s_ptr, act_z_ptr, M, C, SPLIT, T,
                     IS_FP8: tl.constexpr, HAS_SPLIT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    step = tl.load(step_ptr)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_c = pid_c * BC + tl.arange(0, BC)
    mask = (offs_m < M)[:, None] & (offs_c < C)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _per_part(act_s_ptr, T, step, offs_c, SPLIT, HAS_SPLIT)
    if IS_FP8:
        y = fp8_code(x, s).to(tl.uint8, bitcast=True)
    else:
        y = int8_code(x, s, _per_part(act_z_ptr, T, step, offs_c, SPLIT, HAS_SPLIT)).to(tl.int8)
    tl.store(q_ptr + offs_m[:, None] * C + offs_c[None, :], y, mask=mask)


def quantize(x, q, step_t, act_s, act_z, split: int, T: int, fp8: bool) -> None:
    """``x`` (M, C) contiguous → ``q`` (M, C) int8 (INT8 codes) or uint8 (e4m3 bytes)."""
    M, C = x.shape
    bm, bc = 64, min(128, triton.next_power_of_2(C))
    grid = (triton.cdiv(M, bm), triton.cdiv(C, bc))
    _quantize_kernel[grid](x, q, step_t, act_s, act_z, M, C, split, T, IS_FP8=fp8, HAS_SPLIT=split > 0,
                           BM=bm, BC=bc, num_warps=4)
