"""Uniform asymmetric quantizers and their range search.

All quantizers in cachequant are affine: ``q = clamp(round(x / s) + z, 0, 2^b - 1)`` and
``x_hat = (q - z) * s``. Weights get one (s, z) per output channel; activations one per tensor
*per timestep*. Ranges are found by shrinking the observed [min, max] and keeping the candidate
with the lowest L_p reconstruction error (p = 2.4, as in the published code): plain min/max
wastes levels on outliers, and a p slightly above 2 punishes large errors a bit more than MSE.
"""

from __future__ import annotations

import torch

__all__ = [
    "qrange",
    "params_from_range",
    "fake_quant",
    "quantize_codes",
    "weight_qparams",
    "activation_range",
    "E4M3_MAX",
    "e4m3_round",
]

_SEARCH_STEPS = 80  # shrink factors 1.0, 0.99, ..., 0.21
_P = 2.4


def qrange(bits: int) -> tuple[int, int]:
    """The integer code range [0, 2^bits - 1] of an unsigned asymmetric quantizer."""
    if bits < 2 or bits > 16:
        raise ValueError(f"bits must be between 2 and 16, got {bits}")
    return 0, 2**bits - 1


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [lo, hi] (extended to contain 0) onto the code range."""
    qmin, qmax = qrange(bits)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=1e-8)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of ``x``; scale/zero_point broadcast against ``x``."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize ``x`` (the reference path every kernel is tested against)."""
    return (quantize_codes(x, scale, zero_point, bits) - zero_point) * scale


E4M3_MAX = 448.0
"""The largest finite float8_e4m3fn value."""


def e4m3_round(x: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """``e4m3(x / s) · s``: the value an FP8 kernel multiplies, saturated at ±448. A float grid:
    its relative step (1/8 to 1/16) is the same at every magnitude, unlike the affine grids above."""
    return torch.clamp(x / s, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s


def _lp_error(x: torch.Tensor, xq: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return (x - xq).abs().pow(_P).mean(dim=dims)


def weight_qparams(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (dim 0) scale and zero point, range chosen by L_p search.

    Returns tensors shaped ``(C_out, 1, ..., 1)`` so they broadcast against ``weight``.
    """
    w = weight.detach().float()
    flat = w.reshape(w.shape[0], -1)
    lo0, hi0 = flat.min(dim=1).values, flat.max(dim=1).values
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(_SEARCH_STEPS):
        f = 1.0 - 0.01 * i
        lo, hi = lo0 * f, hi0 * f
        s, z = params_from_range(lo, hi, bits)
        err = _lp_error(flat, fake_quant(flat, s[:, None], z[:, None], bits), (1,))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    s, z = params_from_range(best_lo, best_hi, bits)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return s.reshape(shape), z.reshape(shape)


def activation_range(x: torch.Tensor, bits: int, max_elems: int = 1 << 14) -> tuple[float, float]:
    """Per-tensor [lo, hi] for ``x`` by L_p search over shrunk min/max ranges.

    The extreme values come from the whole tensor; the error of each candidate is estimated from
    ``max_elems`` elements (16k pin the smooth error curve down), stratified so that the estimate
    is unbiased and sees the tail that decides the clipping error: the quarter with the largest
    magnitudes exactly, the rest a uniform sample (fixed seed, so calibration stays deterministic)
    of the remaining elements, weighted by how many each stands for. A strided subsample would
    alias with the channel axis — with ``C`` channels innermost and stride ``s`` it visits only
    ``C / gcd(s, C)`` of them — so whether a few outlier channels were seen, and hence the range,
    would depend on how many calibration entries a step happens to have.

    The search is coarse to fine — 20 shrink factors 4 % apart, then 4 % either side of the best
    in 0.5 % steps — which finds the same optimum as the 80-point grid used for weights at a third
    of the cost; it runs once per layer, step and calibration batch.
    """
    flat = x.detach().float().reshape(-1)
    lo0, hi0 = flat.min(), flat.max()
    values, weights = _error_sample(flat, max_elems)
    coarse = 1.0 - 0.04 * torch.arange(20, dtype=torch.float32, device=flat.device)
    best = float(coarse[_best_factor(values, weights, lo0, hi0, coarse, bits)])
    fine = torch.clamp(best + 0.005 * torch.arange(-8, 9, dtype=torch.float32, device=flat.device), 0.05, 1.0)
    f = fine[_best_factor(values, weights, lo0, hi0, fine, bits)]
    return float(lo0 * f), float(hi0 * f)


def _error_sample(flat: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and weights of a stratified sample of ``flat`` (all of it when it is small)."""
    n = flat.numel()
    if n <= count:
        return flat, torch.ones_like(flat)
    magnitude = flat.abs()
    top = torch.topk(magnitude, count // 4, sorted=False).indices
    threshold = magnitude[top].min()
    rest = flat[_subsample(n, count - top.numel()).to(flat.device)]
    rest = rest[rest.abs() < threshold]
    rest_weight = (n - top.numel()) / max(rest.numel(), 1)
    weights = torch.cat([torch.ones(top.numel(), device=flat.device), torch.full_like(rest, rest_weight)])
    return torch.cat([flat[top], rest]), weights


def _subsample(numel: int, count: int) -> torch.Tensor:
    """``count`` indices into ``range(numel)``, uniform with replacement, the same on every call."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(numel, (count,), generator=generator)


def _best_factor(
    values: torch.Tensor, weights: torch.Tensor, lo0: torch.Tensor, hi0: torch.Tensor, fs: torch.Tensor, bits: int
) -> int:
    s, z = params_from_range(lo0 * fs, hi0 * fs, bits)
    err = ((values[None, :] - fake_quant(values[None, :], s[:, None], z[:, None], bits)).abs().pow(_P) * weights).sum(1)
    return int(torch.argmin(err))
