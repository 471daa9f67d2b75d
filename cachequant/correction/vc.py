"""Variance compensation (VC, Q&C §3.2): a per-timestep, per-channel factor on the predicted noise.

Caching + quantization inflate or deflate the variance of the denoiser's output late in sampling,
which amplifies exposure bias. VC rescales channel c of the output at step t by s[t, c], fitted
from a small batch of intermediate samples on which both the full-precision model (target x) and
the accelerated model (x̂) are evaluated.

Objective (our reading of Eq. 11, whose formula the text we have omits): per (t, c), over the N
values x_i, x̂_i of that channel with standard deviations σ, σ̂, an MSE plus a channel-wise
inverse-root noise-ratio term on the channel's spread,

    L(s) = 1/N Σ_i (s·x̂_i − x_i)²  +  γ · (s·σ̂ − σ)².

The second term is zero exactly when the rescaled output has the full-precision channel's
variance; the MSE term alone would shrink s wherever the accelerated output carries error that
is uncorrelated with x (regression dilution), *lowering* the variance further. Both terms are
quadratic in s; setting dL/ds = 0:

    1/N Σ_i x̂_i (s·x̂_i − x_i) + γ σ̂ (s·σ̂ − σ) = 0
    ⇒  s* = (1/N Σ_i x̂_i x_i + γ σ̂ σ) / (1/N Σ_i x̂_i² + γ σ̂²).

γ → ∞ gives pure variance matching s = σ/σ̂, γ = 0 the least-squares scale; for a pure variance
drift x̂ = k·x both, and every γ, give s* = 1/k. Default γ = 10.
"""

from __future__ import annotations

import torch

from ..pipecall import map_sample
from ..runtime.hooks import held


class VCStats:
    """Streaming sums per step and channel (n, Σx̂, Σx, Σx̂², Σx², Σx̂x) for s* of the docstring."""

    def __init__(self, num_calls: int, channels: int, gamma: float = 10.0):
        self.gamma = gamma
        self.sums = torch.zeros(6, num_calls, channels, dtype=torch.float64)

    def update(self, step: int, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred`` = accelerated output x̂, ``target`` = full-precision output x; (B, C, ...)."""
        c = self.sums.shape[2]
        p = pred[:, :c].detach().movedim(1, 0).reshape(c, -1).double().cpu()
        y = target[:, :c].detach().movedim(1, 0).reshape(c, -1).double().cpu()
        self.sums[:, step] += torch.stack([torch.full((c,), float(p.shape[1]), dtype=torch.float64),
                                           p.sum(1), y.sum(1), (p * p).sum(1), (y * y).sum(1), (p * y).sum(1)])

    def add(self, other: "VCStats") -> None:
        self.sums.add_(other.sums)

    def solve(self) -> torch.Tensor:
        """(T, C) factors; steps/channels never observed (or with x̂ ≡ 0) get 1."""
        n, sp, sy, spp, syy, spy = self.sums
        n = n.clamp_min(1)
        sd_p = (spp / n - (sp / n) ** 2).clamp_min(0).sqrt()
        sd_y = (syy / n - (sy / n) ** 2).clamp_min(0).sqrt()
        num = spy / n + self.gamma * sd_p * sd_y
        den = spp / n + self.gamma * sd_p * sd_p
        ok = den > 1e-12
        return torch.where(ok, num / den.clamp_min(1e-12), torch.ones_like(num)).float()


def fit_vc(pred: torch.Tensor, target: torch.Tensor, gamma: float = 10.0) -> torch.Tensor:
    """One step's per-channel factors from a batch: s* of the module docstring, shape (C,)."""
    st = VCStats(1, pred.shape[1], gamma)
    st.update(0, pred, target)
    return st.solve()[0]


def apply_vc(output: torch.Tensor, scale_t: torch.Tensor) -> torch.Tensor:
    """Scales the first ``len(scale_t)`` channels (the ε prediction; a learned-σ half is left alone)."""
    c = scale_t.numel()
    shape = (1, c) + (1,) * (output.dim() - 2)
    head = output[:, :c] * scale_t.to(output.dtype).view(shape)
    return head if output.shape[1] == c else torch.cat([head, output[:, c:]], dim=1)


VC_TABLE = "_cachequant_vc"


def vc_output(clock):
    """The denoiser output transform of VC: the (T, C) table held on the denoiser, read at the
    current position on the device."""
    def apply(module, out):
        scale = held(module, VC_TABLE).index_select(0, clock.step_tensor())[0]
        return map_sample(out, lambda x: apply_vc(x, scale))
    return apply
