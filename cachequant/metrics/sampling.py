"""Seeded, sharded sampling to uint8 ``.npz`` files.

Sample *i* always gets the same noise — its own generator seeded from (seed, i) — and, for
class-conditional pipelines, the label ``i mod num_classes``; so the images depend on the seed
and the index only, not on the batch size, the shard size or how many processes share the work.
Shards of ``shard_size`` consecutive indices are written atomically; a rerun skips the shards
that exist, so an interrupted run resumes without losing finished work. With torch.distributed
initialised, rank r takes shards r, r + K, r + 2K, ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..pipecall import call_pipeline, conditioning, num_classes
from ..utils.io import atomic_path, to_uint8


def sample_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed * 1_000_003 + index)


@torch.no_grad()
def sample_indices(pipe: Any, indices: list[int], seed: int, num_inference_steps: int,
                   pipeline_kwargs: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 NHWC) and labels (-1 if unconditional) for the given sample indices."""
    gens = [sample_generator(seed, i) for i in indices]
    if conditioning(pipe) == "class":
        labels = np.array([i % num_classes(pipe) for i in indices], dtype=np.int64)
        batch = labels.tolist()
    else:
        labels = np.full(len(indices), -1, dtype=np.int64)
        batch = [None] * len(indices)
    out = call_pipeline(pipe, batch, num_inference_steps=num_inference_steps, generator=gens, output_type="np",
                        **(pipeline_kwargs or {}))
    return to_uint8(np.asarray(out.images)), labels


@dataclass
class ShardSpec:
    num_samples: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return (self.num_samples + self.shard_size - 1) // self.shard_size

    def indices(self, shard: int) -> list[int]:
        start = shard * self.shard_size
        return list(range(start, min(start + self.shard_size, self.num_samples)))


def shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard-{shard:05d}.npz"


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray, indices: list[int]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, indices=np.asarray(indices, dtype=np.int64))


def read_shard(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("images", "labels", "indices")}
    except Exception as e:
        raise ValueError(f"{path} is damaged ({e}); delete it and rerun to regenerate that shard") from None


def check_run_config(out_dir: Path, config: dict) -> None:
    """A rerun into the same folder must use the same settings, or shards would mix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ValueError(f"{out_dir} holds shards of a different run (differs in: {', '.join(diff)}); "
                             "use another --out-dir or delete it")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True))


def merge_shards(out_dir: Path, spec: ShardSpec) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for s in range(spec.num_shards):
        p = shard_path(out_dir, s)
        if not p.exists():
            raise FileNotFoundError(f"shard {p} is missing; rerun the same command to finish it")
        d = read_shard(p)
        if list(d["indices"]) != spec.indices(s):
            raise ValueError(f"{p} holds indices {d['indices'][:3]}..., expected {spec.indices(s)[:3]}...")
        images.append(d["images"])
        labels.append(d["labels"])
    return np.concatenate(images), np.concatenate(labels)
