"""The Triton kernels as ``torch.library`` custom ops, so that ``torch.compile`` sees one opaque op
per quantized layer (no graph break, no tracing into launch code) and CUDA graphs capture it.

Both ops read the current position from ``step`` (the step clock's device buffer) inside the
kernels; every table is a tensor argument. Their fake implementations give the output's shape
and strides (a convolution's output is channels-last, as the kernel writes it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _run(x2d: Tensor, y2d: Tensor, w: Tensor, step: Tensor, act_s: Tensor, act_z: Tensor, w_s: Tensor,
         w_z: Optional[Tensor], w_sum: Optional[Tensor], bias: Optional[Tensor], dec_a: Optional[Tensor],
         dec_b: Optional[Tensor], c: int, m_out: int, split: int, fp8: bool, w4: bool, algo: str, gemm: str,
         kh: int, kw: int, geom: tuple, rows: tuple | None, table: Optional[str], split_k: Optional[int]) -> None:
    """x2d: (rows, C) activations (NHWC rows for a conv), or with ``rows`` (two-pass only) a 4-d conv
    input in any layout :func:`pixel_strides` describes; y2d: (m_out, N) output."""
    n = w.shape[0]
    T = act_s.shape[1]
    if algo == "fused":
        from ..kernels.triton_fused import launch_fused

        launch_fused(x2d, w, y2d, step, act_s, act_z, w_s, w_z, w_sum, bias, dec_a, dec_b, m_out, n, c, split, T,
                     geom, kh, kw, fp8)
        return
    q = quantize_rows(x2d, step, act_s, act_z, c, 0 if gemm == "cublaslt" else split, fp8, rows)
    gemm_from_codes(q, y2d, w, step, act_s, act_z, w_s, w_z, w_sum, bias, dec_a, dec_b, c, m_out, split, fp8, w4,
                    gemm, kh, kw, geom, table, split_k)


def quantize_rows(x2d: Tensor, step: Tensor, act_s: Tensor, act_z: Tensor, c: int, split: int, fp8: bool,
                  rows: tuple | None = None) -> Tensor:
    """The activation-quantize pass: (rows, C) codes, int8, or e4m3 bytes as uint8 (NHWC rows for a
    conv input given with ``rows``)."""
    from ..kernels.triton_quantize import quantize

    m_in = x2d.shape[0] if rows is None else x2d.shape[0] * rows[0]
    q = torch.empty((m_in, c), device=x2d.device, dtype=torch.uint8 if fp8 else torch.int8)
    quantize(x2d, q, step, act_s, act_z, split, act_s.shape[1], fp8, rows)
    return q


def gemm_from_codes(q: Tensor, y2d: Tensor, w: Tensor, step: Tensor, act_s: Tensor, act_z: Tensor, w_s: Tensor,
                    w_z: Optional[Tensor], w_sum: Optional[Tensor], bias: Optional[Tensor], dec_a: Optional[Tensor],
                    dec_b: Optional[Tensor], c: int, m_out: int, split: int, fp8: bool, w4: bool, gemm: str, kh: int,
                    kw: int, geom: tuple, table: Optional[str], split_k: Optional[int]) -> None:
    """The 8-bit GEMM on codes from :func:`quantize_rows`, its epilogue folding in dequantization,
    zero-point corrections, bias and quantization-DEC."""
    if gemm == "cublaslt":
        # y = (codes · W8ᵀ) · s_t · s_w + bias in one tensor-wise cuBLASLt call (one weight scale per
        # layer, see pack.py); s_t is gathered on the device at the clock's position
        cublaslt_fp8(q.view(torch.float8_e4m3fn), w, act_s[0].index_select(0, step), w_s, bias, y2d)
        return
    from ..kernels.triton_gemm import gemm as triton_gemm

    triton_gemm(q, w, y2d, step, act_s, act_z, w_s, w_z, w_sum, bias, dec_a, dec_b, m_out, w.shape[0], c, split,
                act_s.shape[1], geom, kh, kw, fp8, w4=w4, table=table, split_k_forced=split_k)


def cublaslt_fp8(q: Tensor, w: Tensor, s_act: Tensor, w_s: Tensor, bias: Optional[Tensor], y2d: Tensor) -> None:
    """``y2d = (q · w8ᵀ) · s_act · s_w + bias``: q (M, C) e4m3 codes, w (N, C) e4m3 weights (as
    uint8), s_act (1,), w_s (N,) holding one value."""
    b = None if bias is None else bias.to(y2d.dtype)
    # cuBLASLt adds a bias in its epilogue for 16-bit outputs only ("Bias is not supported when
    # out_dtype is set to Float32"): a float32 model adds it after
    late = b is not None and y2d.dtype == torch.float32
    torch._scaled_mm(q, w.view(torch.float8_e4m3fn).t(), s_act, w_s[:1], bias=None if late else b,
                     out_dtype=y2d.dtype, out=y2d)
    if late:
        y2d.add_(b)


def pixel_strides(x: Tensor) -> tuple[int, int, int, int] | None:
    """(H·W, stride of an image, of a pixel, of a channel) of a 4-d activation whose pixels are one
    stride apart (NCHW or NHWC contiguous, among others); None when they are not."""
    n, c, h, w = x.shape
    if h > 1 and w > 1 and x.stride(2) != w * x.stride(3):
        return None
    return h * w, x.stride(0), x.stride(3) if w > 1 else x.stride(2), x.stride(1)


@torch.library.custom_op("cachequant::qlinear", mutates_args=())
def qlinear(x: Tensor, w: Tensor, step: Tensor, act_s: Tensor, act_z: Tensor, w_s: Tensor, w_z: Optional[Tensor],
            w_sum: Optional[Tensor], bias: Optional[Tensor], dec_a: Optional[Tensor], dec_b: Optional[Tensor],
            split: int, fp8: bool, w4: bool, algo: str, gemm: str, table: Optional[str],
            split_k: Optional[int]) -> Tensor:
    """An 8-bit quantized Linear: ``x`` (..., C) -> (..., N), in ``x``'s dtype."""
    c = x.shape[-1]
    n = w.shape[0]
    x2 = x.reshape(-1, c).contiguous()
    y = torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
    _run(x2, y, w, step, act_s, act_z, w_s, w_z, w_sum, bias, dec_a, dec_b, c, x2.shape[0], split, fp8, w4, algo,
         gemm, 1, 1, (1, 1, 1, 1, 1, 0, 1), None, table, split_k)
    return y.view(*x.shape[:-1], n)


@qlinear.register_fake
def _(x, w, step, act_s, act_z, w_s, w_z, w_sum, bias, dec_a, dec_b, split, fp8, w4, algo, gemm, table, split_k):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _conv_out(h: int, w: int, kh: int, kw: int, stride: int, pad: int, dil: int) -> tuple[int, int]:
    return (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1, (w + 2 * pad - dil * (kw - 1) - 1) // stride + 1


@torch.library.custom_op("cachequant::qconv2d", mutates_args=())
def qconv2d(x: Tensor, w: Tensor, step: Tensor, act_s: Tensor, act_z: Tensor, w_s: Tensor, w_z: Optional[Tensor],
            w_sum: Optional[Tensor], bias: Optional[Tensor], dec_a: Optional[Tensor], dec_b: Optional[Tensor],
            split: int, fp8: bool, w4: bool, algo: str, gemm: str, table: Optional[str], split_k: Optional[int],
            kh: int, kw: int, stride: int, pad: int, dil: int) -> Tensor:
    """An 8-bit quantized Conv2d (implicit GEMM over NHWC codes); the output is channels-last."""
    n = w.shape[0]
    rows = None if algo == "fused" else pixel_strides(x)
    if rows is None:  # the fused GEMM reads NHWC rows itself
        x = x.contiguous(memory_format=torch.channels_last)
    nb, c, h, wd = x.shape
    oh, ow = _conv_out(h, wd, kh, kw, stride, pad, dil)
    y = torch.empty((nb, oh, ow, n), device=x.device, dtype=x.dtype)
    # two-pass: the quantize pass reads x in its own layout and writes NHWC codes (no fp16 copy)
    src = x if rows is not None else x.permute(0, 2, 3, 1).reshape(-1, c)
    _run(src, y.view(-1, n), w, step, act_s, act_z, w_s, w_z, w_sum, bias, dec_a, dec_b, c, nb * oh * ow, split, fp8,
         w4, algo, gemm, kh, kw, (h, wd, oh, ow, stride, pad, dil), rows, table, split_k)
    return y.permute(0, 3, 1, 2)


@qconv2d.register_fake
def _(x, w, step, act_s, act_z, w_s, w_z, w_sum, bias, dec_a, dec_b, split, fp8, w4, algo, gemm, table, split_k,
      kh, kw, stride, pad, dil):
    nb, _, h, wd = x.shape
    oh, ow = _conv_out(h, wd, kh, kw, stride, pad, dil)
    return x.new_empty((nb, oh, ow, w.shape[0])).permute(0, 3, 1, 2)


@torch.library.custom_op("cachequant::group_norm_nhwc", mutates_args=())
def group_norm_nhwc(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float) -> Tensor:
    """GroupNorm of a channels-last ``x`` that stays channels-last (Triton)."""
    from ..kernels.triton_groupnorm import group_norm_nhwc as kernel

    return kernel(x, num_groups, weight, bias, eps)


@group_norm_nhwc.register_fake
def _(x, num_groups, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.channels_last)
