"""Which calibration batches the old strided range-search subsample aliased on.

Before the fix, :func:`cachequant.quant.quantizer.activation_range` measured each candidate's
error on ``flat[:: numel // 16384 + 1]``. For an activation whose innermost axis is the channel
axis (the Linear layers of a transformer, (B, tokens, C)), that stride visits only
``C / gcd(stride, C)`` channels. This prints, for the shipped DiT's Linear inputs and each number
of entries in a calibration batch (doubled by classifier-free guidance), how many channels were
seen. Analytic: no model is run.

    python benchmarks/range_aliasing.py --entries 1-64
"""

from __future__ import annotations

import argparse
import json
from math import gcd

MAX_ELEMS = 1 << 14
DIT_TOKENS = 256  # cifar10-dit: 32×32 image, patch 2
DIT_LINEAR_INPUTS = {"attn q/k/v, attn out, mlp in": 240, "mlp out": 960}


def channels_seen(rows: int, channels: int) -> int:
    numel = rows * channels
    if numel <= MAX_ELEMS:
        return channels
    stride = numel // MAX_ELEMS + 1
    return channels // gcd(stride, channels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", default="1-64", help="range of calibration entries per batch, e.g. 1-64")
    parser.add_argument("--cfg", type=int, default=2, help="batch multiplier of classifier-free guidance")
    args = parser.parse_args()
    lo, hi = (int(v) for v in args.entries.split("-"))
    rows = []
    for entries in range(lo, hi + 1):
        row = {"entries": entries}
        for name, channels in DIT_LINEAR_INPUTS.items():
            row[name] = f"{channels_seen(entries * args.cfg * DIT_TOKENS, channels)}/{channels}"
        rows.append(row)
    print(json.dumps(rows, indent=None).replace("}, ", "},\n "))


if __name__ == "__main__":
    main()
