"""The single-kernel variant (``algo="fused"``): activation quantization in the GEMM prologue.

Measured on an H200: this kernel ran SD 1.5's UNet ~2.8× *slower* than cuBLAS
fp16 — the A operand quantized in registers keeps Triton from staging it through shared memory
for the pipelined tensor-core loop, and the quantization is redone for every N-tile. The default
backend is therefore the two-pass kernel pair (:mod:`triton_quantize` + :mod:`triton_gemm`); this
one stays as the reference design for comparison in the kernel benchmark.

Fusion:

* **prologue** — the fp16/bf16 activation tile is quantized in registers right after it is loaded,
  with the per-tensor scale of the *current model call*, read from device memory (``step_ptr``),
  so the kernel needs no host sync and is CUDA-graph capturable;
* **main loop** — ``tl.dot`` on 8-bit operands (int32 or fp32 accumulation). Conv2d is an implicit
  GEMM over an NHWC (channels-last) input: row m = (image, oh, ow), reduction k = (kh, kw, c), so a
  K-tile is a contiguous run of channels at one filter tap and no im2col buffer is materialised;
* **epilogue** — dequantization (activation scale × per-output-channel weight scale), the
  zero-point corrections, bias, and the quantization-DEC correction of the cached slice
  (``O = a_t ⊙ O_cached + O_rest + bias + b_t``, method-notes Eq. 9), written once in the output dtype.

INT8 arithmetic with asymmetric (affine) quantizers. Codes are stored shifted to signed,
``w' = w_q − 128`` and ``q' = x_q − 128``, with shifted zero points ``zw' = zw − 128`` and ``z' = z − 128``.
Then for every output (n, m), over the reduction positions k of one input half::

    Σ_k (w'_k − zw')(q'_k − z') = Σ w'q'  −  zw'·Σ_k q'  −  z'·Σ_k w'  +  K·zw'·z'

The first term is the tensor-core product, the second a row sum taken in the prologue, the third a
precomputed column sum of the packed weight, the last a constant: all exact in int32
(|each| ≤ 128²·K < 2³¹ for K ≤ 131k). Padding taps load x = 0, whose code is exactly z, so they
contribute (q' − z') = 0 as in the float reference.

A layer whose input is a two-part concatenation (UNet skip) has one activation quantizer per part
and, for DEC layers, a correction on the first part only: the reduction runs in two phases over the
channel ranges [0, split) and [split, C), each with its own scale, zero point and accumulator.

FP8 (Hopper/Ada): symmetric e4m3 codes, ``x / s8`` with ``s8 = max(|lo|, |hi|) / 448`` from the same
calibrated range, weights per output channel ``max|w| / 448``; no zero points.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (dec_scale, fp8_code, int8_code, int8_dequant, part_range, store_output, tap_rows,
                            tile_setup)



# Shape arguments that vary per call site are not specialised (one compile serves every
# resolution / batch); N and C keep Triton's divisibility specialisation for vectorised loads.
@triton.jit(do_not_specialize=["M", "SPLIT", "T", "H", "W", "OH", "OW", "STRIDE", "PAD", "DIL"])
def _fused_kernel(
    x_ptr, w_ptr, y_ptr,
    step_ptr, act_s_ptr, act_z_ptr,
    w_s_ptr, w_z_ptr, w_sum_ptr,
    bias_ptr, dec_a_ptr, dec_b_ptr,
    M, N, C, SPLIT, T,
    H, W, OH, OW, STRIDE, PAD, DIL,
    KH: tl.constexpr, KW: tl.constexpr,
    IS_FP8: tl.constexpr, HAS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DEC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n, nb, oh, ow, step, w_s, w_z = tile_setup(
        M, N, OH, OW, step_ptr, w_s_ptr, w_z_ptr, IS_FP8, BM, BN, GROUP_M)
    ktot = KH * KW * C
    out = tl.zeros((BM, BN), dtype=tl.float32)

    for h in tl.static_range(2 if HAS_SPLIT else 1):
        c_lo, c_hi = part_range(h, SPLIT, C, HAS_SPLIT)
        s = tl.load(act_s_ptr + h * T + step)
        if IS_FP8:
            acc_f = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            zf = tl.load(act_z_ptr + h * T + step)  # z' = z − 128, integer-valued float
            acc = tl.zeros((BM, BN), dtype=tl.int32)
            rs = tl.zeros((BM,), dtype=tl.int32)
        for r in range(KH * KW):
            valid, row = tap_rows(r, KW, nb, oh, ow, mask_m, H, W, C, STRIDE, PAD, DIL)
            for c0 in range(c_lo, c_hi, BK):
                offs_k = c0 + tl.arange(0, BK)
                mask_k = offs_k < c_hi
                a = tl.load(x_ptr + row[:, None] + offs_k[None, :],
                            mask=valid[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                wt = tl.load(w_ptr + offs_n[None, :] * ktot + (r * C + offs_k)[:, None],
                             mask=mask_k[:, None] & mask_n[None, :], other=0)
                if IS_FP8:
                    acc_f = tl.dot(fp8_code(a, s), wt.to(tl.float8e4nv, bitcast=True), acc_f)
                else:
                    y = tl.where(mask_k[None, :], int8_code(a, s, zf), 0.0)
                    q = y.to(tl.int8)
                    acc = tl.dot(q, wt, acc, out_dtype=tl.int32)
                    rs += tl.sum(y.to(tl.int32), axis=1)
        if IS_FP8:
            part = acc_f * (s * w_s)[None, :]
        else:
            part = int8_dequant(acc, rs, w_z, zf, w_sum_ptr, h, N, offs_n, mask_n, KH * KW * (c_hi - c_lo), s * w_s)
        if HAS_DEC and h == 0:
            part = dec_scale(part, dec_a_ptr, step, N, offs_n, mask_n)
        out += part

    store_output(out, y_ptr, bias_ptr, dec_b_ptr, step, offs_m, offs_n, M, N, HAS_BIAS, HAS_DEC)


def _pow2_at_least(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def block_config(M: int, N: int, C: int, fp8: bool) -> dict:
    """Tile sizes by problem shape (no autotuning: SD's UNet has ~40 distinct shapes, and a
    compile per shape × config would cost minutes at start-up)."""
    bm = _pow2_at_least(M, 16, 128)
    bn = _pow2_at_least(N, 32, 128)
    bk = _pow2_at_least(C, 32, 128 if fp8 else 64)
    warps = 8 if bm * bn >= 128 * 128 else 4
    return {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": 3}


def launch_fused(x, w, y, step_t, act_s, act_z, w_s, w_z, w_sum, bias, dec_a, dec_b,
           M: int, N: int, C: int, split: int, T: int, geom: tuple, kh: int, kw: int, fp8: bool) -> None:
    """Launches the kernel; tensors must already be packed (see :mod:`cachequant.kernels.pack`)."""
    H, W, OH, OW, stride, pad, dil = geom
    cfg = block_config(M, N, C, fp8)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    dummy = w_s
    _fused_kernel[grid](
        x, w, y, step_t, act_s, act_z, w_s, w_z if w_z is not None else dummy,
        w_sum if w_sum is not None else dummy,
        bias if bias is not None else dummy, dec_a if dec_a is not None else dummy,
        dec_b if dec_b is not None else dummy,
        M, N, C, split, T, H, W, OH, OW, stride, pad, dil,
        KH=kh, KW=kw, IS_FP8=fp8, HAS_SPLIT=split > 0, HAS_BIAS=bias is not None, HAS_DEC=dec_a is not None,
        **cfg,
    )
