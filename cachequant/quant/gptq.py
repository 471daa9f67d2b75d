"""GPTQ weight rounding (Frantar et al., 2022, "GPTQ: accurate post-training quantization for
generative pre-trained transformers", Alg. 1): round a layer's weights one input column at a time
and push each column's rounding error onto the columns not yet rounded, weighted by the inverse
Hessian of the layer's reconstruction loss ‖W X − Ŵ X‖², H = 2 X Xᵀ.

Why here: round-to-nearest 4-bit weights collapse the CIFAR UNet (`results/w4/README.md`),
and the error is spread over every layer (`benchmarks/w4_sensitivity.py`). The reference work uses
block reconstruction (BRECQ / AdaRound), which trains rounding variables for thousands of
iterations per block. GPTQ needs only the input second moments and one Cholesky factorisation per
layer, so it also runs on a CPU. The grid (per-output-channel scale and zero point) is the one the
L_p range search chose; GPTQ only decides which grid point each weight rounds to.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import qrange

__all__ = ["HessianAccumulator", "gptq_codes", "gptq_columns", "gptq_round", "hessian_from"]


class HessianAccumulator:
    """Running X Xᵀ of a Linear / Conv2d layer's inputs (as the columns the layer multiplies: the
    unfolded patches for a conv). ``positions`` caps the columns taken per call, drawn at random
    with a seeded generator: a 32×32 feature map gives 1,024 patches per image, far more than the
    K ≤ a few thousand dimensions of H need."""

    def __init__(self, layer: nn.Module, positions: int = 256, seed: int = 0):
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError("GPTQ needs a dense layer; grouped convolutions are not supported")
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"GPTQ handles nn.Linear and nn.Conv2d, got {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise ValueError("GPTQ's conv columns assume zero padding")
        self.layer = layer
        k = layer.weight[0].numel()
        self.h = torch.zeros(k, k, dtype=torch.float64, device=layer.weight.device)
        self.n = 0
        self.positions = positions
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """(K, n) columns of the layer's input."""
        lay = self.layer
        if isinstance(lay, nn.Conv2d):
            cols = F.unfold(x, lay.kernel_size, dilation=lay.dilation, padding=lay.padding, stride=lay.stride)
            cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (C·kh·kw, B·L)
        else:
            cols = x.reshape(-1, x.shape[-1]).t()
        if cols.shape[1] > self.positions:
            idx = torch.randperm(cols.shape[1], generator=self.gen)[: self.positions].to(cols.device)
            cols = cols[:, idx]
        return cols

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        cols = self.columns(x.detach()).float()
        self.h += (cols @ cols.t()).double()  # fp32 product (fast), fp64 running sum
        self.n += cols.shape[1]

    def hessian(self) -> torch.Tensor:
        return hessian_from(self.h, self.n)


def hessian_from(xxt: torch.Tensor, n: int) -> torch.Tensor:
    """H = 2 X Xᵀ / n from a running X Xᵀ over n columns (one accumulator, or several ranks' summed)."""
    if n == 0:
        raise RuntimeError("no inputs were accumulated for this layer (did it run during calibration?)")
    return 2.0 * xxt / n


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               bits: int, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Dequantized GPTQ weights on the grid (``scale``, ``zero_point``), same shape and dtype as ``weight``."""
    codes = gptq_codes(weight, hessian, scale, zero_point, bits, damp, block).double()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return ((codes - zero_point.double().reshape(shape)) * scale.double().reshape(shape)).to(weight.dtype)


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               bits: int, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Integer GPTQ codes in [0, 2^bits − 1] (float tensor, same shape as ``weight``), computed in
    float64 whatever the weight's dtype (an fp16 round trip through dequantized values could land
    one code off at 8 bits).

    Columns are processed in order, in blocks with lazy updates (the paper's §4 "lazy batch
    updates"); ``damp`` × mean(diag H) is added to the diagonal for a stable Cholesky. Inputs that
    never vary (zero diagonal) are pinned to their round-to-nearest value.
    """
    s = scale.reshape(-1).double()
    z = zero_point.reshape(-1).double()
    qmin, qmax = qrange(bits)

    def to_grid(col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.clamp(torch.round(col / s) + z, qmin, qmax)
        return c, (c - z) * s

    return gptq_columns(weight, hessian, to_grid, damp, block).float()


@torch.no_grad()
def gptq_columns(weight: torch.Tensor, hessian: torch.Tensor,
                 to_grid: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """GPTQ's column loop for any grid, in float64: ``to_grid(column)`` returns what to keep for
    the column (codes, or values) and its dequantized value, whose difference to the column is the
    error pushed onto the columns not yet rounded. Returns the kept values, shaped as ``weight``.
    :func:`gptq_codes` passes an integer grid; an FP8 grid (e4m3 at a fixed scale) fits the same
    loop, since only the rounding changes."""
    shape = weight.shape
    w = weight.detach().reshape(shape[0], -1).double().clone()
    k = w.shape[1]
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's {k} input columns")
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=h.device)
    # Upper Cholesky factor of H⁻¹: row i holds the error-propagation weights of column i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    out = torch.zeros_like(w)
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        wb = w[:, i0:i1].clone()
        errb = torch.zeros_like(wb)
        hb = hinv[i0:i1, i0:i1]
        for j in range(i1 - i0):
            col = wb[:, j]
            kept, qc = to_grid(col)
            out[:, i0 + j] = kept
            e = (col - qc) / hb[j, j]
            wb[:, j:] -= e[:, None] * hb[j, j:][None, :]
            errb[:, j] = e
        w[:, i1:] -= errb @ hinv[i0:i1, i1:]
    return out.reshape(shape)
