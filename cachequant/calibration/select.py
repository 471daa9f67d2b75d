"""Choosing calibration samples from a pool of intermediate model inputs.

TAP — temporal-aware parallel clustering (Q&C §3.1): caching makes samples along a trajectory
redundant, so the calibration set should cover the pool's structure in *data and time*:

1. draw P random subsamples of the pool (each a fraction of it, e.g. 1/20, and together at least
   twice the number to select), in parallel threads;
2. per subsample, W = λ·S_data + (1 − λ)·S_time with Gaussian kernels
   S_data[i, j] = exp(−‖f_i − f_j‖² / (2σ_d²)),  S_time[i, j] = exp(−(t_i − t_j)² / (2σ_t²)),
   σ_d² = median of the pairwise squared feature distances (the usual median heuristic, so λ
   weighs two similarities on the same [0, 1] scale), σ_t = (max t − min t) / 10 (steps closer
   than a tenth of the trajectory count as similar);
3. the normalized Laplacian L = I − D^{-1/2} W D^{-1/2}; its k eigenvectors of smallest
   eigenvalue (largest of D^{-1/2} W D^{-1/2}), rows normalised to unit length, clustered by k-means;
4. the P clusterings are combined by taking all their clusters together, and the calibration set
   is drawn uniformly across clusters (the same quota from each, without replacement; repeats
   across subsamples are skipped).

Why "at least twice": the paper's pool is large next to its selection (800 from many thousands),
so P subsamples of 1/20 hold far more than the selection. Ours is often small (32 trajectories ×
50 steps = 1,600 entries, 256 to select). There, 3 × 80 subsampled entries are fewer than the
selection: every one of them was chosen and the rest drawn at random, so neither the clustering
nor λ decided anything.

``tap-per-step`` is TAP stratified by step: every step keeps the same share (as
``uniform-per-step``), and within a step the entries are spread over the step's own spectral
clusters (the data kernel alone: time is constant inside a step). Why: activation ranges are per
step, so a selection must cover every step on its own; TAP's pooled draw can leave a step with one
entry, and then that step's range rests on one sample (``results/qandc``). This keeps TAP's
diversity argument and removes the coverage confound, so the two can be compared fairly.

Alternatives for comparison: ``random``, ``uniform-per-step`` (the same number from every step:
the reference default), and scikit-learn's ``kmeans``, ``dbscan``, ``agglomerative`` on the
concatenated (feature, scaled time) vectors.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.linalg import eigh
from scipy.spatial.distance import cdist, pdist

from ..config import SELECTION_METHODS as METHODS


def _spectral_labels(feats: np.ndarray, steps: np.ndarray, k: int, lam: float, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    d2 = cdist(feats, feats, "sqeuclidean")
    med = np.median(pdist(feats, "sqeuclidean")) if len(feats) > 1 else 1.0
    s_data = np.exp(-d2 / (2 * max(med, 1e-12)))
    span = float(steps.max() - steps.min())
    sig_t = max(span / 10.0, 1e-6)
    s_time = np.exp(-((steps[:, None] - steps[None, :]) ** 2) / (2 * sig_t**2))
    w = lam * s_data + (1 - lam) * s_time
    d = w.sum(1)
    dinv = 1.0 / np.sqrt(np.maximum(d, 1e-12))
    a = dinv[:, None] * w * dinv[None, :]  # D^-1/2 W D^-1/2 = I − L
    n = len(a)
    k = min(k, n)
    _, vec = eigh(a, subset_by_index=[n - k, n - 1])
    vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(vec)


def _draw_uniform(clusters: list[np.ndarray], num: int, rng: np.random.Generator) -> np.ndarray:
    """Round-robin over shuffled clusters: every cluster gives one before any gives a second."""
    pools = [list(rng.permutation(c)) for c in clusters if len(c)]
    chosen: list[int] = []
    seen: set[int] = set()
    while len(chosen) < num and any(pools):
        for p in pools:
            while p and p[-1] in seen:
                p.pop()
            if p and len(chosen) < num:
                i = int(p.pop())
                chosen.append(i)
                seen.add(i)
    return np.array(sorted(chosen), dtype=np.int64)


def tap_select(features: np.ndarray, steps: np.ndarray, num: int, *, lam: float = 0.5, num_subsamples: int = 3,
               fraction: float = 1 / 20, clusters: int = 100, seed: int = 0,
               return_clusters: bool = False):
    """Indices of ``num`` pool entries chosen by TAP (see the module docstring)."""
    n = len(features)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if num > n:
        raise ValueError(f"cannot select {num} samples from a pool of {n}")
    feats = np.asarray(features, dtype=np.float64).reshape(n, -1)
    steps = np.asarray(steps, dtype=np.float64)
    rng = np.random.default_rng(seed)
    p = max(num_subsamples, 1)
    m = min(n, max(int(round(n * fraction)), 2 * clusters // p, -(-2 * num // p), 8))
    subs = [np.sort(rng.choice(n, size=m, replace=False)) for _ in range(num_subsamples)]
    k = max(2, min(m, -(-clusters // num_subsamples)))  # the P clusterings together give ~`clusters`

    def work(args):
        j, idx = args
        return idx, _spectral_labels(feats[idx], steps[idx], k, lam, seed + j)

    with ThreadPoolExecutor(max_workers=num_subsamples) as ex:  # numpy/scipy release the GIL
        results = list(ex.map(work, enumerate(subs)))
    groups = [idx[lab == c] for idx, lab in results for c in np.unique(lab)]
    chosen = _draw_uniform(groups, num, rng)
    if len(chosen) < num:  # subsamples smaller than the request: top up at random
        rest = np.setdiff1d(np.arange(n), chosen)
        chosen = np.sort(np.concatenate([chosen, rng.choice(rest, size=num - len(chosen), replace=False)]))
    return (chosen, groups) if return_clusters else chosen


def tap_per_step(features: np.ndarray, steps: np.ndarray, num: int, *, seed: int = 0) -> tuple[np.ndarray, int]:
    """TAP stratified by step (module docstring): the per-step quotas of ``uniform-per-step``, each
    filled with one entry from each of that many spectral clusters of the step's entries. Returns
    the indices and the number of clusters formed."""
    n = len(features)
    feats = np.asarray(features, dtype=np.float64).reshape(n, -1)
    steps = np.asarray(steps)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(steps == s) for s in np.unique(steps)]
    quota = np.bincount(np.searchsorted(np.unique(steps), steps[_draw_uniform(groups, num, rng)]),
                        minlength=len(groups))
    chosen, clusters = [], 0
    for j, (idx, q) in enumerate(zip(groups, quota)):
        if q >= len(idx):
            chosen.append(idx)
            continue
        if q == 0:
            continue
        labels = _spectral_labels(feats[idx], steps[idx].astype(np.float64), int(q), 1.0, seed + j) if q > 1 \
            else np.zeros(len(idx), dtype=np.int64)
        chosen.append(np.array([rng.choice(idx[labels == c]) for c in np.unique(labels)]))
        clusters += len(np.unique(labels))
    out = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    if len(out) < num:  # k-means may merge clusters: top up within the short steps' remaining entries
        short = [np.setdiff1d(idx, out) for idx, q in zip(groups, quota) if (np.isin(idx, out).sum() < q)]
        extra = _draw_uniform(short, num - len(out), rng)
        out = np.sort(np.concatenate([out, extra]))
    return out.astype(np.int64), clusters


def select(method: str, features: np.ndarray, steps: np.ndarray, num: int, *, lam: float = 0.5,
           seed: int = 0, clusters: int = 100, info: dict | None = None) -> np.ndarray:
    """Indices of ``num`` calibration samples from the pool, by ``method`` (one of :data:`METHODS`).
    ``info``, if given, receives what decided the selection: the number of clusters and, for TAP,
    how many pool entries its subsamples offered and how many were topped up at random."""
    n = len(features)
    if method not in METHODS:
        raise ValueError(f"calibration selection must be one of {', '.join(METHODS)}; got {method!r}")
    if num >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    steps = np.asarray(steps)
    if method == "tap":
        chosen, groups = tap_select(features, steps, num, lam=lam, seed=seed, clusters=clusters,
                                    return_clusters=True)
        if info is not None:
            candidates = np.unique(np.concatenate(groups))
            info.update(clusters=len(groups), candidates=int(len(candidates)),
                        random_top_up=int(len(np.setdiff1d(chosen, candidates))))
        return chosen
    if method == "tap-per-step":
        chosen, k = tap_per_step(features, steps, num, seed=seed)
        if info is not None:
            info.update(clusters=k)
        return chosen
    if method == "random":
        return np.sort(rng.choice(n, size=num, replace=False))
    if method == "uniform-per-step":
        groups = [np.flatnonzero(steps == s) for s in np.unique(steps)]
        return _draw_uniform(groups, num, rng)
    from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans

    feats = np.asarray(features, dtype=np.float64).reshape(n, -1)
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
    t = (steps - steps.mean()) / (steps.std() + 1e-8)
    x = np.concatenate([feats, t[:, None] * np.sqrt(feats.shape[1])], axis=1)  # time weighs like the data
    k = min(clusters, n)
    if method == "kmeans":
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
    elif method == "agglomerative":
        labels = AgglomerativeClustering(n_clusters=k).fit_predict(x)
    else:
        eps = float(np.median(pdist(x[: min(n, 2000)]))) * 0.5
        labels = DBSCAN(eps=eps, min_samples=3).fit_predict(x)  # noise points (-1) form one group
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    if info is not None:
        info.update(clusters=len(groups))
    return _draw_uniform(groups, num, rng)
