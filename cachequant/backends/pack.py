"""Packing a quantized layer's plan data into the operands of the Triton kernels.

Policy lives in :mod:`cachequant.quant` (what the codes and ranges are); this module only lays the
same numbers out for the kernels, as buffers on the layer's module: K-major 8-bit weights in
(kh, kw, c) order, shifted zero points, per-part weight column sums, per-position activation
tables. Nothing here changes a value the plan defines, except the FP8 backend's own e4m3 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quant.layer import ACT, QDEC
from ..quant.quantizer import E4M3_MAX as FP8_MAX  # largest finite float8_e4m3fn
from ..runtime.hooks import held, hold, release

PACK = "_cachequant_k_"
FIELDS = ("w", "w_s", "w_z", "w_sum", "act_s", "act_z", "bias", "dec_a", "dec_b")


@dataclass(frozen=True)
class PackInfo:
    """The static shape of a packed layer (the tensors are buffers named ``PACK + field``)."""
    kind: str               # "int8" | "fp8"
    split: int              # 0 = one input part
    kh: int
    kw: int
    conv: tuple[int, int, int] | None  # (stride, padding, dilation) of a Conv2d
    algo: str = "two-pass"  # "two-pass" (quantize, then GEMM) | "fused" (quantize in the GEMM prologue)
    w4: bool = False        # 4-bit weight codes packed two per byte (W4A8, two-pass INT8 only)
    gemm: str = "triton"    # "triton" | "cublaslt" (FP8 GEMM-shaped layers: tensor-wise torch._scaled_mm)
    table: str | None = None  # tile table setting (KernelOptions.tiles)
    split_k: int | None = None  # forced reduction split (KernelOptions.split_k)


def default_fp8_gemm(device: torch.device) -> str:
    """cuBLASLt on Hopper or newer (compute capability ≥ 9.0), Triton elsewhere (older GPUs, and the
    CPU interpreter, whose tests check the Triton GEMM). Why: at the small K / N of batch-1 SD and
    DiT layers the Triton FP8 GEMM reached 16–85 TFLOP/s where fp16 cuBLAS reached 133–303, and
    cuBLASLt's tensor-wise FP8 GEMM is the fastest 8-bit GEMM there (1.1–1.6× fp16)."""
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
    return "cublaslt" if hopper else "triton"


def cublaslt_fits(algo: str, kh: int, kw: int, conv: tuple | None, split: int, has_dec: bool, c: int, n: int) -> bool:
    """A layer cuBLASLt's FP8 GEMM computes as the Triton kernel does: a plain (M, C)·(C, N)
    product (Linear, or 1×1 conv with stride 1 and no padding over NHWC rows), one activation
    scale per call, no per-part or DEC factor in the epilogue, C and N multiples of 16."""
    plain = kh == kw == 1 and (conv is None or conv == (1, 0, 1))
    return (algo == "two-pass" and plain and not split and not has_dec
            and c % 16 == 0 and n % 16 == 0 and hasattr(torch, "_scaled_mm"))


def unsupported_reason(module: nn.Module, hook) -> str | None:
    """Why this layer cannot run on the kernel (it then keeps the reference path), or None."""
    if hook.act_bits != 8:
        return f"{hook.act_bits}-bit activations (kernels are A8)"
    if hook.weight_bits > 8:
        return f"{hook.weight_bits}-bit weights"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped convolution"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"padding {module.padding!r} / mode {module.padding_mode}"
        if module.stride[0] != module.stride[1] or module.padding[0] != module.padding[1] \
                or module.dilation[0] != module.dilation[1]:
            return "non-square stride / padding / dilation"
    if hook.split is not None and hook.split % 16:
        return f"input split at channel {hook.split} (not a multiple of 16)"
    if module.weight.numel() == 0:
        return "its float weights were dropped"
    return None


def pack_layer(module: nn.Module, hook, kind: str, algo: str = "two-pass", fp8_gemm: str = "triton",
               table: str | None = None, split_k: int | None = None) -> PackInfo:
    """Holds the kernel operands on ``module`` and returns their static description."""
    if kind not in ("int8", "fp8"):
        raise ValueError(f"unknown kernel kind {kind!r}; use 'int8' or 'fp8'")
    dev = module.weight.device
    w = module.weight.detach().float()
    n = w.shape[0]
    split = hook.split or 0
    if w.dim() == 4:
        kh, kw = w.shape[2], w.shape[3]
        conv = (module.stride[0], module.padding[0], module.dilation[0])
    else:
        kh = kw = 1
        conv = None
    act = held(module, ACT)  # (parts, 2, T)
    scales, zeros = act[:, 0].float(), act[:, 1].float()
    s_z = hook._w_scale_zero(module)
    ws, wz = s_z[0].reshape(n).float(), s_z[1].reshape(n).float()
    ops: dict[str, torch.Tensor | None] = {}
    w4 = lt = False
    if kind == "int8":
        codes = hook.weight_codes(module)  # nearest rounding of the weight, or the plan's GPTQ codes
        codes = codes.permute(0, 2, 3, 1) if codes.dim() == 4 else codes[:, None, None, :]
        c = codes.shape[-1]
        w4 = hook.weight_bits <= 4 and algo == "two-pass" and packs_w4(c, split)
        # 4-bit codes keep their value (0..15, zero point unshifted); 8-bit ones are shifted by −128
        # into int8. The kernel's zero-point algebra is the same for any shift.
        shift = 0 if w4 else 128
        wq = (codes - shift).to(torch.int8)
        bounds = [(0, c)] if not split else [(0, split), (split, c)]
        ops["w_sum"] = torch.stack([wq[..., lo:hi].to(torch.int32).sum(dim=(1, 2, 3)) for lo, hi in bounds])
        flat = wq.reshape(n, -1)
        if w4:
            u = flat.to(torch.uint8)  # codes 0..15
            ops["w"] = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()
        else:
            ops["w"] = flat.contiguous()
        ops["w_s"], ops["w_z"] = ws, (wz - shift).to(torch.int32)
        ops["act_s"], ops["act_z"] = scales, zeros - 128
    else:
        wd = hook.dequantized_weight(module).float()
        wd = wd.permute(0, 2, 3, 1) if wd.dim() == 4 else wd[:, None, None, :]
        c = wd.shape[-1]
        w_s = torch.clamp(wd.abs().amax(dim=(1, 2, 3)) / FP8_MAX, min=1e-12)
        lt = fp8_gemm == "cublaslt" and cublaslt_fits(algo, kh, kw, conv, split, hook.has_dec, c, n)
        if lt:
            # One weight scale for the whole layer: cuBLASLt's tensor-wise scaled GEMM then needs no
            # per-row or per-column scale (it was the faster mode at batch-1 shapes) and the bias
            # goes into its epilogue. e4m3 is a float format, so a channel 1000× below the largest
            # still keeps 3 mantissa bits; the value is repeated per channel for the Triton GEMM.
            w_s = torch.full_like(w_s, float(w_s.max()))
        ops["w"] = (wd / w_s.view(n, 1, 1, 1)).to(torch.float8_e4m3fn).reshape(n, -1).contiguous().view(torch.uint8)
        ops["w_s"], ops["w_z"], ops["w_sum"] = w_s, None, None
        # The symmetric e4m3 scale covering the calibrated asymmetric range [(0 − z)s, (2^b − 1 − z)s].
        qmax = 2**hook.act_bits - 1
        ops["act_s"] = torch.maximum(zeros * scales, (qmax - zeros) * scales) / FP8_MAX
        ops["act_z"] = torch.zeros_like(ops["act_s"])
    ops["bias"] = None if module.bias is None else module.bias.detach().float()
    if hook.has_dec:
        dec = held(module, QDEC)
        ops["dec_a"], ops["dec_b"] = dec[0].float(), dec[1].float()
    else:
        ops["dec_a"] = ops["dec_b"] = None
    gemm = "cublaslt" if kind == "fp8" and lt else "triton"
    release(module, PACK)
    for name in FIELDS:
        if ops.get(name) is not None:
            hold(module, PACK + name, ops[name].to(dev).contiguous())
    return PackInfo(kind, split, kh, kw, conv, algo, w4, gemm, table, split_k)


def packed(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """The kernel operands held on ``module`` (None where a field is absent)."""
    return {name: held(module, PACK + name) for name in FIELDS}


def packs_w4(c: int, split: int) -> bool:
    """4-bit weights are stored two per byte when every input part is a multiple of the K block
    (the unmasked kernel path, whose byte offsets are then even); else one code per byte."""
    from ..kernels.triton_gemm import k_block

    return k_block(c, split)[1]
