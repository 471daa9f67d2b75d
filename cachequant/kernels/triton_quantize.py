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


# LAYOUT of the input rows (a constexpr, so that Triton knows which addresses are contiguous and
# vectorizes those loads; with runtime strides alone it could prove nothing, and the pass ran 3×
# slower on the H200: 149 vs 51 ms per SD image in a profile of the quant-only SD 1.5 pipeline)
DENSE, STRIDED, PIXEL_CONTIGUOUS = 0, 1, 2


@triton.jit(do_not_specialize=["M", "SPLIT", "T", "HW", "S_N", "S_HW", "S_C"])
def _quantize_kernel(x_ptr, q_ptr, rs_ptr, step_ptr, act_s_ptr, act_z_ptr, M, C, SPLIT, T, HW, S_N, S_HW, S_C,
                     IS_FP8: tl.constexpr, HAS_SPLIT: tl.constexpr, LAYOUT: tl.constexpr,
                     WRITE_ROW_S: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    step = tl.load(step_ptr)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_c = pid_c * BC + tl.arange(0, BC)
    mask = (offs_m < M)[:, None] & (offs_c < C)[None, :]
    if LAYOUT == 0:  # DENSE: (M, C) rows, channels contiguous: a linear's input or an NHWC conv input
        ptrs = x_ptr + offs_m[:, None].to(tl.int64) * C + offs_c[None, :]
    elif LAYOUT == 2:  # PIXEL_CONTIGUOUS: pixels contiguous (NCHW) and a block never straddles two images (HW % BM == 0)
        n = (pid_m * BM) // HW
        p = (pid_m * BM) % HW + tl.arange(0, BM)
        ptrs = x_ptr + n.to(tl.int64) * S_N + p[:, None] + offs_c[None, :].to(tl.int64) * S_C
    else:  # STRIDED: row m = (image n, pixel p), any layout whose pixels are one stride apart
        src = (offs_m // HW).to(tl.int64) * S_N + (offs_m % HW).to(tl.int64) * S_HW
        ptrs = x_ptr + src[:, None] + offs_c[None, :].to(tl.int64) * S_C
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    s = _per_part(act_s_ptr, T, step, offs_c, SPLIT, HAS_SPLIT)
    if IS_FP8:
        y = fp8_code(x, s).to(tl.uint8, bitcast=True)
    else:
        y = int8_code(x, s, _per_part(act_z_ptr, T, step, offs_c, SPLIT, HAS_SPLIT)).to(tl.int8)
    tl.store(q_ptr + offs_m[:, None].to(tl.int64) * C + offs_c[None, :], y, mask=mask)
    if WRITE_ROW_S:
        # this call's scale once per row, the row-wise scale a cuBLASLt FP8 GEMM reads: written here,
        # it costs no launch of its own (one input part only, so s is one number)
        if pid_c == 0:
            tl.store(rs_ptr + offs_m, tl.zeros([BM], dtype=tl.float32) + s, mask=offs_m < M)


def _layout(rows: tuple | None, m: int, c: int, bm: int) -> int:
    if rows is None:
        return DENSE
    hw, s_n, s_hw, s_c = rows
    if s_c == 1 and s_hw == c and (s_n == hw * c or m == hw):  # NHWC contiguous: plain (M, C) rows
        return DENSE
    if s_hw == 1 and hw % bm == 0:
        return PIXEL_CONTIGUOUS
    return STRIDED


def quantize(x, q, step_t, act_s, act_z, split: int, T: int, fp8: bool, rows: tuple | None = None,
             row_s=None) -> None:
    """Activations → ``q`` (M, C) int8 (INT8 codes) or uint8 (e4m3 bytes), rows in NHWC order.

    ``x`` is (M, C) contiguous, or, with ``rows = backend.pixel_strides(x)``, a 4-d conv input in any
    layout those strides describe. Why: an NCHW input (PyTorch's CUDA GroupNorm output, diffusers'
    transformer blocks' ``permute(...).contiguous()``) then becomes NHWC codes in this one pass,
    which reads and writes every element anyway, instead of an fp16 NHWC copy first.

    ``row_s`` (M, 1) fp32, optional: also receives this call's activation scale in every row (the
    ``scale_a`` of ``torch._scaled_mm``'s row-wise scaling); only for inputs of one part."""
    if row_s is not None and split:
        raise ValueError("row_s needs an input of one part (split = 0): a concatenation has two scales per row")
    C = q.shape[1]
    M = q.shape[0]
    bm, bc = 64, min(128, triton.next_power_of_2(C))
    layout = _layout(rows, M, C, bm)
    hw, s_n, s_hw, s_c = rows if rows is not None else (M, 0, C, 1)
    grid = (triton.cdiv(M, bm), triton.cdiv(C, bc))
    _quantize_kernel[grid](x, q, row_s if row_s is not None else act_s, step_t, act_s, act_z, M, C, split, T, hw,
                           s_n, s_hw, s_c, IS_FP8=fp8, HAS_SPLIT=split > 0, LAYOUT=layout,
                           WRITE_ROW_S=row_s is not None, BM=bm, BC=bc, num_warps=4)
