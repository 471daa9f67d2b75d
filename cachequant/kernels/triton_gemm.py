"""Pass 2 of the default kernel pair: the 8-bit GEMM / implicit-GEMM convolution with the fused epilogue.

Both operands are 8-bit codes streamed from memory (activation codes from :mod:`triton_quantize`,
packed weights from :mod:`pack`), so Triton stages them through shared memory for the pipelined
tensor-core loop. Conv2d is an implicit GEMM over NHWC codes: row m = (image, oh, ow), reduction
k = (kh, kw, c); padding taps load the activation's zero code, which stands for x = 0 exactly.

Epilogue (per output tile, once): integer zero-point corrections, dequantization (activation scale
× per-output-channel weight scale), bias, and the quantization-DEC correction of the cached input
slice ``O = a_t ⊙ O_cached + O_rest + bias + b_t`` (method-notes Eq. 9). With shifted codes
``w' = w_q − 128``, ``q' = x_q − 128`` and zero points ``zw'``, ``z'``, over one input part::

    Σ_k (w'_k − zw')(q'_k − z') = Σ w'q'  −  zw'·Σ_k q'  −  z'·Σ_k w'  +  K·zw'·z'

all exact in int32. The row sums Σ_k q' come from the tensor cores too: one extra small MMA of the
activation tile with a tile of ones, instead of a reduction on the CUDA cores inside the main loop.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .tiles import lookup
from .triton_common import dec_scale, int8_total, part_range, store_output, tap_rows, tile_setup


@triton.jit
def unpack_w4(w_ptr, offs_n, mask_n, ktot, kb0, BK: tl.constexpr):
    """A (BK, BN) int8 tile of 4-bit weight codes stored two per byte along K (even k in the low
    nibble): BK/2 bytes per column are read, half the traffic of 8-bit codes."""
    kb = kb0 + tl.arange(0, BK // 2)
    b = tl.load(w_ptr + offs_n[None, :] * (ktot // 2) + kb[:, None], mask=mask_n[None, :], other=0)
    lo = (b & 15).to(tl.int8)
    hi = (b >> 4).to(tl.int8)
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BK, lo.shape[1]))


@triton.jit(do_not_specialize=["M", "SPLIT", "T", "H", "W", "OH", "OW", "STRIDE", "PAD", "DIL"])
def _gemm_kernel(
    q_ptr, w_ptr, y_ptr,
    step_ptr, act_s_ptr, act_z_ptr,
    w_s_ptr, w_z_ptr, w_sum_ptr,
    bias_ptr, dec_a_ptr, dec_b_ptr,
    M, N, C, SPLIT, T,
    H, W, OH, OW, STRIDE, PAD, DIL,
    KH: tl.constexpr, KW: tl.constexpr,
    IS_FP8: tl.constexpr, HAS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DEC: tl.constexpr,
    EVEN_K: tl.constexpr, W4: tl.constexpr,
    SPLIT_K: tl.constexpr, TAP_SPLIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n, nb, oh, ow, step, w_s, w_z = tile_setup(
        M, N, OH, OW, step_ptr, w_s_ptr, w_z_ptr, IS_FP8, BM, BN, GROUP_M)
    ktot = KH * KW * C
    if not IS_FP8:
        ones = tl.full((BK, 16), 1, dtype=tl.int8)
    out = tl.zeros((BM, BN), dtype=tl.float32)
    # Split-K: program (tile, kp) reduces every SPLIT_K-th filter tap (convs) or K block (GEMMs)
    # and adds its raw per-part sums into a workspace (int32 for INT8: exact, so the result does not
    # depend on the split); :func:`_split_k_epilogue` then does what the epilogue below does. With
    # SPLIT_K = 1 the loops below are the plain ones.
    if SPLIT_K > 1:
        kp = tl.program_id(1)
    else:
        kp = 0
    if TAP_SPLIT:
        r_lo = kp
        c_off = 0
        r_step = SPLIT_K
        c_step = BK
    else:
        r_lo = 0
        c_off = kp * BK
        r_step = 1
        c_step = BK * SPLIT_K

    for h in tl.static_range(2 if HAS_SPLIT else 1):
        c_lo, c_hi = part_range(h, SPLIT, C, HAS_SPLIT)
        s = tl.load(act_s_ptr + h * T + step)
        if IS_FP8:
            acc_f = tl.zeros((BM, BN), dtype=tl.float32)
            pad_code = tl.zeros((), dtype=tl.uint8)
        else:
            zf = tl.load(act_z_ptr + h * T + step)  # z' = z − 128 (integer-valued float)
            pad_code = zf.to(tl.int8)
            acc = tl.zeros((BM, BN), dtype=tl.int32)
            rs_acc = tl.zeros((BM, 16), dtype=tl.int32)
        for r in range(r_lo, KH * KW, r_step):
            valid, row = tap_rows(r, KW, nb, oh, ow, mask_m, H, W, C, STRIDE, PAD, DIL)
            for c0 in range(c_lo + c_off, c_hi, c_step):
                offs_k = c0 + tl.arange(0, BK)
                if EVEN_K:
                    a = tl.load(q_ptr + row[:, None] + offs_k[None, :], mask=valid[:, None], other=pad_code)
                    if W4:
                        wt = unpack_w4(w_ptr, offs_n, mask_n, ktot, (r * C + c0) // 2, BK)
                    else:
                        wt = tl.load(w_ptr + offs_n[None, :] * ktot + (r * C + offs_k)[:, None],
                                     mask=mask_n[None, :], other=0)
                else:
                    mask_k = offs_k < c_hi
                    a = tl.load(q_ptr + row[:, None] + offs_k[None, :], mask=valid[:, None] & mask_k[None, :],
                                other=0)
                    # padding taps stand for x = 0 (the zero code); channels past the end count nothing
                    a = tl.where(mask_k[None, :] & (~valid)[:, None], pad_code, a)
                    wt = tl.load(w_ptr + offs_n[None, :] * ktot + (r * C + offs_k)[:, None],
                                 mask=mask_k[:, None] & mask_n[None, :], other=0)
                if IS_FP8:
                    acc_f = tl.dot(a.to(tl.float8e4nv, bitcast=True), wt.to(tl.float8e4nv, bitcast=True), acc_f)
                else:
                    acc = tl.dot(a, wt, acc, out_dtype=tl.int32)
                    rs_acc = tl.dot(a, ones, rs_acc, out_dtype=tl.int32)
        if not IS_FP8:
            rs = tl.sum(rs_acc, axis=1) // 16
            if SPLIT_K > 1:
                zf = zf * (kp == 0)  # the K-independent zero-point terms: once, in the first split only
            tot = int8_total(acc, rs, w_z, zf, w_sum_ptr, h, N, offs_n, mask_n, KH * KW * (c_hi - c_lo))
        if SPLIT_K > 1:
            ws = y_ptr + h * M * N + offs_m[:, None] * N + offs_n[None, :]
            wmask = mask_m[:, None] & mask_n[None, :]
            if IS_FP8:
                tl.atomic_add(ws, acc_f, mask=wmask)
            else:
                tl.atomic_add(ws, tot, mask=wmask)
        else:
            if IS_FP8:
                part = acc_f * (s * w_s)[None, :]
            else:
                part = tot.to(tl.float32) * (s * w_s)[None, :]
            if HAS_DEC and h == 0:
                part = dec_scale(part, dec_a_ptr, step, N, offs_n, mask_n)
            out += part

    if SPLIT_K == 1:
        store_output(out, y_ptr, bias_ptr, dec_b_ptr, step, offs_m, offs_n, M, N, HAS_BIAS, HAS_DEC)


@triton.jit(do_not_specialize=["M", "T"])
def _split_k_epilogue(ws_ptr, y_ptr, step_ptr, act_s_ptr, w_s_ptr, bias_ptr, dec_a_ptr, dec_b_ptr, M, N, T,
                      HAS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DEC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
    """The split-K GEMM's epilogue over its summed workspace: the same float operations, in the same
    order, as the unsplit kernel's, so the INT8 result is bit-identical to it."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    step = tl.load(step_ptr)
    w_s = tl.load(w_s_ptr + offs_n, mask=mask_n, other=0.0)
    out = tl.zeros((BM, BN), dtype=tl.float32)
    for h in tl.static_range(2 if HAS_SPLIT else 1):
        s = tl.load(act_s_ptr + h * T + step)
        part = tl.load(ws_ptr + h * M * N + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0)
        part = part.to(tl.float32) * (s * w_s)[None, :]
        if HAS_DEC and h == 0:
            part = dec_scale(part, dec_a_ptr, step, N, offs_n, mask_n)
        out += part
    store_output(out, y_ptr, bias_ptr, dec_b_ptr, step, offs_m, offs_n, M, N, HAS_BIAS, HAS_DEC)


def k_block(C: int, split: int) -> tuple[int, bool]:
    """(BK, EVEN_K): the largest of 128 / 64 / 32 dividing every input part, so the common case runs
    without K masks; else a masked BK."""
    parts = [C] if not split else [split, C - split]
    for cand in (128, 64, 32):
        if all(p % cand == 0 for p in parts):
            return cand, True
    return max(32, min(64, triton.next_power_of_2(max(parts)))), False


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # the interpreter: an H100/H200's count, so the CPU tests take the GPU's decisions


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_k(M: int, N: int, C: int, taps: int, cfg: dict, sms: int, forced: int | None = None) -> tuple[int, bool]:
    """(SPLIT_K, TAP_SPLIT). Batch-1 shapes deep in a UNet (M = 128–512 rows, K up to 1280·9) give
    only 10–40 output tiles for 132 SMs; splitting the reduction fills the GPU. A conv splits over
    its filter taps; the automatic choice leaves GEMMs whole. The kernel can split a GEMM over K
    blocks (at least 2 per split), but on an H200 that lost: SD's cross-attention k/v projection
    (154×1280×768, split 3) ran at 6 graph-replayed TOPS split against 18 unsplit (INT8; FP8 15
    against 29), while tap splits won on the deep convs (1280 ch at 8², batch 2: INT8 61 against
    27, FP8 139 against 47). ``forced=n`` takes n for convs and GEMMs alike (capped by what the
    shape allows), for tests and measurements."""
    tiles = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"])
    limit = taps if taps > 1 else max(1, triton.cdiv(C, cfg["BK"]) // 2)
    if forced is not None:
        want = int(forced)
    elif 2 * tiles > sms or taps == 1:
        want = 1
    else:
        want = triton.cdiv(sms, tiles)
    k = max(1, min(want, limit, 16))
    return k, k > 1 and taps > 1


def block_config(M: int, N: int, C: int, split: int) -> dict:
    """Tile sizes by shape (no autotuning: a compile per shape × config would cost minutes at
    start-up on SD's ~40 distinct shapes); BK from :func:`k_block`."""
    bk, even = k_block(C, split)
    bm = 128 if M > 64 else max(16, triton.next_power_of_2(M))
    bn = 128 if N >= 128 else max(32, triton.next_power_of_2(N))
    warps = 8 if bm * bn >= 128 * 128 else 4
    return {"BM": bm, "BN": bn, "BK": bk, "EVEN_K": even, "GROUP_M": 8, "num_warps": warps, "num_stages": 4}


# benchmarks/tune_tiles.py sets this to a recorder (anything with ``append``): every gemm() call
# then appends its arguments
RECORD = None


def tuned_config(C: int, split: int, taps: int, w4: bool, entry: dict) -> tuple[dict, int, bool] | None:
    """(cfg, SPLIT_K, TAP_SPLIT) from a tile-table entry, or None when the entry cannot serve this
    layer (4-bit weights need a BK that divides every input part)."""
    bk = entry["BK"]
    parts = [C] if not split else [split, C - split]
    even = all(p % bk == 0 for p in parts)
    if w4 and not even:
        return None
    cfg = {"BM": entry["BM"], "BN": entry["BN"], "BK": bk, "EVEN_K": even, "GROUP_M": 8,
           "num_warps": entry["num_warps"], "num_stages": entry["num_stages"]}
    limit = taps if taps > 1 else max(1, triton.cdiv(C, bk) // 2)
    sk = max(1, min(entry["split_k"], limit, 16))
    return cfg, sk, sk > 1 and taps > 1


def gemm(q, w, y, step_t, act_s, act_z, w_s, w_z, w_sum, bias, dec_a, dec_b,
         M: int, N: int, C: int, split: int, T: int, geom: tuple, kh: int, kw: int, fp8: bool,
         w4: bool = False, tiles: dict | None = None, table: str | None = None,
         split_k_forced: int | None = None) -> None:
    """``tiles``: a tile-table entry to use instead of the table / the rule (the tuner's way of
    trying a config); ``table``: the tile table setting (:func:`tiles.table_path`);
    ``split_k_forced``: a reduction split for every shape (see :func:`split_k`)."""
    H, W, OH, OW, stride, pad, dil = geom
    if RECORD is not None:
        RECORD.append((q, w, y, step_t, act_s, act_z, w_s, w_z, w_sum, bias, dec_a, dec_b,
                       M, N, C, split, T, geom, kh, kw, fp8, w4))
    kind = "fp8" if fp8 else "int8"
    entry = tiles if tiles is not None else lookup(y.device, kind, M, N, C, split, kh * kw, w4, table)
    tuned = None if entry is None else tuned_config(C, split, kh * kw, w4, entry)
    if tuned is not None:
        cfg, sk, tap_split = tuned
    else:
        cfg = block_config(M, N, C, split)
    if w4 and (fp8 or not cfg["EVEN_K"]):
        raise ValueError("4-bit packed weights need the INT8 kernel and input parts divisible by 32 "
                         "(pack.pack_layer only packs such layers)")
    if tuned is None or split_k_forced is not None:
        sk, tap_split = split_k(M, N, C, kh * kw, cfg, num_sms(y.device), split_k_forced)
    out = y
    if sk > 1:  # per-part raw sums, added up by the splits: int32 (exact) for INT8, fp32 for FP8
        out = torch.zeros((2 if split else 1, M, N), device=y.device, dtype=torch.float32 if fp8 else torch.int32)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]), sk)
    dummy = w_s
    _gemm_kernel[grid](
        q, w, out, step_t, act_s, act_z, w_s, w_z if w_z is not None else dummy,
        w_sum if w_sum is not None else dummy,
        bias if bias is not None else dummy, dec_a if dec_a is not None else dummy,
        dec_b if dec_b is not None else dummy,
        M, N, C, split, T, H, W, OH, OW, stride, pad, dil,
        KH=kh, KW=kw, IS_FP8=fp8, HAS_SPLIT=split > 0, HAS_BIAS=bias is not None, HAS_DEC=dec_a is not None,
        W4=w4, SPLIT_K=sk, TAP_SPLIT=tap_split, **cfg,
    )
    if sk > 1:
        _split_k_epilogue[(triton.cdiv(M, 64), triton.cdiv(N, 64))](
            out, y, step_t, act_s, w_s, bias if bias is not None else dummy, dec_a if dec_a is not None else dummy,
            dec_b if dec_b is not None else dummy, M, N, T,
            HAS_SPLIT=split > 0, HAS_BIAS=bias is not None, HAS_DEC=dec_a is not None, BM=64, BN=64)
