"""Times the metrics' CPU part at the ablation's size: the Fréchet distance of two sets of 2048-d
features (cachequant's eigendecomposition form against scipy's ``sqrtm``, the textbook one) and
SSIM of 10,000 CIFAR-sized images (batched filter). Synthetic data; the values are printed too, so
the two Fréchet computations can be compared.

    python benchmarks/metrics_speed.py [--n 10000] [--dim 2048]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="features / images per set")
    p.add_argument("--dim", type=int, default=2048)
    args = p.parse_args(argv)
    from cachequant.metrics import ssim
    from cachequant.metrics.fid import feature_stats, frechet_distance, frechet_distance_sqrtm

    rng = np.random.default_rng(0)
    mix = rng.standard_normal((args.dim, args.dim)) * 0.05
    f1 = rng.standard_normal((args.n, args.dim)) @ mix
    f2 = f1 + 0.3 * rng.standard_normal(f1.shape)
    (m1, s1), (m2, s2) = feature_stats(f1), feature_stats(f2)
    t = time.perf_counter()
    ours = frechet_distance(m1, s1, m2, s2)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = frechet_distance_sqrtm(m1, s1, m2, s2)
    t_ref = time.perf_counter() - t
    print(f"Fréchet distance, {args.dim}-d: cachequant {t_ours:.2f} s ({ours:.6f}), scipy sqrtm {t_ref:.2f} s ({ref:.6f})")
    a = rng.integers(0, 256, (args.n, 32, 32, 3)).astype(np.float64) / 255
    b = np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1)
    t = time.perf_counter()
    v = ssim(a, b)
    print(f"SSIM of {args.n} 32x32 images: {time.perf_counter() - t:.2f} s ({v:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
