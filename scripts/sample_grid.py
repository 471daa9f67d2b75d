"""A grid of samples from a shipped model, as in the model cards (``cachequant/zoo/samples-*.png``).

    python scripts/sample_grid.py --model cifar10-mmdit --steps 28 --out cachequant/zoo/samples-cifar10-mmdit.png

Class-conditional models: one class per column (airplane … truck), ``--rows`` samples each; an
unconditional model: ``--rows`` × 10 samples. One generator seeded with ``--seed`` draws the whole
batch's noise; the grid is upscaled 2× (nearest) for viewing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import cachequant as cq  # noqa: E402
from cachequant.cli.common import add_weights_option  # noqa: E402
from cachequant.pipecall import call_pipeline, conditioning  # noqa: E402
from cachequant.utils.io import atomic_path  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=cq.zoo.available(), required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--scheduler", default=None, help="a sampler the model was trained for (default: its first)")
    add_weights_option(ap)
    ap.add_argument("--guidance-scale", type=float, default=1.5, help="class-conditional models")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    pipe = cq.zoo.load_pipeline(args.model, scheduler=args.scheduler, weights=args.weights)
    n = args.rows * 10
    kw = {"generator": torch.Generator().manual_seed(args.seed), "num_inference_steps": args.steps}
    if conditioning(pipe) == "class":
        batch, kw["guidance_scale"] = [i % 10 for i in range(n)], args.guidance_scale
    else:
        batch = [None] * n
    images = np.asarray(call_pipeline(pipe, batch, output_type="np", **kw).images)
    side = images.shape[1]
    grid = (images * 255).round().astype(np.uint8).reshape(args.rows, 10, side, side, 3)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(args.rows * side, 10 * side, 3)
    out = Path(args.out)
    with atomic_path(out) as tmp:
        Image.fromarray(grid).resize((20 * side, 2 * args.rows * side), Image.NEAREST).save(tmp, format="PNG")
    print(f"{n} samples written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
