"""Improved precision and recall (Kynkäänniemi et al., 2019) on Inception features, k = 3.

Each set's manifold is the union of balls around its points with radius = distance to the k-th
nearest neighbour within the set. Precision: share of generated samples inside the real manifold;
recall: share of real samples inside the generated manifold.
"""

from __future__ import annotations

import numpy as np
import torch


def kth_radii(x: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance of every row of ``x`` to its k-th nearest neighbour within ``x`` (its ball's radius)."""
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i : i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself at distance 0
    return torch.cat(radii)


def _inside(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    out = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i : i + chunk], ref)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3, chunk: int = 1024,
                     device: str | torch.device = "cpu", real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """(precision, recall) of ``fake`` against ``real``, in float64 on ``device`` (a GPU makes the
    10k × 10k distance matrices cheap). ``real_radii`` (from :func:`kth_radii`) skips recomputing
    the reference manifold when one reference serves many sample sets."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    r = torch.as_tensor(real, dtype=torch.float64, device=device)
    f = torch.as_tensor(fake, dtype=torch.float64, device=device)
    r_rad = kth_radii(r, k, chunk) if real_radii is None else real_radii.to(device=device, dtype=torch.float64)
    f_rad = kth_radii(f, k, chunk)
    precision = _inside(f, r, r_rad, chunk).double().mean().item()
    recall = _inside(r, f, f_rad, chunk).double().mean().item()
    return precision, recall
