"""Fake-quant reference path on the GPU: the six torch ops against the one-pass Triton kernel.

    python benchmarks/fake_quant_speed.py --device cuda [--out fq.json]

Shapes are the CIFAR-10 DiT's quantized activations at the ablation's batch (2,500 images, CFG
doubles it, 256 tokens): the block inputs (240 channels), the MLP hidden layer (960) and the
attention probabilities (4 heads × 256 × 256). Prints milliseconds per call and effective GB/s
(one read + one write of the tensor), checks that both give the same bits, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"block input (5000·256, 240)": (5000 * 256, 240),
          "MLP hidden (5000·256, 960)": (5000 * 256, 960),
          "attention probs (5000·4, 256, 256)": (5000 * 4, 256, 256)}


def _ms(fn, reps: int, device: str) -> float:
    """Median milliseconds per call: Triton's do_bench on a GPU (L2 flushed), a plain timer on the CPU."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=max(1, reps // 4), rep=reps))
    import statistics
    import time

    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--scale-down", type=int, default=1, help="divide the first dimension (CPU smoke tests)")
    p.add_argument("--reps", type=int, default=100, help="milliseconds of timing per measurement (do_bench rep)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    from cachequant.kernels.triton_fakequant import fake_quant_fused
    from cachequant.quant.quantizer import fake_quant

    rows = []
    s = torch.tensor(0.031, device=a.device)
    z = torch.tensor(117.0, device=a.device)
    for name, shape in SHAPES.items():
        shape = (max(1, shape[0] // a.scale_down),) + shape[1:]
        x = torch.randn(shape, device=a.device)
        ref, fused = fake_quant(x, s, z, 8), fake_quant_fused(x, s, z, 8)
        same = torch.equal(ref, fused)
        differ = int((ref != fused).sum())  # where not: how many elements, by how many quantization steps
        max_steps = float(((ref - fused).abs().max() / s).round()) if differ else 0.0
        del ref, fused
        t_torch = _ms(lambda: fake_quant(x, s, z, 8), a.reps, a.device)
        t_fused = _ms(lambda: fake_quant_fused(x, s, z, 8), a.reps, a.device)
        gb = 2 * x.numel() * 4 / 1e9
        rows.append({"tensor": name, "elements": x.numel(), "torch_ops_ms": t_torch, "fused_ms": t_fused,
                     "fused_GBps": gb / (t_fused / 1e3), "speedup": t_torch / t_fused, "bit_identical": same,
                     "differing_elements": differ, "max_difference_steps": max_steps})
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"fake quantization, fp32, 8-bit, {dev}, torch {torch.__version__}")
    print("| tensor | elements | torch ops (ms) | one pass (ms) | one pass GB/s | × | same bits | differing | max diff (steps) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tensor']} | {r['elements']:,} | {r['torch_ops_ms']:.2f} | {r['fused_ms']:.2f} | "
              f"{r['fused_GBps']:.0f} | {r['speedup']:.1f} | {r['bit_identical']} | {r['differing_elements']:,} | "
              f"{r['max_difference_steps']:.0f} |")
    if a.out:
        import triton

        from cachequant.utils.io import atomic_path

        with atomic_path(a.out) as tmp:
            Path(tmp).write_text(json.dumps({"device": dev, "torch": torch.__version__, "triton": triton.__version__,
                                             "command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0 if all(r["bit_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
