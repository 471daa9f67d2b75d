"""Packing a calibrated quantized layer into the operands of the Triton kernel.

Policy lives in :mod:`cachequant.quant` (what the codes and ranges are); this module only lays the
same numbers out for the kernel: K-major 8-bit weights in (kh, kw, c) order, shifted zero points,
per-half weight column sums, per-call activation tables. Nothing here changes a value the plan
defines, except the FP8 backend's own e4m3 rounding (documented in triton_qgemm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quant.layers import _QuantBase

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class Packed:
    kind: str               # "int8" | "fp8"
    w: torch.Tensor         # (N, KH·KW·C) int8 codes, or e4m3 bytes as uint8, or (N, KH·KW·C / 2)
                            # 4-bit codes two per byte (w4); K contiguous
    w_s: torch.Tensor       # (N,) fp32
    w_z: torch.Tensor | None    # (N,) int32, zw − 128 (int8 only)
    w_sum: torch.Tensor | None  # (halves, N) int32, Σ_k w' per input half (int8 only)
    act_s: torch.Tensor     # (halves, T) fp32
    act_z: torch.Tensor     # (halves, T) fp32, z − 128 (int8); zeros (fp8)
    bias: torch.Tensor | None
    dec_a: torch.Tensor | None  # (T, N) fp32
    dec_b: torch.Tensor | None
    split: int              # 0 = one input part
    kh: int
    kw: int
    conv: dict | None       # stride / padding / dilation for Conv2d
    algo: str = "two-pass"  # "two-pass" (quantize, then GEMM) | "fused" (quantize in the GEMM prologue)
    w4: bool = False        # 4-bit weight codes packed two per byte (W4A8, two-pass INT8 only)
    gemm: str = "triton"    # "triton" | "cublaslt" (FP8 GEMM-shaped layers: torch._scaled_mm, see fp8_gemm)
    lt_w: torch.Tensor | None = None    # (K, N) e4m3 view of w, column-major: cuBLASLt's operand B
    lt_w_s: torch.Tensor | None = None  # (1, N) fp32: w_s as cuBLASLt's row-wise scale_b
    lt_bias: torch.Tensor | None = None  # bias in the weights' dtype (cuBLASLt adds it in its epilogue)


FP8_GEMMS = ("triton", "cublaslt")


def fp8_gemm(device: torch.device | str) -> str:
    """Which GEMM runs the FP8 backend's GEMM-shaped layers on ``device``.

    ``CACHEQUANT_FP8_GEMM`` picks one: ``cublaslt`` runs ``torch._scaled_mm`` (cuBLASLt, row-wise
    scales) for every Linear and 1×1 conv with one input part and no DEC, the rest staying on Triton;
    ``triton`` runs cachequant's Triton GEMM everywhere. Unset, it is ``cublaslt`` on Hopper or newer
    (compute capability ≥ 9.0, where row-wise scaled FP8 GEMMs are cuBLASLt's) and ``triton``
    elsewhere (older GPUs, and the CPU interpreter, whose tests check the Triton GEMM). Why: at the
    small K / N of batch-1 SD and DiT layers the Triton FP8 GEMM reached 16–85 TFLOP/s where fp16
    cuBLAS reached 133–303; on an H200 cuBLASLt made FP8 quant-only 5 % (SD 1.5) and 19 % (DiT-XL/2)
    faster end to end (``benchmarks/results/h200.md``, ninth session)."""
    import os

    v = os.environ.get("CACHEQUANT_FP8_GEMM")
    if v is None:
        dev = torch.device(device)
        hopper = dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (9, 0)
        return "cublaslt" if hopper else "triton"
    if v not in FP8_GEMMS:
        raise ValueError(f"CACHEQUANT_FP8_GEMM must be one of {', '.join(FP8_GEMMS)}; got {v!r}")
    return v


def cublaslt_fits(algo: str, kh: int, kw: int, conv: dict | None, split: int, has_dec: bool, c: int, n: int) -> bool:
    """A layer cuBLASLt's FP8 GEMM computes as the Triton kernel does: a plain (M, C)·(C, N)
    product (Linear, or 1×1 conv with stride 1 and no padding over NHWC rows), one activation
    scale per call, no per-part or DEC factor in the epilogue, C and N multiples of 16."""
    plain = kh == kw == 1 and (conv is None or (conv["stride"], conv["pad"], conv["dil"]) == (1, 0, 1))
    return (algo == "two-pass" and plain and not split and not has_dec
            and c % 16 == 0 and n % 16 == 0 and hasattr(torch, "_scaled_mm"))


def unsupported_reason(layer: _QuantBase) -> str | None:
    """Why this layer cannot run on the kernel (it then keeps the fake-quant path), or None."""
    inner = layer.inner
    if layer.act_bits != 8:
        return f"{layer.act_bits}-bit activations (kernels are A8)"
    if layer.weight_bits > 8:
        return f"{layer.weight_bits}-bit weights"
    if isinstance(inner, nn.Conv2d):
        if inner.groups != 1:
            return "grouped convolution"
        if inner.padding_mode != "zeros" or isinstance(inner.padding, str):
            return f"padding {inner.padding!r} / mode {inner.padding_mode}"
        if inner.stride[0] != inner.stride[1] or inner.padding[0] != inner.padding[1] or inner.dilation[0] != inner.dilation[1]:
            return "non-square stride / padding / dilation"
    if layer.split is not None and layer.split % 16:
        return f"input split at channel {layer.split} (not a multiple of 16)"
    return None


def pack_layer(layer: _QuantBase, kind: str, algo: str = "two-pass") -> Packed:
    if kind not in ("int8", "fp8"):
        raise ValueError(f"unknown kernel kind {kind!r}; use 'int8' or 'fp8'")
    if algo not in ("two-pass", "fused"):
        raise ValueError(f"unknown kernel algorithm {algo!r}; use 'two-pass' or 'fused'")
    inner = layer.inner
    dev = inner.weight.device
    w = inner.weight.detach().float()
    n = w.shape[0]
    halves = 1 if layer.split is None else 2
    if w.dim() == 4:
        kh, kw = w.shape[2], w.shape[3]
        w_khwc = w.permute(0, 2, 3, 1)  # (N, KH, KW, C)
        conv = {"stride": inner.stride[0], "pad": inner.padding[0], "dil": inner.dilation[0]}
    else:
        kh = kw = 1
        w_khwc = w[:, None, None, :]
        conv = None
    c = w_khwc.shape[-1]
    ws = layer.w_scale.reshape(n).float()
    wz = layer.w_zero_point.reshape(n).float()
    scales = torch.stack([q.scale.float() for q in layer.act])          # (halves, T)
    zeros = torch.stack([q.zero_point.float() for q in layer.act])
    # Calls a layer never ran on during calibration (deep layers on cached steps) keep scale 1;
    # the plan's schedule, checked by the session, guarantees they are not executed then either.
    w4 = False
    if kind == "int8":
        codes = layer.weight_codes()  # nearest rounding of the weight, or the plan's GPTQ codes
        codes = codes.permute(0, 2, 3, 1) if codes.dim() == 4 else codes[:, None, None, :]
        w4 = layer.weight_bits <= 4 and algo == "two-pass" and packs_w4(c, layer.split or 0)
        # 4-bit codes keep their value (0..15, zero point unshifted); 8-bit ones are shifted by −128
        # into int8. The kernel's zero-point algebra is the same for any shift.
        shift = 0 if w4 else 128
        wq = (codes - shift).to(torch.int8)
        bounds = [(0, c)] if halves == 1 else [(0, layer.split), (layer.split, c)]
        w_sum = torch.stack([wq[..., lo:hi].to(torch.int32).sum(dim=(1, 2, 3)) for lo, hi in bounds])
        flat = wq.reshape(n, -1)
        if w4:
            u = flat.to(torch.uint8)  # codes 0..15
            packed_w = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()
        else:
            packed_w = flat.contiguous()
        w_s, w_z = ws, (wz - shift).to(torch.int32)
        act_s, act_z = scales, zeros - 128
    else:
        wd = layer.dequantized_weight().float()
        layer._w_dq = None  # the reference path's cached copy: not needed while the kernel runs
        wd = wd.permute(0, 2, 3, 1) if wd.dim() == 4 else wd[:, None, None, :]
        w_s = torch.clamp(wd.abs().amax(dim=(1, 2, 3)) / FP8_MAX, min=1e-12)
        packed_w = (wd / w_s.view(n, 1, 1, 1)).to(torch.float8_e4m3fn).reshape(n, -1).contiguous().view(torch.uint8)
        w_z = w_sum = None
        # The symmetric e4m3 scale covering the calibrated asymmetric range [(0 − z)s, (2^b − 1 − z)s].
        qmax = 2**layer.act_bits - 1
        act_s = torch.maximum(zeros * scales, (qmax - zeros) * scales) / FP8_MAX
        act_z = torch.zeros_like(act_s)
    bias = None if inner.bias is None else inner.bias.detach().float().contiguous()
    dec_a = dec_b = None
    if layer.has_dec:
        dec_a, dec_b = layer.dec_a.float().contiguous(), layer.dec_b.float().contiguous()
    to = lambda t: None if t is None else t.to(dev).contiguous()  # noqa: E731
    pk = Packed(kind, packed_w.to(dev), to(w_s), to(w_z), to(w_sum), to(act_s), to(act_z), to(bias),
                to(dec_a), to(dec_b), layer.split or 0, kh, kw, conv, algo, w4)
    if kind == "fp8" and fp8_gemm(dev) == "cublaslt" and cublaslt_fits(algo, kh, kw, conv, pk.split, layer.has_dec, c, n):
        pk.gemm = "cublaslt"
        pk.lt_w = pk.w.view(torch.float8_e4m3fn).t()
        pk.lt_w_s = pk.w_s.view(1, n)
        pk.lt_bias = None if inner.bias is None else inner.bias.detach().to(dev).contiguous()
    return pk


def packs_w4(c: int, split: int) -> bool:
    """4-bit weights are stored two per byte when every input part is a multiple of the K block
    (the unmasked kernel path, whose byte offsets are then even); else one code per byte."""
    from .triton_gemm import k_block

    return k_block(c, split)[1]
