"""How the quantized layers execute: one dataclass that ``cq.accelerate`` takes.

Environment variables only supply defaults for fields left at None (for runs where code cannot
be changed, e.g. a benchmark matrix): ``CACHEQUANT_FP8_GEMM``, ``CACHEQUANT_FAKE_QUANT_KERNEL``,
``CACHEQUANT_TILES``, ``CACHEQUANT_SPLIT_K``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

BACKENDS = ("auto", "fake", "int8", "fp8", "fp8-emulated")
"""``fake``: the float reference (any device); ``int8`` / ``fp8``: Triton kernels (and cuBLASLt for
FP8 GEMMs on Hopper) on a CUDA GPU (``fp8`` from compute capability 8.9); ``auto``: ``fp8`` on a GPU
of capability ≥ 8.9, ``int8`` from 8.0, each layer tuned (see ``tune``), else ``fake``;
``fp8-emulated``: the ``fp8`` backend's arithmetic (e4m3 codes and scales) in float ops on any
device, to measure the quality FP8 gives without a GPU that runs it."""
ATTENTION = ("sdpa", "8bit")
"""With a kernel backend: fused float SDPA for the attention matmuls (fast), or the plan's 8-bit
attention matmuls (what the reference computes)."""
FP8_GEMMS = ("triton", "cublaslt")
ALGOS = ("two-pass", "fused")


@dataclass(frozen=True)
class KernelOptions:
    backend: str = "auto"
    attention: str = "sdpa"
    keep_float_weights: bool = True
    """False (kernel backends): free the float weights of the layers the kernels run, so that the
    model holds 8-bit weights only; the pipeline can then not be restored or saved."""
    fp8_gemm: str | None = None
    """FP8 GEMM-shaped layers (Linear, 1×1 conv; one input part, no DEC): ``cublaslt``
    (``torch._scaled_mm``) or ``triton``. None: ``CACHEQUANT_FP8_GEMM``, else cuBLASLt on Hopper or
    newer (compute capability ≥ 9.0) and Triton elsewhere."""
    algo: str = "two-pass"
    """``two-pass``: a quantize pass, then the 8-bit GEMM on codes; ``fused``: quantization in the
    GEMM prologue (kept for comparison, slower on Hopper)."""
    share_quantize: bool = True
    """Kernel backends, eager and CUDA-graph calls: sibling layers that read the same tensor with the
    same activation range (an attention's q, k and v projections) share one quantize pass; their
    outputs are unchanged (:mod:`cachequant.backends.groups`)."""
    channels_last: bool = True
    """Run the model NHWC so that the implicit-GEMM convolutions read and write without copies."""
    nhwc_group_norm: bool = True
    """With channels_last: GroupNorm through cachequant's NHWC Triton kernel (PyTorch's CUDA
    GroupNorm copies an NHWC input to NCHW and back)."""
    fused_fake_quant: bool | None = None
    """Reference path, fp32 CUDA activations: quantize-dequantize in one Triton pass (bit-identical
    to the torch ops). None: ``CACHEQUANT_FAKE_QUANT_KERNEL`` (0 / 1), default on."""
    tiles: str | None = None
    """8-bit GEMM tile table: a file from ``benchmarks/tune_tiles.py``, ``off`` (the shape rule), or
    None: ``CACHEQUANT_TILES``, else the GPU model's committed table if there is one."""
    split_k: int | None = None
    """Force this reduction split for every 8-bit GEMM (tests, measurements). None:
    ``CACHEQUANT_SPLIT_K`` if set to a number, else chosen per shape."""
    tune: bool | None = None
    """Kernel backends: the first time a layer runs on an input shape, time its 8-bit kernel and its
    own float op on this GPU and keep the faster (decisions cached per GPU model in
    ``~/.cache/cachequant``, or ``$CACHEQUANT_CACHE_DIR``); ``cq.kernel_report`` lists the layers
    left in float with both timings. None: on for ``backend='auto'``, off for a named backend."""

    def __post_init__(self) -> None:
        for name, allowed in (("backend", BACKENDS), ("attention", ATTENTION), ("algo", ALGOS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.fp8_gemm is not None and self.fp8_gemm not in FP8_GEMMS:
            raise ValueError(f"fp8_gemm must be one of {', '.join(FP8_GEMMS)} (or None); got {self.fp8_gemm!r}")
        for name in ("keep_float_weights", "share_quantize", "channels_last", "nhwc_group_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.tune is not None and not isinstance(self.tune, bool):
            raise ValueError(f"tune must be True, False or None, got {self.tune!r}")
        if self.tune and self.backend == "fake":
            raise ValueError("tune=True compares each layer's 8-bit kernel with its float op; backend='fake' has "
                             "no kernel: use backend='auto', 'int8' or 'fp8'")
        if self.tune and not self.keep_float_weights:
            raise ValueError("tune=True may keep a layer in float, which needs its float weights: "
                             "drop keep_float_weights=False or tune=True")
        if self.split_k is not None and (isinstance(self.split_k, bool) or not isinstance(self.split_k, int)
                                         or self.split_k < 1):
            raise ValueError(f"split_k must be a positive integer (or None), got {self.split_k!r}")

    def resolved(self) -> "KernelOptions":
        """The options with every None filled from the environment (checked here, once)."""
        env = os.environ
        fp8 = self.fp8_gemm if self.fp8_gemm is not None else env.get("CACHEQUANT_FP8_GEMM") or None
        if fp8 is not None and fp8 not in FP8_GEMMS:
            raise ValueError(f"CACHEQUANT_FP8_GEMM must be one of {', '.join(FP8_GEMMS)}; got {fp8!r}")
        fq = self.fused_fake_quant
        if fq is None:
            flag = env.get("CACHEQUANT_FAKE_QUANT_KERNEL", "1")
            if flag not in ("0", "1"):
                raise ValueError(f"CACHEQUANT_FAKE_QUANT_KERNEL must be 0 or 1, got {flag!r}")
            fq = flag == "1"
        tiles = self.tiles if self.tiles is not None else env.get("CACHEQUANT_TILES") or None
        sk = self.split_k
        if sk is None:
            forced = env.get("CACHEQUANT_SPLIT_K", "auto")
            if forced != "auto":
                if not forced.isdigit() or int(forced) < 1:
                    raise ValueError(f"CACHEQUANT_SPLIT_K must be 'auto' or a positive integer, got {forced!r}")
                sk = int(forced)
        return replace(self, fp8_gemm=fp8, fused_fake_quant=fq, tiles=tiles, split_k=sk)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
