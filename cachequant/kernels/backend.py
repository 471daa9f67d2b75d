"""Kernel backends for the quantized layers: registration, selection, enabling on a pipeline.

``cq.accelerate(pipe, plan, backend=...)`` calls :func:`enable_kernels` after the plan is loaded.
Every quantized layer the kernel supports is packed once and switched to the ``int8`` / ``fp8``
backend; a layer it does not support keeps the fake-quant reference and is listed in the report
(nothing is dropped silently). The per-call index reaches the kernels through ``Runtime.step_t``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from ..quant.layers import BACKENDS, QuantConv2d, _QuantBase
from .pack import pack_layer, unsupported_reason

KINDS = ("int8", "fp8")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(requested: str, device: torch.device) -> str:
    """``auto``: INT8 kernels on a CUDA GPU of compute capability ≥ 8.0 (the arithmetic that was
    calibrated, including DEC), else the fake-quant reference; ``fp8`` needs capability ≥ 8.9."""
    if requested not in ("auto", "fake") + KINDS:
        raise ValueError(f"backend must be one of auto, fake, int8, fp8; got {requested!r}")
    if requested == "fake":
        return "fake"
    cuda = device.type == "cuda"
    if requested == "auto":
        if cuda and triton_available() and torch.cuda.get_device_capability(device) >= (8, 0):
            return "int8"
        return "fake"
    if not triton_available():
        raise RuntimeError(f"backend {requested!r} needs Triton: pip install triton (or a CUDA build of torch)")
    if not cuda and not _interpreting():
        raise RuntimeError(f"backend {requested!r} runs on a CUDA GPU; the model is on {device}. Use backend='fake' "
                           "on the CPU (or TRITON_INTERPRET=1 to test the kernels there, slowly)")
    if cuda and requested == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError("backend 'fp8' needs an Ada or Hopper GPU (compute capability >= 8.9); use 'int8'")
    return requested


def pixel_strides(x: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(H·W, stride of an image, of a pixel, of a channel) of a 4-d activation whose pixels are one
    stride apart (NCHW or NHWC contiguous, among others); None when they are not."""
    n, c, h, w = x.shape
    if h > 1 and w > 1 and x.stride(2) != w * x.stride(3):
        return None
    return h * w, x.stride(0), x.stride(3) if w > 1 else x.stride(2), x.stride(1)


def _run(pk, x2d, y2d, rt, c: int, m_out: int, geom: tuple, rows: tuple | None = None) -> None:
    """x2d: (rows, C) activations (NHWC rows for a conv), or with ``rows`` (two-pass only) a 4-d
    conv input in any layout ``pixel_strides`` describes; y2d: (m_out, N) output."""
    n = pk.w.shape[0]
    fp8 = pk.kind == "fp8"
    args = (pk.w, y2d, rt.step_t, pk.act_s, pk.act_z, pk.w_s, pk.w_z, pk.w_sum, pk.bias, pk.dec_a, pk.dec_b,
            m_out, n, c, pk.split, rt.num_calls, geom, pk.kh, pk.kw, fp8)
    if pk.algo == "fused":
        from .triton_fused import launch_fused

        launch_fused(x2d, *args)
        return
    from .triton_gemm import gemm
    from .triton_quantize import quantize

    m_in = x2d.shape[0] if rows is None else x2d.shape[0] * rows[0]
    q = torch.empty((m_in, c), device=x2d.device, dtype=torch.uint8 if fp8 else torch.int8)
    if pk.gemm == "cublaslt":
        # y = (codes · W8ᵀ) · s_t · w_s + bias in one cuBLASLt call; s_t comes per row from the quantize pass
        row_s = torch.empty((m_in, 1), device=x2d.device, dtype=torch.float32)
        quantize(x2d, q, rt.step_t, pk.act_s, pk.act_z, 0, rt.num_calls, True, rows, row_s=row_s)
        bias = pk.lt_bias if pk.lt_bias is None or pk.lt_bias.dtype == y2d.dtype else pk.lt_bias.to(y2d.dtype)
        # cuBLASLt adds a bias in its epilogue for 16-bit outputs only ("Bias is not supported when
        # out_dtype is set to Float32"): a float32 model adds it after
        late = bias is not None and y2d.dtype == torch.float32
        torch._scaled_mm(q.view(torch.float8_e4m3fn), pk.lt_w, row_s, pk.lt_w_s,
                         bias=None if late else bias, out_dtype=y2d.dtype, out=y2d)
        if late:
            y2d.add_(bias)
        return
    quantize(x2d, q, rt.step_t, pk.act_s, pk.act_z, pk.split, rt.num_calls, fp8, rows)
    gemm(q, *args, w4=pk.w4)


def kernel_forward(layer: _QuantBase, x: torch.Tensor) -> torch.Tensor:
    pk = layer._packed
    rt = layer.runtime
    n = pk.w.shape[0]
    if isinstance(layer, QuantConv2d):
        rows = None if pk.algo == "fused" else pixel_strides(x)
        if rows is None:  # the fused GEMM reads NHWC rows itself
            x = x.contiguous(memory_format=torch.channels_last)
        nb, c, h, w = x.shape
        cv = pk.conv
        oh = (h + 2 * cv["pad"] - cv["dil"] * (pk.kh - 1) - 1) // cv["stride"] + 1
        ow = (w + 2 * cv["pad"] - cv["dil"] * (pk.kw - 1) - 1) // cv["stride"] + 1
        y = torch.empty((nb, oh, ow, n), device=x.device, dtype=x.dtype)
        # two-pass: the quantize pass reads x in its own layout and writes NHWC codes (no fp16 copy)
        src = x if rows is not None else x.permute(0, 2, 3, 1).reshape(-1, c)
        _run(pk, src, y.view(-1, n), rt, c, nb * oh * ow, (h, w, oh, ow, cv["stride"], cv["pad"], cv["dil"]), rows)
        return y.permute(0, 3, 1, 2)
    c = x.shape[-1]
    x2 = x.reshape(-1, c).contiguous()
    y = torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
    _run(pk, x2, y, rt, c, x2.shape[0], (1, 1, 1, 1, 1, 0, 1))
    return y.view(*x.shape[:-1], n)


for _kind in KINDS:
    BACKENDS[_kind] = kernel_forward


ATTENTION = ("sdpa", "8bit")


def enable_kernels(model: torch.nn.Module, layers: dict[str, _QuantBase], runtime, kind: str,
                   channels_last: bool = True, algo: str = "two-pass", attention: str = "sdpa") -> dict[str, Any]:
    """Packs every supported layer for ``kind`` and switches it over; returns a report.

    ``algo``: ``two-pass`` (default: a quantize pass, then an 8-bit GEMM on codes) or ``fused``
    (quantization in the GEMM prologue; kept for comparison, slower on Hopper).
    ``attention``: ``sdpa`` runs attention in fused float SDPA (fast); ``8bit`` keeps the plan's
    8-bit attention matmuls (the reference path's explicit attention with quantized operands), so
    that the kernel path computes what the fake-quant reference computes, e.g. for quality tables."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}; got {attention!r}")
    device = next(model.parameters()).device
    runtime.step_t = torch.zeros(1, dtype=torch.int64, device=device)
    runtime.attn_sdpa = attention == "sdpa"
    on, off = [], {}
    for name, layer in layers.items():
        reason = unsupported_reason(layer)
        if reason is not None:
            off[name] = reason
            continue
        layer._packed = pack_layer(layer, kind, algo)
        layer.backend = kind
        layer._w_dq = None  # the reference path's dequantized copy: not read while the kernel runs
        on.append(name)
    undo = []
    nhwc_norms = 0
    if channels_last and any(isinstance(layers[n], QuantConv2d) for n in on):
        # NHWC activations end to end: the implicit-GEMM convs read and write them without copies.
        model.to(memory_format=torch.channels_last)
        undo.append(lambda: model.to(memory_format=torch.contiguous_format))
        # PyTorch's CUDA GroupNorm would copy each NHWC input to NCHW and return NCHW, which the
        # next conv copies back: two copies per norm (see triton_groupnorm).
        nhwc_norms = _use_nhwc_group_norm(model, undo)
    lt = sum(layers[n]._packed.gemm == "cublaslt" for n in on)
    return {"backend": kind, "algo": algo, "attention": attention, "kernel_layers": len(on), "fake_layers": off,
            "cublaslt_layers": lt, "nhwc_group_norms": nhwc_norms, "undo": undo}


def _use_nhwc_group_norm(model: torch.nn.Module, undo: list) -> int:
    from .triton_groupnorm import nhwc_group_norm_forward

    count = 0
    for mod in model.modules():
        if type(mod) is torch.nn.GroupNorm:  # subclasses may change forward: leave them alone
            mod.forward = nhwc_group_norm_forward(mod)
            undo.append(lambda m=mod: m.__dict__.pop("forward", None))
            count += 1
    return count


def weight_bytes(layers: dict[str, _QuantBase]) -> dict[str, int]:
    """Bytes of the quantized layers' weights as held now: the kernels' packed 8-bit copies and the
    float originals (absent once dropped)."""
    packed = sum(layer._packed.w.numel() * layer._packed.w.element_size()
                 for layer in layers.values() if getattr(layer, "_packed", None) is not None)
    floats = sum(layer.inner.weight.numel() * layer.inner.weight.element_size() for layer in layers.values())
    return {"packed_weight_bytes": packed, "float_weight_bytes": floats}


def drop_float_weights(layers: dict[str, _QuantBase]) -> int:
    """Frees the float weights of every layer that runs on a kernel (the packed 8-bit copy is all
    the kernel reads) and returns the bytes freed. Without this a W8A8 model holds fp16 *and* 8-bit
    weights: more memory than fp16 alone. The price: the pipeline cannot be restored afterwards.
    Layers left on the reference path keep theirs."""
    freed = 0
    for layer in layers.values():
        if layer.backend == "fake":
            continue
        w = layer.inner.weight
        freed += w.numel() * w.element_size()
        layer.dropped_weight_shape = tuple(w.shape)
        layer.inner.weight = torch.nn.Parameter(w.detach().new_empty(0), requires_grad=False)
        layer._w_dq = None
    return freed


def disable_kernels(layers: dict[str, _QuantBase], runtime) -> None:
    for layer in layers.values():
        layer.backend = "fake"
        layer.__dict__.pop("_packed", None)
    runtime.step_t = None
    runtime.attn_sdpa = False

