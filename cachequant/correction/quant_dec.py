"""Quantization half of DEC: per step and output channel, O_c ≈ a·O_cq + b (CacheQuant Eq. 9).

For each layer that first consumes the cached feature, O_c = W_c·X_c is the float output of the
cached-channel slice and O_cq = Ŵ_c·Q(X_c) its quantized counterpart. The fit excludes the layer
bias on both sides, and the folded form is ``a ⊙ (Ŵ_c·Q(X_c)) + Ŵ_r·Q(X_r) + bias + b`` — the bias
stays outside the scaled term, avoiding the (1 − a)·bias error of the released code. The scale
folds into the per-output-channel dequantization scale of the cached-slice GEMM, the offset into
the bias, so a kernel pays nothing for it.

Statistics are accumulated in a streaming way (sums of p, y, p², p·y) so that any number of
calibration batches can be used without keeping the outputs.
"""

from __future__ import annotations

import torch


class QuantDecStats:
    def __init__(self, num_calls: int, out_channels: int):
        z = lambda: torch.zeros(num_calls, out_channels, dtype=torch.float64)  # noqa: E731
        self.n = torch.zeros(num_calls, dtype=torch.float64)
        self.sp, self.sy, self.spp, self.spy, self.syy = z(), z(), z(), z(), z()

    def update(self, step: int, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred`` = quantized output O_cq, ``target`` = float output O_c, both (B, C_out, ...)."""
        p = pred.detach().movedim(1, 0).reshape(pred.shape[1], -1).double().cpu()
        y = target.detach().movedim(1, 0).reshape(target.shape[1], -1).double().cpu()
        self.n[step] += p.shape[1]
        self.sp[step] += p.sum(1)
        self.sy[step] += y.sum(1)
        self.spp[step] += (p * p).sum(1)
        self.spy[step] += (p * y).sum(1)
        self.syy[step] += (y * y).sum(1)

    def add(self, other: "QuantDecStats") -> None:
        for k in ("n", "sp", "sy", "spp", "spy", "syy"):
            getattr(self, k).add_(getattr(other, k))

    def solve(self, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (T, C_out); steps never observed get the identity (1, 0)."""
        n = self.n.clamp_min(1)[:, None]
        mp, my = self.sp / n, self.sy / n
        var = self.spp / n - mp * mp
        cov = self.spy / n - mp * my
        ok = (var > eps * (self.spp / n).clamp_min(eps)) & (self.n[:, None] > 0)
        a = torch.where(ok, cov / var.clamp_min(eps), torch.ones_like(var))
        b = torch.where(self.n[:, None] > 0, my - a * mp, torch.zeros_like(my))
        return a.float(), b.float()

    def residual(self, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        """Mean squared error before (a=1, b=0) and after the correction, over observed data."""
        a, b = a.double(), b.double()
        before = (self.syy - 2 * self.spy + self.spp).sum()
        after = (self.syy - 2 * a * self.spy - 2 * b * self.sy + a * a * self.spp + 2 * a * b * self.sp
                 + b * b * self.n[:, None]).sum()
        total = self.n.sum() * self.sp.shape[1]
        return float(before / total), float(after / total)
