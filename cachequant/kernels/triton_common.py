"""Triton building blocks shared by the kernels (inlined by the compiler): tile order, conv row
geometry, the 8-bit codes, the integer zero-point correction and the fused epilogue."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_offsets(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Row / column offsets of this program's output tile, in grouped order (neighbouring programs
    share weight tiles in L2)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)


@triton.jit
def tile_setup(M, N, OH, OW, step_ptr, w_s_ptr, w_z_ptr, IS_FP8: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, GROUP_M: tl.constexpr):
    """What every GEMM program starts with: its tile's rows / columns and their masks, the conv
    geometry of its rows, this call's step, and its columns' weight scales (and INT8 zero points;
    FP8 has none: ``w_z`` is then the scales again, unused)."""
    offs_m, offs_n = tile_offsets(M, N, BM, BN, GROUP_M)
    mask_m = offs_m < M
    mask_n = offs_n < N
    nb, oh, ow = conv_rows(offs_m, OH, OW)
    w_s = tl.load(w_s_ptr + offs_n, mask=mask_n, other=0.0)
    if IS_FP8:
        w_z = w_s
    else:
        w_z = tl.load(w_z_ptr + offs_n, mask=mask_n, other=0)
    return offs_m, offs_n, mask_m, mask_n, nb, oh, ow, tl.load(step_ptr), w_s, w_z


@triton.jit
def conv_rows(offs_m, OH, OW):
    """Output row m of an implicit-GEMM convolution → (image, oh, ow)."""
    ow = offs_m % OW
    t1 = offs_m // OW
    return t1 // OH, t1 % OH, ow


@triton.jit
def tap_rows(r, KW: tl.constexpr, nb, oh, ow, mask_m, H, W, C, STRIDE, PAD, DIL):
    """For filter tap r = kh·KW + kw: which output rows read inside the image, and the NHWC offset
    of the channel vector they read (a 1×1 "conv" over H = W = 1 is a plain GEMM row)."""
    ih = oh * STRIDE - PAD + (r // KW) * DIL
    iw = ow * STRIDE - PAD + (r % KW) * DIL
    valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return valid, ((nb * H + ih) * W + iw) * C


@triton.jit
def part_range(h: tl.constexpr, SPLIT, C, HAS_SPLIT: tl.constexpr):
    """Channels [lo, hi) of input part ``h``: a concatenated input (a skip connection next to the
    cached feature) has two parts with their own activation scales, split at channel ``SPLIT``."""
    lo = h * SPLIT
    hi = C
    if HAS_SPLIT and h == 0:
        hi = SPLIT
    return lo, hi


@triton.jit
def int8_code(x, s, z_shifted):
    """``round(x / s) + z`` clamped to [0, 255], minus 128, as float. The reference's order of
    operations: rounding ``x/s + z`` instead can flip half-way codes. ``z_shifted = z − 128``. The
    division is IEEE (``div_rn``): a plain ``/`` compiles to the GPU's approximate division, which
    flips the code of an input within an ulp or two of a rounding boundary (seen on an H100: one
    code in 864 with a scale one ulp from another calibration's)."""
    y = tl.minimum(tl.maximum(tl.div_rn(x, s), -512.0), 512.0)
    y = (y + 12582912.0) - 12582912.0  # 1.5·2^23: round half to even, as torch.round
    return tl.minimum(tl.maximum(y + (z_shifted + 128.0), 0.0), 255.0) - 128.0


@triton.jit
def fp8_code(x, s):
    """e4m3 code of ``x / s`` (saturating at ±448)."""
    return tl.minimum(tl.maximum(x / s, -448.0), 448.0).to(tl.float8e4nv)


@triton.jit
def int8_total(acc, rs, w_z, zf, w_sum_ptr, h, N, offs_n, mask_n, cnt):
    """Σ (w' − zw')(q' − z') = Σw'q' − zw'·Σq' − z'·Σw' + K·zw'·z', exact in int32."""
    zi = zf.to(tl.int32)
    wsum = tl.load(w_sum_ptr + h * N + offs_n, mask=mask_n, other=0)
    return acc - w_z[None, :] * rs[:, None] - zi * wsum[None, :] + (cnt * zi) * w_z[None, :]


@triton.jit
def int8_dequant(acc, rs, w_z, zf, w_sum_ptr, h, N, offs_n, mask_n, cnt, scale):
    """:func:`int8_total` times activation scale × weight scale (``scale``, per output channel)."""
    return int8_total(acc, rs, w_z, zf, w_sum_ptr, h, N, offs_n, mask_n, cnt).to(tl.float32) * scale[None, :]


@triton.jit
def dec_scale(part, dec_a_ptr, step, N, offs_n, mask_n):
    """Quantization DEC on the cached input part: ``a_t ⊙ O_cached``."""
    return part * tl.load(dec_a_ptr + step * N + offs_n, mask=mask_n, other=0.0)[None, :]


@triton.jit
def store_output(out, y_ptr, bias_ptr, dec_b_ptr, step, offs_m, offs_n, M, N,
                 HAS_BIAS: tl.constexpr, HAS_DEC: tl.constexpr):
    """Epilogue: + bias + DEC offset b_t, one store in the output dtype."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_DEC:
        out += tl.load(dec_b_ptr + step * N + offs_n, mask=mask_n, other=0.0)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


