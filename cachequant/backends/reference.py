"""The float reference backend (``fake``): quantize-dequantize, then the layer's own float op.

This is what calibration fits against and what every kernel is tested against. Quantization-DEC
(Eq. 9) on a cached call: ``O = a_t ⊙ (Ŵ_c·Q(X_c)) + Ŵ_r·Q(X_r) + bias + b_t`` — the bias stays
outside the scaled term.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.layer import linear_op
from ..runtime.clock import compiling


class ReferenceBackend:
    name = "fake"

    def __init__(self, options=None) -> None:
        self.fused_fake_quant = bool(options is None or options.fused_fake_quant is not False)

    def available(self, device: torch.device) -> str | None:
        return None

    def unsupported(self, module: nn.Module, hook) -> str | None:
        return None

    def prepare(self, module: nn.Module, hook) -> None:
        pass

    def release(self, module: nn.Module) -> None:
        pass

    def prepare_model(self, model: nn.Module, has_conv: bool) -> list:
        return []

    def forward(self, module: nn.Module, hook, x: torch.Tensor) -> torch.Tensor:
        xq = self._quantize_input(module, hook, x)
        w = hook.dequantized_weight(module)
        bias = module.bias
        if not hook.dec_active():
            return linear_op(module, xq, w, bias)
        c = hook.split
        o_c = linear_op(module, xq[:, :c], w[:, :c], None)
        o_r = linear_op(module, xq[:, c:], w[:, c:], bias)
        ab = hook.dec_params(module)
        shape = (1, -1) + (1,) * (o_c.dim() - 2)
        return ab[0].to(o_c.dtype).view(shape) * o_c + o_r + ab[1].to(o_c.dtype).view(shape)

    def _quantize_input(self, module: nn.Module, hook, x: torch.Tensor) -> torch.Tensor:
        if (self.fused_fake_quant and hook.split is None and x.is_cuda and x.dtype == torch.float32
                and not compiling()):
            from ..kernels.triton_fakequant import fake_quant_fused, supported

            sz = hook.act_params(module)
            if supported(x, sz[0, 0], sz[0, 1]):
                return fake_quant_fused(x, sz[0, 0], sz[0, 1], hook.act_bits)  # bit-identical, one pass
        return hook.quantize_input(module, x)
