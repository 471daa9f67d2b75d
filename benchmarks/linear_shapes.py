"""Why a Linear layer stays in fp16 under ``backend="auto"``: its fp16 GEMM against the FP8 path's
two parts, the activation-quantize pass and the cuBLASLt FP8 GEMM, at real model shapes.

    python benchmarks/linear_shapes.py --shapes sd3 flux --out results/speed/h100-linear-shapes.json

Each candidate is timed as ``backend="auto"`` times it (``cachequant.backends.autotune.graph_time_us``:
20 calls captured in one CUDA graph, median of 3 replays). ``kernel`` = quantize + GEMM, what an
eager layer runs and what ``auto`` compares with ``fp16``; ``gemm`` alone is what a compiled model
pays where the quantize fuses into the op that produces the input. A "one quantize" row times the
three q, k, v projections reading one input with a single quantize pass
(``KernelOptions.share_quantize``) against three fp16 layers. ``auto`` keeps the layer in fp16
when ``fp16 <= kernel`` (eager) or ``fp16 <= gemm`` (compiled).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # SD3-medium transformer, 1024² (64×64 patches = 4,096 image tokens, 333 text tokens), CFG batch 2;
    # hidden 1536
    "sd3": [("image attn q/k/v/out", 8192, 1536, 1536), ("image q,k,v one quantize", 8192, 1536, 1536, 3),
            ("image q+k+v fused", 8192, 1536, 4608),
            ("image ff in", 8192, 1536, 6144),
            ("image ff out", 8192, 6144, 1536), ("context attn q/k/v/out", 666, 1536, 1536),
            ("context ff in", 666, 1536, 6144)],
    # Flux.1-dev transformer, 1024², batch 1 (guidance distilled); hidden 3072; single blocks see
    # the 512 text tokens too
    "flux": [("double attn q/k/v/out", 4096, 3072, 3072), ("double q,k,v one quantize", 4096, 3072, 3072, 3),
             ("double q+k+v fused", 4096, 3072, 9216),
             ("double ff in", 4096, 3072, 12288),
             ("double ff out", 4096, 12288, 3072), ("single proj_mlp", 4608, 3072, 12288),
             ("single proj_out", 4608, 15360, 3072)],
}


def measure(name: str, m: int, k: int, n: int, layers: int = 1) -> dict:
    """One layer, or ``layers`` layers of the same shape reading one input: one quantize pass for
    all of them (``KernelOptions.share_quantize``), against as many fp16 layers."""
    import torch
    import torch.nn.functional as F

    from cachequant.backends.autotune import graph_time_us
    from cachequant.backends.ops import cublaslt_fp8
    from cachequant.kernels.triton_quantize import quantize

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=g, dtype=torch.float16)
    ws = [torch.randn(n, k, device=dev, generator=g, dtype=torch.float16) / k ** 0.5 for _ in range(layers)]
    b = torch.randn(n, device=dev, generator=g, dtype=torch.float16)
    w8s = [(w / (w.abs().amax() / 448)).to(torch.float8_e4m3fn).view(torch.uint8) for w in ws]
    w_s = torch.full((n,), float(ws[0].abs().amax() / 448), device=dev)
    act_s = torch.full((1, 1), float(x.abs().amax() / 448), device=dev)
    act_z = torch.zeros(1, 1, device=dev)
    step = torch.zeros(1, dtype=torch.long, device=dev)
    q = torch.empty(m, k, device=dev, dtype=torch.uint8)
    y = torch.empty(m, n, device=dev, dtype=torch.float16)

    def quant():
        quantize(x, q, step, act_s, act_z, 0, 1, True)

    def gemm():
        for w8 in w8s:
            cublaslt_fp8(q.view(torch.float8_e4m3fn), w8, act_s[0].index_select(0, step), w_s, b, y)

    def fp16():
        for w in ws:
            F.linear(x, w, b)

    def kernel():
        quant()
        gemm()

    t = {"fp16": graph_time_us(fp16), "quantize": graph_time_us(quant),
         "gemm": graph_time_us(gemm), "kernel": graph_time_us(kernel)}
    row = {"layer": name, "M": m, "K": k, "N": n, "layers": layers, **{f"{key}_us": round(v, 2) for key, v in t.items()},
           "gemm_speedup": round(t["fp16"] / t["gemm"], 3), "kernel_speedup": round(t["fp16"] / t["kernel"], 3),
           "quantize_share_of_kernel": round(t["quantize"] / t["kernel"], 3),
           "fp16_tflops": round(2 * m * k * n * layers / t["fp16"] / 1e6, 1),
           "fp8_tflops": round(2 * m * k * n * layers / t["gemm"] / 1e6, 1),
           "auto_eager": "fp8" if t["kernel"] < t["fp16"] else "fp16",
           "auto_compiled": "fp8" if t["gemm"] < t["fp16"] else "fp16"}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU with FP8 (Ada or Hopper)")
    from harness.env import environment

    rows = []
    print(f"{'model':6} {'layer':24} {'M×K×N':>18} {'fp16 µs':>8} {'quant µs':>8} {'gemm µs':>8} "
          f"{'kernel µs':>9} "
          f"{'gemm ×':>6} {'kernel ×':>8}  auto eager/compiled", flush=True)
    for model in a.shapes:
        for name, m, k, n, *layers in SHAPES[model]:
            r = {"model": model, **measure(name, m, k, n, *layers)}
            rows.append(r)
            print(f"{model:6} {name:24} {f'{m}×{k}×{n}':>18} {r['fp16_us']:8.1f} {r['quantize_us']:8.1f} "
                  f"{r['gemm_us']:8.1f} {r['kernel_us']:9.1f} {r['gemm_speedup']:6.2f} {r['kernel_speedup']:8.2f}  "
                  f"{r['auto_eager']}/{r['auto_compiled']}", flush=True)
    if a.out:
        from harness.io import write_json

        write_json(Path(a.out), {"command": " ".join(sys.argv), "environment": environment("cuda"), "rows": rows},
                   indent=1, default=None)
        print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
