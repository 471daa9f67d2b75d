"""Quantized layers: the fake-quant reference path and the slot where kernel backends plug in.

A :class:`QuantLinear` / :class:`QuantConv2d` wraps the original module (kept untouched, so
``cq.restore`` is exact) and holds *data only*: per-output-channel weight scale / zero point,
per-timestep activation scale / zero point (one :class:`ActQuant` per input half when the input
is a skip concatenation) and, for layers that consume the cached feature, the per-step
quantization-DEC coefficients. How that data is executed is a *backend*: a function registered in
:data:`BACKENDS` taking ``(layer, x)``. Calibration never looks at backends, so a real INT8/FP8
kernel is one more registry entry.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import Runtime
from .quantizer import activation_range, fake_quant, params_from_range, quantize_codes, weight_qparams

_EMA = 0.9


def _fused_fake_quant() -> bool:
    """fp32 CUDA activations take the one-pass Triton fake-quant kernel (bit-identical to the torch
    ops, see :mod:`cachequant.kernels.triton_fakequant`) unless ``CACHEQUANT_FAKE_QUANT_KERNEL=0``."""
    flag = os.environ.get("CACHEQUANT_FAKE_QUANT_KERNEL", "1")
    if flag not in ("0", "1"):
        raise ValueError(f"CACHEQUANT_FAKE_QUANT_KERNEL must be 0 or 1, got {flag!r}")
    from ..kernels.backend import triton_available  # late: the kernels package imports this module

    return flag == "1" and triton_available()


class ActQuant(nn.Module):
    """Per-tensor activation quantizer with one (scale, zero point) per model call.

    ``per_step=False`` keeps a single range for all steps (the timestep-agnostic baseline): it
    is the union of the per-batch ranges, as a calibrator blind to time would produce.
    """

    def __init__(self, bits: int, num_calls: int, per_step: bool = True):
        super().__init__()
        self.bits = bits
        self.per_step = per_step
        self.register_buffer("lo", torch.zeros(num_calls))  # calibration state, not exported
        self.register_buffer("hi", torch.zeros(num_calls))
        self.register_buffer("seen", torch.zeros(num_calls, dtype=torch.bool))
        self.register_buffer("scale", torch.ones(num_calls))
        self.register_buffer("zero_point", torch.zeros(num_calls))
        self.history: list[tuple[int, int, float, float]] = []
        self._seen_host: list[bool] | None = None  # host copy of `seen`: no GPU sync per call

    def observe(self, x: torch.Tensor, step: int, batch: int = 0) -> None:
        """Records this batch's range for ``step``; ranges are combined in :meth:`finalize`."""
        lo, hi = activation_range(x, self.bits)
        self.history.append((step, batch, lo, hi))

    def finalize(self, fill_nearest: bool = False) -> None:
        """Ranges -> (scale, zero point).

        Per step, the batches' ranges are combined by an exponential moving average in batch order
        (sorted by batch index, so any split of the batches across processes gives the same
        result); ``per_step=False`` takes the union over all steps and batches. ``fill_nearest``
        gives steps never observed the range of the nearest observed step (for calibration on a
        selection of steps).
        """
        by_step: dict[int, list] = {}
        for step, batch, lo, hi in sorted(self.history, key=lambda h: h[1]):
            by_step.setdefault(step, []).append((lo, hi))
        if not self.per_step and by_step:
            allr = [r for rs in by_step.values() for r in rs]
            by_step = {t: [(min(r[0] for r in allr), max(r[1] for r in allr))] for t in range(len(self.lo))}
        for step, ranges in by_step.items():
            lo, hi = ranges[0]
            for l2, h2 in ranges[1:]:
                lo, hi = _EMA * lo + (1 - _EMA) * l2, _EMA * hi + (1 - _EMA) * h2
            self.lo[step], self.hi[step] = lo, hi
            self.seen[step] = True
        if fill_nearest and bool(self.seen.any()) and not bool(self.seen.all()):
            obs = torch.nonzero(self.seen).flatten()
            for t in torch.nonzero(~self.seen).flatten().tolist():
                j = int(obs[torch.argmin((obs - t).abs())])
                self.lo[t], self.hi[t] = self.lo[j], self.hi[j]
            self.seen[:] = True
        s, z = params_from_range(self.lo, self.hi, self.bits)
        self.scale.copy_(torch.where(self.seen, s, torch.ones_like(s)))
        self.zero_point.copy_(torch.where(self.seen, z, torch.zeros_like(z)))
        self.history = []
        self._seen_host = None

    def params(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._seen_host is None:
            self._seen_host = self.seen.tolist()
        if not self._seen_host[step]:
            raise RuntimeError(
                f"cachequant: an activation quantizer has no range for step {step}: the layer ran "
                "on a step it never ran on during calibration (was the plan calibrated with the "
                "same schedule and sampler?)"
            )
        return self.scale[step], self.zero_point[step]

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        s, z = self.params(step)
        if x.is_cuda and x.dtype == torch.float32 and _fused_fake_quant():
            from ..kernels.triton_fakequant import fake_quant_fused, supported

            if supported(x, s, z):
                return fake_quant_fused(x, s, z, self.bits)  # bit-identical, one pass instead of six
        return fake_quant(x, s.to(x.dtype), z.to(x.dtype), self.bits)


class _QuantBase(nn.Module):
    def __init__(self, inner: nn.Module, weight_bits: int, act_bits: int, runtime: Runtime,
                 split: int | None = None, per_step: bool = True):
        super().__init__()
        self.inner = inner
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.split = split
        self.backend = "fake"
        self.runtime = runtime
        n = runtime.num_calls
        self.act = nn.ModuleList([ActQuant(act_bits, n, per_step) for _ in range(1 if split is None else 2)])
        shape = (inner.weight.shape[0],) + (1,) * (inner.weight.dim() - 1)
        self.register_buffer("w_scale", torch.ones(shape, device=inner.weight.device))
        self.register_buffer("w_zero_point", torch.zeros(shape, device=inner.weight.device))
        # Quantization DEC (output-channel correction of the cached slice): O = a·O_c + O_rest + b.
        self.register_buffer("dec_a", torch.empty(0))
        self.register_buffer("dec_b", torch.empty(0))
        # Integer weight codes chosen by a rounding other than nearest (GPTQ); empty = round the
        # float weight to nearest on the fly.
        self.register_buffer("w_codes", torch.empty(0, dtype=torch.uint8, device=inner.weight.device))
        self._w_dq: torch.Tensor | None = None

    # -- data ------------------------------------------------------------------------------
    def weight_codes(self) -> torch.Tensor:
        """Integer weight codes (float tensor holding integers in [0, 2^b − 1])."""
        if self.w_codes.numel():
            return self.w_codes.float()
        return quantize_codes(self.inner.weight.detach().float(), self.w_scale, self.w_zero_point, self.weight_bits)

    def set_weight_codes(self, codes: torch.Tensor) -> None:
        """Stores codes chosen by another rounding (GPTQ); they must fit the layer's weight and bits."""
        w = self.inner.weight  # empty once a kernel backend freed the float weights
        if w.numel() and codes.shape != w.shape:
            raise ValueError(f"weight codes shaped {tuple(codes.shape)} do not fit the layer's weight {tuple(w.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() > 2**self.weight_bits - 1):
            raise ValueError(f"weight codes outside [0, {2**self.weight_bits - 1}] for {self.weight_bits}-bit weights")
        self.w_codes = codes.detach().to(device=self.w_scale.device, dtype=torch.uint8)
        self._w_dq = None

    def dequantized_weight(self) -> torch.Tensor:
        if self._w_dq is None or self._w_dq.device != self.inner.weight.device:
            w = (self.weight_codes() - self.w_zero_point) * self.w_scale
            self._w_dq = w.to(self.inner.weight.dtype)
        return self._w_dq

    def init_weight_qparams(self) -> None:
        """Per-output-channel range search on the wrapped layer's weight."""
        s, z = weight_qparams(self.inner.weight.detach(), self.weight_bits)
        self.w_scale.copy_(s)
        self.w_zero_point.copy_(z)
        self.w_codes = self.w_codes.new_empty(0)
        self._w_dq = None

    @property
    def has_dec(self) -> bool:
        return self.dec_a.numel() > 0

    # -- execution -------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if self.split is None:
            return self.act[0](x, step)
        a, b = x[:, : self.split], x[:, self.split :]
        return torch.cat([self.act[0](a, step), self.act[1](b, step)], dim=1)

    def observe(self, x: torch.Tensor, step: int, batch: int = 0) -> None:
        if self.split is None:
            self.act[0].observe(x, step, batch)
        else:
            self.act[0].observe(x[:, : self.split], step, batch)
            self.act[1].observe(x[:, self.split :], step, batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.runtime.quant_mode
        if mode == "quant":
            return BACKENDS[self.backend](self, x)
        if mode == "observe":
            self.observe(x, self.runtime.step, self.runtime.batch)
        return self.inner(x)

    def linear_op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class QuantLinear(_QuantBase):
    def linear_op(self, x, w, bias):
        return F.linear(x, w, bias)


class QuantConv2d(_QuantBase):
    def linear_op(self, x, w, bias):
        return self.inner._conv_forward(x, w, bias)


def fake_forward(layer: _QuantBase, x: torch.Tensor) -> torch.Tensor:
    """Reference execution: fake-quantize input and weight, run the float op, apply DEC."""
    step = layer.runtime.step
    xq = layer.quantize_input(x, step)
    w = layer.dequantized_weight()
    bias = layer.inner.bias
    if not layer.has_dec:
        return layer.linear_op(xq, w, bias)
    c = layer.split
    # O = a_t ⊙ (W_c·Q(X_c)) + W_r·Q(X_r) + bias + b_t   (bias kept outside the scaled term).
    o_c = layer.linear_op(xq[:, :c], w[:, :c], None)
    o_r = layer.linear_op(xq[:, c:], w[:, c:], bias)
    shape = (1, -1) + (1,) * (o_c.dim() - 2)
    a = layer.dec_a[step].to(o_c.dtype).view(shape)
    b = layer.dec_b[step].to(o_c.dtype).view(shape)
    return a * o_c + o_r + b


BACKENDS: dict[str, Callable[[_QuantBase, torch.Tensor], torch.Tensor]] = {"fake": fake_forward}


def wrap_module(module: nn.Module, weight_bits: int, act_bits: int, runtime: Runtime,
                split: int | None = None, per_step: bool = True) -> _QuantBase:
    if isinstance(module, nn.Linear):
        return QuantLinear(module, weight_bits, act_bits, runtime, split, per_step)
    if isinstance(module, nn.Conv2d):
        return QuantConv2d(module, weight_bits, act_bits, runtime, split, per_step)
    raise TypeError(f"cannot quantize {type(module).__name__}; only nn.Linear and nn.Conv2d")
