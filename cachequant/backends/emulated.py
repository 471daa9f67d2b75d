"""``fp8-emulated``: the FP8 backend's arithmetic in float torch ops, on any device.

The FP8 kernels do not compute what the reference (``fake``) computes: activations become e4m3
codes of ``x / s_t`` with one symmetric scale per step covering the calibrated range (saturated at
±448), and weights e4m3 codes with a per-channel scale (Triton GEMM) or one scale per layer
(cuBLASLt's tensor-wise GEMM, the default on Hopper) — a float grid, not the integer one the plan
was calibrated for. So the quality users get on Hopper is its own number, and measuring it should
not need a Hopper GPU: this backend packs each layer exactly as the FP8 backend does
(:func:`~cachequant.backends.pack.pack_layer`) and evaluates the same products with float
convolutions / matmuls, accumulating in fp32 — equal to the kernels up to accumulation order.

Layers the kernels do not run (:func:`~cachequant.backends.pack.unsupported_reason`) stay on the
reference, as with the real backend; attention follows ``KernelOptions.attention`` the same way.
It is a measuring instrument, not a fast path: each call decodes nothing (the e4m3 weights are
decoded once, at ``prepare``) but quantizes the input in separate elementwise passes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.layer import linear_op
from ..quant.quantizer import e4m3_round
from ..runtime.hooks import held, hold, release
from .pack import PACK, pack_layer, packed, unsupported_reason

_DECODED = "_cachequant_emu_w"


class EmulatedFP8Backend:
    name = "fp8-emulated"

    def __init__(self, options) -> None:
        self.options = options

    def available(self, device: torch.device) -> str | None:
        return None

    def unsupported(self, module: nn.Module, hook) -> str | None:
        return unsupported_reason(module, hook)

    def prepare(self, module: nn.Module, hook) -> None:
        """Packs the layer as the FP8 backend on Hopper would (``fp8_gemm`` None means cuBLASLt's
        tensor-wise weight scale where a layer fits it, as there) and keeps the decoded weight,
        ``e4m3(W / s_w) · s_w``, in the layer's own layout."""
        fp8_gemm = self.options.fp8_gemm or "cublaslt"
        hook.pack = pack_layer(module, hook, "fp8", "two-pass", fp8_gemm)
        p = packed(module)
        n = p["w"].shape[0]
        w = p["w"].view(torch.float8_e4m3fn).float() * p["w_s"].view(n, 1)
        if isinstance(module, nn.Conv2d):
            kh, kw = hook.pack.kh, hook.pack.kw
            w = w.view(n, kh, kw, -1).permute(0, 3, 1, 2).contiguous()
        hold(module, _DECODED, w)
        hook._wdq = None

    def release(self, module: nn.Module) -> None:
        release(module, PACK)
        release(module, _DECODED)

    def prepare_model(self, model: nn.Module, has_conv: bool) -> list:
        return []

    def forward(self, module: nn.Module, hook, x: torch.Tensor) -> torch.Tensor:
        p = packed(module)
        w = held(module, _DECODED)
        step = hook.clock.step_tensor()
        act_s = p["act_s"].index_select(1, step)  # (parts, 1): this step's scales
        conv = isinstance(module, nn.Conv2d)
        dim = 1 if conv else x.dim() - 1
        c = hook.pack.split
        xf = x.float()
        if c:
            xq = torch.cat([e4m3_round(xf.narrow(dim, 0, c), act_s[0]),
                            e4m3_round(xf.narrow(dim, c, xf.shape[dim] - c), act_s[1])], dim)
        else:
            xq = e4m3_round(xf, act_s[0])
        bias = p["bias"]
        if not hook.dec_active():
            return linear_op(module, xq, w, bias).to(x.dtype)
        # quantization-DEC (Eq. 9) as in the kernels' epilogue: a_t scales the cached part's product
        # only (the whole product when the input is not split), the bias and b_t are added after
        a, b = p["dec_a"].index_select(0, step)[0], p["dec_b"].index_select(0, step)[0]
        c = c or xq.shape[dim]
        o_c = linear_op(module, xq.narrow(dim, 0, c), w[:, :c], None)
        o = a.view(_channel_shape(o_c, conv)) * o_c + b.view(_channel_shape(o_c, conv))
        if c < xq.shape[dim]:
            o = o + linear_op(module, xq.narrow(dim, c, xq.shape[dim] - c), w[:, c:], None)
        if bias is not None:
            o = o + bias.view(_channel_shape(o, conv))
        return o.to(x.dtype)


def _channel_shape(o: torch.Tensor, conv: bool) -> tuple[int, ...]:
    return (1, -1) + (1,) * (o.dim() - 2) if conv else (-1,)

