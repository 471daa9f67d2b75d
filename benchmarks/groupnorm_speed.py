"""GroupNorm on the kernel path's channels-last activations, per SD 1.5 shape:

- ``torch NCHW``: PyTorch's GroupNorm on an NCHW input (what fp16 without kernels runs);
- ``torch NHWC + copies``: PyTorch's GroupNorm on the NHWC input the 8-bit convs produce. On CUDA
  it copies the input to NCHW and returns NCHW, which the next 8-bit conv copies back to NHWC;
  this row times all of that (what the kernel path ran before ``triton_groupnorm``);
- ``cachequant NHWC``: :func:`cachequant.kernels.triton_groupnorm.group_norm_nhwc`.

Also the largest difference of each path's output from the NCHW one. Prints a table, writes JSON.

    python benchmarks/groupnorm_speed.py [--batch 2] [--dtype fp16] [--out FILE.json]   # on a GPU
    TRITON_INTERPRET=1 python benchmarks/groupnorm_speed.py --tiny                      # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (channels, height = width) of SD 1.5's GroupNorms at 512² (latent 64²), 32 groups each
SD15_SHAPES = [(320, 64), (640, 64), (960, 64), (640, 32), (1920, 32), (1280, 16), (2560, 16), (1280, 8), (2560, 8)]
TINY_SHAPES = [(32, 8), (64, 4)]


def _time(fn, repeats: int, cuda: bool) -> float:
    """Seconds per call of ``fn()``. On a GPU: graph-replayed (``harness.timing.graph_ms``), as the
    graph-captured UNet steps run it (eager timing would measure Python's launch overhead instead
    of the kernels); the median of ``repeats`` perf_counter timings on the CPU."""
    if cuda:
        from harness.timing import graph_ms

        return graph_ms(fn, repeats) / 1e3
    fn()  # warm-up (Triton compiles here)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return sorted(out)[len(out) // 2]


def run(batch: int, dtype_name: str, tiny: bool, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from cachequant.kernels.triton_groupnorm import group_norm_nhwc

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if not cuda:
        dtype = torch.float32  # the interpreter's smoke test
    groups = 8 if tiny else 32
    rows = []
    g = torch.Generator().manual_seed(0)
    for c, hw in (TINY_SHAPES if tiny else SD15_SHAPES):
        x = torch.randn(batch, c, hw, hw, generator=g).to(dev, dtype)
        w = (1 + 0.1 * torch.randn(c, generator=g)).to(dev, dtype)
        b = (0.1 * torch.randn(c, generator=g)).to(dev, dtype)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        ref = F.group_norm(x, groups, w, b, 1e-5)
        old = lambda: F.group_norm(x_cl, groups, w, b, 1e-5).contiguous(memory_format=torch.channels_last)  # noqa: E731
        new = lambda: group_norm_nhwc(x_cl, groups, w, b, 1e-5)  # noqa: E731
        row = {"shape": [batch, c, hw, hw], "groups": groups,
               "torch_nchw_s": _time(lambda: F.group_norm(x, groups, w, b, 1e-5), repeats, cuda),
               "torch_nhwc_copies_s": _time(old, repeats, cuda),
               "cachequant_nhwc_s": _time(new, repeats, cuda),
               "max_abs_diff_vs_nchw": float((new().float() - ref.float()).abs().max()),
               "out_channels_last": bool(new().is_contiguous(memory_format=torch.channels_last))}
        # bytes the NHWC kernel moves: the stats pass reads x twice, the apply pass reads and writes it
        row["cachequant_gb_per_s"] = 4 * x.numel() * x.element_size() / row["cachequant_nhwc_s"] / 1e9
        rows.append(row)
    env = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
           "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
           "timing": "cuda-graph" if cuda else "perf_counter", "command": "python " + " ".join(sys.argv)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return {"environment": env, "rows": rows}


def render(result: dict) -> str:
    e = result["environment"]
    lines = [f"GroupNorm on {e['device']} ({e['dtype']}, torch {e['torch']}, triton {e.get('triton')}), µs per call"
             + (" in a CUDA graph" if e.get("timing") == "cuda-graph" else ""),
             f"{'shape':>22} {'torch NCHW':>11} {'torch NHWC+copies':>18} {'cachequant NHWC':>16} {'GB/s':>7} {'max diff':>9}"]
    for r in result["rows"]:
        lines.append(f"{str(tuple(r['shape'])):>22} {r['torch_nchw_s'] * 1e6:11.1f} {r['torch_nhwc_copies_s'] * 1e6:18.1f} "
                     f"{r['cachequant_nhwc_s'] * 1e6:16.1f} {r['cachequant_gb_per_s']:7.0f} {r['max_abs_diff_vs_nchw']:9.2e}")
    tot = {k: sum(r[k] for r in result["rows"]) * 1e6 for k in ("torch_nchw_s", "torch_nhwc_copies_s", "cachequant_nhwc_s")}
    lines.append(f"{'sum':>22} {tot['torch_nchw_s']:11.1f} {tot['torch_nhwc_copies_s']:18.1f} {tot['cachequant_nhwc_s']:16.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="images per UNet call (2 = one image with CFG)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="small shapes, for a CPU smoke test")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be ≥ 1")
    result = run(args.batch, args.dtype, args.tiny, args.repeats)
    print(render(result))
    if args.out:
        from cachequant.utils.io import atomic_path

        with atomic_path(Path(args.out)) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
