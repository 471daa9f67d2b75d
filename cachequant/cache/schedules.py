"""Cache schedules: on which of the T model calls the deep (cached) feature is recomputed.

A *schedule* is the sorted list of *full steps*; it always starts with step 0, because the first
call has nothing to reuse. Every other step reuses the feature of the latest full step before it,
so a schedule cuts the steps 0..T-1 into consecutive *groups* ``[s, e)``, each opened by the full
step ``s``. With an interval N there are ``K = ceil(T / N)`` full steps, whatever the strategy, so
the strategies differ only in where they spend that fixed budget:

* ``uniform``   — every N-th step (DeepCache's uniform 1:N).
* ``quadratic`` — DeepCache's non-uniform strategy: full steps crowd around a centre step.
* ``dps``       — CacheQuant's dynamic-programming schedule: the partition into K groups whose
  reused features stay closest (in L1) to the features they replace, measured on an uncached
  full-precision run. Given the features the *quantized* model computes on the same inputs
  (``source``), the cost becomes quantization-aware: what a group reuses is the quantized full
  step's feature, so its error counts on every step of the group, the full step included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SCHEDULE_KINDS",
    "dps_schedule",
    "group_costs",
    "make_schedule",
    "num_full_steps",
    "quadratic_schedule",
    "schedule_cost",
    "uniform_schedule",
]

SCHEDULE_KINDS = ("uniform", "quadratic", "dps")

# Feature elements per chunk on the CPU. Each chunk of all T steps is copied into one reused buffer
# (fresh large allocations page-fault on every first touch) and its windows stay in the L2/L3
# caches while the pairwise kernel sweeps them; pdist sums one pair's chunk in the compute dtype,
# so the chunk size also bounds that rounding (float32: 1024 additions per SIMD lane).
_CPU_CHUNK = 8192
# On accelerators: elements of the (T, chunk) buffer, to bound the extra device memory.
_DEVICE_BUFFER_ELEMS = 1 << 24
# Chunk i is accumulated in lane i % _LANES (see _band_distances); also the most CPU threads used.
_LANES = 16


# --------------------------------------------------------------------------------------------
# validation helpers


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def num_full_steps(num_steps: int, interval: int) -> int:
    """K = ceil(T / N): the number of full steps every strategy gets, so that they are comparable."""
    T = _check_int("num_steps", num_steps, 1)
    N = _check_int("interval", interval, 1)
    return -(-T // N)


def _length_bounds(interval: int, min_len: int | None, max_len: int | None) -> tuple[int, int]:
    """Group-length bounds for DPS: [ceil(N/2), 2N] by default, so no full step is wasted on a tiny
    group and no feature is reused for much longer than the interval promises."""
    lo = -(-interval // 2) if min_len is None else _check_int("min_len", min_len, 1)
    hi = 2 * interval if max_len is None else _check_int("max_len", max_len, 1)
    if lo > hi:
        raise ValueError(f"min_len ({lo}) must not exceed max_len ({hi})")
    return lo, hi


def _check_feasible(T: int, K: int, lo: int, hi: int, interval: int) -> None:
    # K groups with lengths in [lo, hi] can cover exactly the lengths K*lo .. K*hi (every total in
    # between is reachable by moving one step at a time between groups).
    if not K * lo <= T <= K * hi:
        raise ValueError(
            f"no partition of {T} steps into K = ceil({T}/{interval}) = {K} groups with lengths in "
            f"[{lo}, {hi}] exists (needs {K * lo} <= {T} <= {K * hi}); use a smaller interval or "
            f"pass min_len/max_len that admit one"
        )


def _check_schedule(schedule: Sequence[int], T: int) -> list[int]:
    sched = [int(s) for s in schedule]
    if not sched or sched[0] != 0:
        raise ValueError(f"a schedule must start with full step 0, got {sched[:8]}")
    if any(b <= a for a, b in zip(sched, sched[1:])):
        raise ValueError(f"a schedule must be strictly increasing, got {sched[:16]}")
    if sched[-1] >= T:
        raise ValueError(f"schedule entry {sched[-1]} is out of range for {T} steps (valid: 0..{T - 1})")
    return sched


# --------------------------------------------------------------------------------------------
# fixed schedules


def uniform_schedule(num_steps: int, interval: int) -> list[int]:
    """Full steps 0, N, 2N, ... below T: the baseline of DeepCache (uniform 1:N caching)."""
    T = _check_int("num_steps", num_steps, 1)
    N = _check_int("interval", interval, 1)
    return list(range(0, T, N))


def quadratic_schedule(
    num_steps: int, interval: int, *, center: int | None = None, power: float = 2.0
) -> list[int]:
    """DeepCache's non-uniform schedule: the K = ceil(T/N) full steps crowd around ``center``.

    The feature changes fastest in some middle stretch of sampling, so refreshing it more often
    there (and less at the ends) keeps more of the quality at the same cost. Formula (ours,
    after DeepCache's quadratic sampling): with c = ``center`` (default T // 2) and
    u_i = -1 + 2i/K for i = 0..K-1 (evenly spaced in [-1, 1), u_0 = -1),

        x_i = c - |u_i|^p * c            for u_i < 0   (x_0 = 0: step 0 is always full)
        x_i = c + |u_i|^p * (T - c)      for u_i >= 0  (u = 1, i.e. step T, is never reached)

    rounded half up and clipped to [0, T-1]. Since dx/du ~ |u|^(p-1) vanishes at u = 0, spacing
    near c is small and grows towards both ends. Rounding can merge neighbours near c; the
    missing entries are filled with the unused steps closest to c (ties: the earlier step), which
    keeps the density pattern and makes the result exactly K unique sorted steps.
    """
    T = _check_int("num_steps", num_steps, 1)
    K = num_full_steps(T, interval)
    c = T // 2 if center is None else _check_int("center", center, 0)
    if c >= T:
        raise ValueError(f"center must be a step in [0, {T - 1}], got {c}")
    if not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
        raise ValueError(f"power must be a positive finite number, got {power!r}")
    u = -1.0 + 2.0 * np.arange(K) / K
    mag = np.abs(u) ** power
    x = np.where(u < 0, c - mag * c, c + mag * (T - c))
    chosen = set(np.clip(np.floor(x + 0.5), 0, T - 1).astype(np.int64).tolist())
    chosen.add(0)
    if len(chosen) < K:
        # Deterministic fill: unused steps ordered by distance to the centre, earlier first.
        for step in sorted(range(T), key=lambda s: (abs(s - c), s)):
            if len(chosen) == K:
                break
            chosen.add(step)
    return sorted(chosen)


# --------------------------------------------------------------------------------------------
# DPS: costs


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


def _as_torch(x: Any, t: int) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise ValueError(f"features[{t}] has unsupported dtype {x.dtype}; pass float arrays or tensors")
        if not x.flags.writeable or x.dtype.kind == "b":
            return torch.tensor(x)  # a copy: from_numpy warns on read-only memory, bool needs one
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(
        f"features[{t}] is a {type(x).__name__}; pass a sequence of torch tensors or numpy arrays"
    )


def _prepare(features: Any) -> list[torch.Tensor]:
    """Flat 1-D views of the T features; checks the count, the shapes and the dtypes."""
    if isinstance(features, (torch.Tensor, np.ndarray)) and features.ndim == 0:
        raise ValueError("features must be a sequence of T per-step features, got a scalar")
    try:
        T = len(features)
    except TypeError:
        raise ValueError(
            f"features must be a sequence of T per-step tensors/arrays, got {type(features).__name__}"
        ) from None
    if T == 0:
        raise ValueError("features is empty (T = 0); record the cached feature at every step of an uncached run")
    flat = []
    shape0 = None
    for t in range(T):
        x = _as_torch(features[t], t)
        if x.is_complex() or not (x.is_floating_point() or x.dtype in _INT_DTYPES):
            raise ValueError(f"features[{t}] has unsupported dtype {x.dtype}; pass real-valued features")
        if shape0 is None:
            shape0 = tuple(x.shape)
        elif tuple(x.shape) != shape0:
            raise ValueError(
                f"features[{t}] has shape {tuple(x.shape)} but features[0] has shape {shape0}; "
                f"all steps must record the same feature (same batch, channels and size)"
            )
        flat.append(x.reshape(-1))
    if flat[0].numel() == 0:
        raise ValueError(f"features have no elements (shape {shape0}); record a non-empty feature")
    return flat


def _raise_non_finite(flat: list[torch.Tensor]) -> None:
    for t, x in enumerate(flat):
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"features[{t}] contains NaN or infinite values; the recording run diverged or "
                f"overflowed — record the features in full precision (float32) and check the model inputs"
            )
    raise ValueError(
        "the L1 distances between features overflow the compute precision; pass float64 features "
        "or rescale them"
    )


def _band_distances(flat: list[torch.Tensor], width: int) -> np.ndarray:
    """``dist[s, d] = ||X_{s+d} - X_s||_1`` for 1 <= d <= width and s + d < T (else 0), float64.

    Only the band is needed. The fused pairwise kernel ``F.pdist`` (one SIMD pass per pair, no
    temporaries) costs ~2.5x less per pair than sub/abs/sum per offset, so the steps are cut into
    windows of 2*width rows starting every width steps: every band pair (s, s+d) lies in the window
    of its anchor (s // width). The windows compute about twice the band, O(T * width * size) and
    never T*T*size, and still win, with ~T/width kernel calls per chunk instead of ~3*width.
    The features stream chunk by chunk through a reused (T, chunk) buffer. Chunk sums are taken
    in the compute dtype (float32, or float64 if any feature is float64; relative error ~1e-6 in
    float32) and accumulated in float64.
    """
    T = len(flat)
    W = max(1, width)
    first = flat[0]
    size = first.numel()
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in flat) else torch.float32
    device = first.device if first.device.type == "cuda" else torch.device("cpu")
    chunk = _CPU_CHUNK if device.type == "cpu" else max(1024, _DEVICE_BUFFER_ELEMS // T)
    chunk = min(chunk, size)

    # Windows (start, rows) with at least 2 rows, and the offsets of their condensed outputs.
    windows = []
    total = 0
    for s0 in range(0, max(T - 1, 0), W):
        n = min(2 * W, T - s0)
        windows.append((s0, n, total))
        total += n * (n - 1) // 2
    dist = np.zeros((T, W + 1), dtype=np.float64)
    if not windows:  # T == 1: no pairs; still refuse non-finite input
        if first.is_floating_point() and not bool(torch.isfinite(first).all()):
            _raise_non_finite(flat)
        return dist

    fast = all(x.dtype == dtype and x.device == device for x in flat)

    @torch.no_grad()  # grad mode is per thread; recorded features may still require grad
    def run_lane(chunk_starts: list[int], acc: torch.Tensor) -> None:
        buf = torch.empty(T, chunk, dtype=dtype, device=device)
        for a in chunk_starts:
            b = min(a + chunk, size)
            cur = buf if b - a == chunk else torch.empty(T, b - a, dtype=dtype, device=device)
            if fast:
                torch.stack([x[a:b] for x in flat], out=cur)
            else:
                for t, x in enumerate(flat):
                    cur[t].copy_(x[a:b])
            for s0, n, off in windows:
                acc[off : off + n * (n - 1) // 2] += F.pdist(cur[s0 : s0 + n], p=1)

    # Chunk i goes to lane i % _LANES; lanes are summed in a fixed order, so the float64 totals
    # (and hence the DP's tie-breaks) do not depend on the number of threads or their timing.
    starts = list(range(0, size, chunk))
    lanes = [starts[i::_LANES] for i in range(min(_LANES, len(starts)))]
    accs = [torch.zeros(total, dtype=torch.float64, device=device) for _ in lanes]
    workers = min(torch.get_num_threads(), len(lanes)) if device.type == "cpu" else 1
    if workers <= 1:
        for lane, acc in zip(lanes, accs):
            run_lane(lane, acc)
    else:
        _run_threads(workers, lambda w: [run_lane(lanes[i], accs[i]) for i in range(w, len(lanes), workers)])
    acc_np = torch.stack(accs).sum(0).cpu().numpy() if len(accs) > 1 else accs[0].cpu().numpy()
    if not np.isfinite(acc_np).all():
        _raise_non_finite(flat)

    # Gather the band: anchor s -> window s // W, pair (i, j) -> its condensed index.
    for s0, n, off in windows:
        S, D = np.meshgrid(np.arange(s0, min(s0 + W, T - 1)), np.arange(1, W + 1), indexing="ij")
        ok = S + D < T
        i, j = S[ok] - s0, S[ok] + D[ok] - s0
        dist[S[ok], D[ok]] = acc_np[off + i * n - i * (i + 1) // 2 + (j - i - 1)]
    return dist


def _run_threads(workers: int, job) -> None:
    """Runs ``job(w)`` for w = 0..workers-1 on Python threads whose torch ops are single-threaded.

    torch releases the GIL inside kernels, so this uses ``workers`` cores. It is used instead of
    torch's intra-op pool because every pdist call is a fork/join of that pool: when another process
    keeps one core busy, each join waits for the descheduled thread and the whole cost table gets
    2-4x slower than single-threaded; independent threads with no joins degrade gracefully.
    ``torch.set_num_threads(1)`` in a worker sets that thread's OpenMP/MKL thread count; the
    process-wide value it also writes is put back afterwards.
    """
    import threading

    previous = torch.get_num_threads()
    errors: list[BaseException] = []

    def target(w: int) -> None:
        try:
            torch.set_num_threads(1)
            job(w)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(w,), name=f"cachequant-dps-{w}") for w in range(workers)]
    try:
        for th in threads:
            th.start()
    finally:
        for th in threads:
            if th.ident is not None:
                th.join()
        torch.set_num_threads(previous)
    if errors:
        raise errors[0]


def group_costs(features: Sequence[Any], max_len: int) -> np.ndarray:
    """Table ``G[s, l] = D(s, s + l)`` of every group cost for lengths 0..max_len, float64.

    D(s, e) = sum_{t=s+1}^{e-1} ||X_t - X_s||_1 is the L1 error of reusing step s's feature on the
    rest of its group. Rows are anchors s = 0..T-1; entries with s + l > T are +inf. Built from
    the band distances by a cumulative sum over t, so each distance is computed once.
    """
    max_len = _check_int("max_len", max_len, 1)
    flat = _prepare(features)
    return _costs_from_flat(flat, max_len)


def _costs_from_flat(flat: list[torch.Tensor], max_len: int) -> np.ndarray:
    T = len(flat)
    dist = _band_distances(flat, max_len - 1)  # (T, W + 1), column 0 is zero
    G = np.zeros((T, max_len + 1), dtype=np.float64)
    k = min(max_len, dist.shape[1])
    G[:, 1 : k + 1] = np.cumsum(dist[:, :k], axis=1)  # G[s, l] = sum_{d < l} dist[s, d]
    s = np.arange(T)[:, None]
    l = np.arange(max_len + 1)[None, :]
    G[s + l > T] = np.inf
    return G


def _prepare_source(source: Sequence[Any] | None, flat: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Flat views of the quantized features, checked against the full-precision ones."""
    if source is None:
        return None
    src = _prepare(source)
    if len(src) != len(flat) or src[0].numel() != flat[0].numel():
        raise ValueError(f"source has {len(src)} steps of {src[0].numel()} elements, features {len(flat)} of "
                         f"{flat[0].numel()}: record both on the same inputs (one feature per step)")
    return src


@torch.no_grad()
def _cross_costs(flat: list[torch.Tensor], src: list[torch.Tensor], max_len: int) -> np.ndarray:
    """``G[s, l] = D_q(s, s + l) = sum_{d < l} ||X_{s+d} - Xq_s||_1`` (+inf past T), float64.

    The cross distances have no symmetric pdist form; they are taken chunk by chunk over the
    feature, one subtraction per offset d over all anchors at once (O(T * max_len * size)),
    each chunk's sums in the compute dtype and accumulated in float64."""
    T = len(flat)
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in flat + src) else torch.float32
    size = flat[0].numel()
    chunk = min(size, max(1024, _DEVICE_BUFFER_ELEMS // T))
    dist = torch.zeros(T, max_len, dtype=torch.float64)
    for a in range(0, size, chunk):
        b = min(a + chunk, size)
        x = torch.stack([f[a:b].to("cpu", dtype) for f in flat])
        q = torch.stack([f[a:b].to("cpu", dtype) for f in src])
        for d in range(min(max_len, T)):
            dist[: T - d, d] += (x[d:] - q[: T - d]).abs().sum(1).double()
    if not bool(torch.isfinite(dist).all()):
        _raise_non_finite(flat + src)
    G = np.zeros((T, max_len + 1), dtype=np.float64)
    G[:, 1:] = np.cumsum(dist.numpy(), axis=1)
    s = np.arange(T)[:, None]
    l = np.arange(max_len + 1)[None, :]
    G[s + l > T] = np.inf
    return G


@torch.no_grad()
def schedule_cost(features: Sequence[Any], schedule: Sequence[int], source: Sequence[Any] | None = None) -> float:
    """Total cost sum over groups of D(s, e) of any schedule — D_q(s, e) with ``source`` (see
    :func:`dps_schedule`) — computed directly in float64.

    Lets uniform, quadratic and DPS schedules be compared on the same recorded run (DPS is the
    minimum over all schedules whose group lengths satisfy its constraints).
    """
    flat = _prepare(features)
    T = len(flat)
    src = _prepare_source(source, flat)
    sched = _check_schedule(schedule, T)
    bounds = sched + [T]
    total = 0.0
    for s, e in zip(bounds, bounds[1:]):
        anchor = (flat if src is None else src)[s].to(torch.float64)
        for t in range(s if src is not None else s + 1, e):
            total += float((flat[t].to(torch.float64) - anchor).abs().sum())
    if not math.isfinite(total):
        _raise_non_finite(flat if src is None else flat + src)
    return total


# --------------------------------------------------------------------------------------------
# DPS: the dynamic programme


def dps_schedule(
    features: Sequence[Any],
    interval: int,
    *,
    min_len: int | None = None,
    max_len: int | None = None,
    source: Sequence[Any] | None = None,
) -> list[int]:
    """CacheQuant's dynamic-programming schedule (DPS, CVPR 2025): the K = ceil(T/N) full steps
    that minimise the total L1 error of the reused features.

    ``features[t]`` is the cached feature at step t of an uncached full-precision run (same shape
    at every step; torch tensors on any device or numpy arrays). The steps 0..T-1 are cut into
    exactly K consecutive groups [s, e) of lengths in [min_len, max_len] (default [ceil(N/2), 2N],
    the last group included) minimising sum D(s, e), D(s, e) = sum_{t=s+1}^{e-1} ||X_t - X_s||_1.
    Same cost as uniform caching (K full steps), but the full steps go where the feature drifts
    fastest.

    DP over M[k][n] = least cost of covering steps 0..n-1 with k groups:
    M[k][n] = min_{n - j in [lo, hi]} M[k-1][j] + D(j, n), with argmin back-pointers; the answer
    is M[K][T]. O(K * T * (hi - lo)) after the O(T * hi * size) cost table (see group_costs;
    T=250, N=20, features (16, 64, 32, 32): ~2 s on two CPU cores). Ties go to the shortest last
    group, deterministically (the costs do not depend on the thread count).

    ``source`` (quantization-aware DPS): ``source[t]`` is the feature the quantized model computes
    at step t on the same inputs as ``features[t]``. The group cost is then
    D_q(s, e) = sum_{t=s}^{e-1} ||X_t - Xq_s||_1: every step of the group, the full step s included,
    receives the quantized feature Xq_s instead of its full-precision X_t. With Xq = X this is D.
    The paper states that the schedule accounts for quantization error; its cost (Eq. 5) compares
    full-precision features only, which cannot see a step where the quantized feature is far off.

    Returns the sorted group starts (K entries, the first is 0). Raises ValueError on empty input,
    mismatched shapes, non-finite values, or when no such partition exists (K*lo <= T <= K*hi
    fails).
    """
    N = _check_int("interval", interval, 1)
    lo, hi = _length_bounds(N, min_len, max_len)
    flat = _prepare(features)
    T = len(flat)
    src = _prepare_source(source, flat)
    K = num_full_steps(T, N)
    _check_feasible(T, K, lo, hi, N)
    if K == T:  # all groups have length 1 (interval 1): every step is full, no costs needed
        for x in flat + (src or []):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                _raise_non_finite(flat if src is None else flat + src)
        return list(range(T))

    G = _costs_from_flat(flat, hi) if src is None else _cross_costs(flat, src, hi)
    M_prev = np.full(T + 1, np.inf)
    M_prev[0] = 0.0
    back = np.zeros((K + 1, T + 1), dtype=np.int64)
    for k in range(1, K + 1):
        best = np.full(T + 1, np.inf)
        arg = np.full(T + 1, -1, dtype=np.int64)
        for length in range(lo, min(hi, T) + 1):
            j = np.arange(0, T - length + 1)
            cand = M_prev[j] + G[j, length]
            n = j + length
            better = cand < best[n]
            best[n[better]] = cand[better]
            arg[n[better]] = j[better]
        M_prev = best
        back[k] = arg
    if not np.isfinite(M_prev[T]):  # unreachable after _check_feasible with finite costs
        raise ValueError(f"no partition of {T} steps into {K} groups with lengths in [{lo}, {hi}] exists")
    starts = []
    n = T
    for k in range(K, 0, -1):
        n = int(back[k, n])
        starts.append(n)
    starts.reverse()
    assert starts[0] == 0 and len(starts) == K
    return starts


# --------------------------------------------------------------------------------------------


def make_schedule(kind: str, num_steps: int, interval: int, features: Sequence[Any] | None = None,
                  source: Sequence[Any] | None = None) -> list[int]:
    """The schedule of strategy ``kind`` ('uniform' | 'quadratic' | 'dps') for T = ``num_steps``.

    'dps' needs the recorded ``features`` (one per step), and takes the quantized model's
    ``source`` features for the quantization-aware cost; the others ignore both.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    T = _check_int("num_steps", num_steps, 1)
    if kind == "uniform":
        return uniform_schedule(T, interval)
    if kind == "quadratic":
        return quadratic_schedule(T, interval)
    if features is None:
        raise ValueError(
            "the 'dps' schedule needs features: the cached feature at each step of an uncached "
            "full-precision run (or choose 'uniform' or 'quadratic')"
        )
    try:
        n = len(features)
    except TypeError:
        n = None
    if n is not None and n != T:
        raise ValueError(f"'dps' got features for {n} steps but num_steps is {T}; record one feature per model call")
    return dps_schedule(features, interval, source=source)
