"""GroupNorm on channels-last (NHWC) activations, without leaving NHWC.

Why: the kernel backends run the UNet in channels-last so that the implicit-GEMM convolutions read
and write NHWC without copies. PyTorch's CUDA GroupNorm (torch ≤ 2.11) accepts only NCHW: it copies
a channels-last input to NCHW and returns NCHW, which the next 8-bit conv copies back. The SD 1.5
profile on the H200 (``speed.py --profile``) showed the cost:
9,338 copy kernels (114.5 ms) per image on the 8-bit paths against 1,637 (18.8 ms) in fp16, with
~61 GroupNorms per UNet call, each good for two copies.

Two kernels, nothing else between them (a first version merged per-chunk statistics with a dozen
small torch ops per call and lost to PyTorch's own GroupNorm; a second, one statistics program per
(n, g), ran 64 programs at SD's batch 2 and took 45 ms of an SD image's GPU time, 14.5 µs a call;
``results/speed/README.md`` has the current kernel's timings):

1. ``_stats_kernel``: grid (N·G, K chunks of HW), enough programs to fill the GPU. Each reduces its
   chunk of one group's ``(HW, C/G)`` slab to (mean, M2), M2 = Σ(x − mean)² computed around the
   chunk's own mean (a second read of the chunk, from L2), so no E[x²] − E[x]² cancellation occurs.
2. ``_apply_kernel`` merges the K chunks of each of its columns' groups with Chan et al.'s pairwise
   formula (M2 = M2_a + M2_b + δ²·n_a·n_b/n), then y = (x − mean)·rstd·γ + β in fp32, stored in
   x's dtype, NHWC. Subtracting the mean first keeps the mean ≫ std case accurate.

The result equals ``torch.nn.functional.group_norm`` to rounding (tested, also through Triton's
interpreter on the CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["HW", "C", "CHUNK"])
def _stats_kernel(x_ptr, part_ptr, HW, C, CHUNK, G: tl.constexpr, CG: tl.constexpr,
                  BHW: tl.constexpr, BCG: tl.constexpr):
    pid_ng = tl.program_id(0)  # = n·G + g
    pid_k = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    base = x_ptr + n.to(tl.int64) * HW * C + g * CG
    cols = tl.arange(0, BCG)
    cmask = cols < CG
    start = pid_k * CHUNK
    stop = tl.minimum(start + CHUNK, HW)
    acc = tl.zeros((BHW, BCG), dtype=tl.float32)
    for off in range(start, stop, BHW):
        rows = off + tl.arange(0, BHW)
        m = (rows < stop)[:, None] & cmask[None, :]
        acc += tl.load(base + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / ((stop - start) * CG).to(tl.float32)
    acc2 = tl.zeros((BHW, BCG), dtype=tl.float32)
    for off in range(start, stop, BHW):
        rows = off + tl.arange(0, BHW)
        m = (rows < stop)[:, None] & cmask[None, :]
        d = tl.load(base + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32) - mean
        acc2 += tl.where(m, d * d, 0.0)
    out = part_ptr + (pid_ng * tl.num_programs(1) + pid_k) * 2
    tl.store(out, mean)
    tl.store(out + 1, tl.sum(tl.sum(acc2, axis=1), axis=0))


@triton.jit(do_not_specialize=["HW", "C", "CHUNK", "K"])
def _apply_kernel(x_ptr, y_ptr, part_ptr, w_ptr, b_ptr, HW, C, CHUNK, K, eps, G: tl.constexpr, CG: tl.constexpr,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_c = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_c * BC + tl.arange(0, BC)
    cmask = cols < C
    # this program's columns' group statistics, merged from the K chunks (Chan et al.)
    part = part_ptr + (n * G + cols // CG) * K * 2
    cnt = tl.zeros((BC,), dtype=tl.float32)
    mu = tl.zeros((BC,), dtype=tl.float32)
    m2 = tl.zeros((BC,), dtype=tl.float32)
    for k in range(0, K):
        nb = (tl.minimum(CHUNK, HW - k * CHUNK) * CG).to(tl.float32)
        mb = tl.load(part + k * 2, mask=cmask, other=0.0)
        m2b = tl.load(part + k * 2 + 1, mask=cmask, other=0.0)
        tot = cnt + nb
        delta = mb - mu
        mu = mu + delta * (nb / tot)
        m2 = m2 + m2b + delta * delta * (cnt * nb / tot)
        cnt = tot
    a = 1.0 / tl.sqrt(m2 / cnt + eps)
    if HAS_W:
        a = a * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    m = (rows < HW)[:, None] & cmask[None, :]
    off = n.to(tl.int64) * HW * C + rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    y = (x - mu[None, :]) * a[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)


def _chunk(hw: int, ng: int, target_programs: int = 528, min_rows: int = 64) -> int:
    """Rows of HW per statistics program: enough programs to fill the GPU (4 per SM of an H100/H200)
    even when N·G is small (SD 1.5 at batch 2: N·G = 64), but at least ``min_rows`` rows each."""
    chunks = max(1, min(triton.cdiv(hw, min_rows), triton.cdiv(target_programs, ng)))
    return triton.cdiv(hw, chunks)


def group_norm_nhwc(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    """``F.group_norm`` for a 4-d channels-last contiguous ``x``; returns channels-last."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("group_norm_nhwc needs a 4-d channels-last contiguous tensor "
                         f"(got shape {tuple(x.shape)}, strides {x.stride()})")
    n, c, h, w = x.shape
    if c % num_groups:
        raise ValueError(f"{c} channels are not divisible into {num_groups} groups")
    hw, cg = h * w, c // num_groups
    ng = n * num_groups
    chunk = _chunk(hw, ng)
    k = triton.cdiv(hw, chunk)
    part = torch.empty((ng, k, 2), device=x.device, dtype=torch.float32)
    bcg = triton.next_power_of_2(cg)
    bhw = max(1, min(triton.next_power_of_2(chunk), 4096 // bcg))
    _stats_kernel[(ng, k)](x, part, hw, c, chunk, G=num_groups, CG=cg, BHW=bhw, BCG=bcg, num_warps=4)
    y = torch.empty_like(x)  # empty_like keeps channels-last strides
    bc = min(128, triton.next_power_of_2(c))
    bm = 32
    _apply_kernel[(n, triton.cdiv(hw, bm), triton.cdiv(c, bc))](
        x, y, part, x if weight is None else weight, x if bias is None else bias, hw, c, chunk, k, float(eps),
        G=num_groups, CG=cg, HAS_W=weight is not None, HAS_B=bias is not None, BM=bm, BC=bc, num_warps=4)
    return y
