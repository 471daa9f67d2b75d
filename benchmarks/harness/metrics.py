"""Metrics of a quality table's variants: Inception features and precision / recall on the device,
the CPU parts (Fréchet distance, PSNR / SSIM) in a process pool, each variant's ``metrics.json``
written as soon as a part of it is known."""

from __future__ import annotations

import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .env import environment
from .io import file_hash, read_json, write_json
from .sampling import resolve_samples
from .tables import Table, Variant, gather_table
from .timing import sync


def features_of(sdir: Path, device: str, batch_size: int, quiet: bool, resize: str = "torch") -> np.ndarray:
    """Inception pool3 features of a sample folder, computed once (GPU, batched) and kept next to
    the samples: shared variants and reruns reuse them. ``resize``: the reference statistics'
    convention (``cachequant.metrics.fid.RESIZES``); each has its own file."""
    from cachequant.metrics.fid import inception_features
    from cachequant.utils.io import atomic_path

    path = sdir / ("inception.npz" if resize == "torch" else f"inception-{resize}.npz")
    shash = file_hash(sdir / "samples.npz")
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["samples_sha1"]) == shash:
                return z["features"]
    images = np.load(sdir / "samples.npz", allow_pickle=False)["images"]
    feats = inception_features(images, device=device, batch_size=batch_size, progress=not quiet, resize=resize)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=feats, samples_sha1=np.array(shash))
    return feats


def _cpu_metrics(feats: np.ndarray | None, mu: np.ndarray | None, sigma: np.ndarray | None, samples: str,
                 fp_samples: str | None) -> dict:
    """The CPU-bound part (Fréchet distance's sqrtm, PSNR, SSIM), run in worker processes."""
    from cachequant.metrics import psnr, ssim
    from cachequant.metrics.fid import feature_stats, frechet_distance

    out: dict = {}
    if feats is not None:
        # A failure here must not take PSNR / SSIM down with it (it did once: a SciPy API change).
        try:
            out["fid"] = frechet_distance(*feature_stats(feats), mu, sigma)
        except Exception as e:  # noqa: BLE001
            out["fid_error"] = f"{type(e).__name__}: {e}"[:300]
    if fp_samples is not None:
        a = np.load(samples, allow_pickle=False)["images"]
        b = np.load(fp_samples, allow_pickle=False)["images"]
        if a.shape != b.shape:
            out["psnr_error"] = f"shapes differ: {a.shape} vs fp {b.shape}"
        elif samples == fp_samples:  # the reference itself: PSNR would be infinite (strict JSON has no inf)
            out["psnr_vs_fp"], out["ssim_vs_fp"], out["is_fp_reference"] = None, None, True
        else:
            a64, b64 = a.astype(np.float64) / 255, b.astype(np.float64) / 255
            out["psnr_vs_fp"], out["ssim_vs_fp"] = psnr(a64, b64), ssim(a64, b64)
    return out


def _limit_threads(n: int) -> None:
    """Worker initializer: n BLAS / OpenMP threads, so that parallel workers do not fight for cores."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n)


def _timed_cpu_metrics(*args) -> tuple[dict, float]:
    t0 = time.time()
    out = _cpu_metrics(*args)
    return out, time.time() - t0


class PRReference:
    """Reference features and their k-NN radii on the device, computed once per metrics run; the
    package's own precision/recall code (``metrics.prdc``) run on GPU tensors."""

    def __init__(self, ref_features: np.ndarray, device: str, k: int = 3):
        self.features, self.device, self.k = ref_features, device, k
        self._cache: dict[int, tuple] = {}

    def __call__(self, fake: np.ndarray, chunk: int = 1024) -> tuple[float, float, int]:
        import torch

        from cachequant.metrics.prdc import kth_radii, precision_recall

        n = min(len(fake), len(self.features))  # as `cachequant evaluate`: equal set sizes
        if n <= self.k:
            raise ValueError(f"precision/recall needs more than {self.k} samples, have {n}")
        if n not in self._cache:
            r = torch.as_tensor(np.asarray(self.features[:n]), dtype=torch.float64, device=self.device)
            self._cache[n] = (r, kth_radii(r, self.k, chunk))
        r, r_rad = self._cache[n]
        precision, recall = precision_recall(r, fake[:n], self.k, chunk, device=self.device, real_radii=r_rad)
        return precision, recall, n


class MetricsRunner:
    """Metrics of a table's variants, one variant at a time: the device parts (Inception features,
    precision / recall) at once, the CPU parts (Fréchet distance's sqrtm, PSNR / SSIM) in a process
    pool, and every variant's ``metrics.json`` written as soon as a part of it is known, with a
    timing line per step. A run killed midway keeps what it finished. (The first version wrote
    nothing before the end and sized its BLAS threads by ``os.cpu_count()``, which in a container
    can be the host's core count; on the lent 16-CPU machine it was killed after 4 minutes with
    nothing written, cause not established.)

    Used by ``metrics`` over a whole table and by ``sample --ref-stats`` after each variant, so that
    the CPU parts overlap with the sampling of the next variant."""

    def __init__(self, work: Path, table: Table, ref_stats: str, device: str, inception_batch: int = 500,
                 workers: int | None = None, force: bool = False, quiet: bool = False, fid_bootstrap: int = 20):
        from cachequant.metrics.fid import load_reference, reference_resize
        from cachequant.utils.cpus import usable_cpus

        self.work, self.table, self.device = work, table, device
        self.inception_batch, self.force, self.quiet = inception_batch, force, quiet
        self.fid_bootstrap = fid_bootstrap
        self.tdir = work / table.name
        self.ref = load_reference(ref_stats)
        self.resize = reference_resize(self.ref)
        self.ref_id = {"path": str(ref_stats), "source": str(self.ref.get("source", "")),
                       "count": int(self.ref.get("count", 0)), "sha1": file_hash(Path(ref_stats)),
                       "resize": self.resize}
        self.pr = PRReference(self.ref["features"], device)
        cpus = usable_cpus()
        self.workers = max(1, min(workers or max(1, cpus // 2), cpus))
        self.threads = max(1, cpus // self.workers)  # BLAS threads per worker: no oversubscription
        self._pool = None
        self._by_samples: dict[str, Any] = {}  # variants sharing samples share one CPU computation
        self._pending: list[tuple[Path, dict, Any]] = []
        self.failed = 0

    def _fp(self) -> tuple[str | None, str | None]:
        fp_dir = resolve_samples(self.work, self.tdir / "fp")
        if fp_dir is None:
            return None, None
        return str(fp_dir / "samples.npz"), file_hash(fp_dir / "samples.npz")

    def _log(self, slug: str, msg: str) -> None:
        print(f"[{self.table.name}/{slug}] metrics: {msg}", flush=True)

    def submit(self, v: Variant) -> bool:
        """Device part now, CPU part queued; False when there is nothing (new) to compute."""
        import multiprocessing as mp

        vdir = self.tdir / v.slug
        sdir = resolve_samples(self.work, vdir)
        if sdir is None:
            return False
        fp_samples, fp_hash = self._fp()
        samples = str(sdir / "samples.npz")
        key = {"samples_sha1": file_hash(sdir / "samples.npz"), "fp_sha1": fp_hash, "reference": self.ref_id}
        old = read_json(vdir / "metrics.json")
        if old and old.get("key") == key and not old.get("pending") and not self.force \
                and (self.fid_bootstrap == 0 or len(old.get("fid_bootstrap") or []) >= self.fid_bootstrap):
            return False
        try:
            t0 = time.time()
            feats = features_of(sdir, self.device, self.inception_batch, self.quiet, self.resize)
            sync(self.device)
            t1 = time.time()
            p, r, n = self.pr(feats)
            t2 = time.time()
            boot = None
            if self.fid_bootstrap:
                from cachequant.metrics.fid import fid_bootstrap

                # on the device, next to the features: shared resamples across variants (paired)
                boot = fid_bootstrap(feats, self.ref["mu"], self.ref["sigma"], self.fid_bootstrap, seed=0,
                                     device=self.device)
            t3 = time.time()
        except Exception as e:  # noqa: BLE001 - one variant's failure must not cost the others
            write_json(vdir / "metrics.json", {"key": None, "error": f"{type(e).__name__}: {e}",
                                               "traceback": traceback.format_exc()})
            self._log(v.slug, f"FAILED: {type(e).__name__}: {e}")
            self.failed += 1
            return False
        base = {"key": key, "variant": v.slug, "samples": str(sdir.relative_to(self.work)),
                "num_samples": len(feats), "precision": p, "recall": r, "pr_k": 3, "pr_samples": n,
                "fid_reference": self.ref_id["source"], "pending": ["fid", "psnr_vs_fp", "ssim_vs_fp"],
                "seconds": {"inception": t1 - t0, "precision_recall": t2 - t1}}
        if boot is not None:
            base.update(fid_bootstrap=boot, fid_bootstrap_seed=0)
            base["seconds"]["fid_bootstrap"] = t3 - t2
        write_json(vdir / "metrics.json", base)  # precision / recall survive a kill during the CPU part
        self._log(v.slug, f"inception {t1 - t0:.1f} s, precision {p:.3f} / recall {r:.3f} ({t2 - t1:.1f} s)"
                  + (f", FID bootstrap std {np.std(boot, ddof=1):.2f} over {len(boot)} ({t3 - t2:.1f} s)"
                     if boot and len(boot) > 1 else ""))
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_limit_threads, initargs=(self.threads,))
        if samples not in self._by_samples:
            self._by_samples[samples] = self._pool.submit(_timed_cpu_metrics, feats, self.ref["mu"],
                                                          self.ref["sigma"], samples, fp_samples)
        self._pending.append((vdir, base, self._by_samples[samples]))
        self._collect(block=False)
        return True

    def _collect(self, block: bool) -> None:
        keep = []
        for vdir, base, fut in self._pending:
            if not block and not fut.done():
                keep.append((vdir, base, fut))
                continue
            try:
                out, secs = fut.result()
                base.update(out)
                base["seconds"]["fid_psnr_ssim"] = secs
                errs = [k for k in out if k.endswith("_error")]
                self._log(base["variant"], f"FID {out.get('fid', float('nan')):.2f}, PSNR / SSIM vs fp "
                          f"{out.get('psnr_vs_fp')} / {out.get('ssim_vs_fp')} ({secs:.1f} s)"
                          + (f"; errors: {', '.join(errs)}" if errs else ""))
            except Exception as e:  # noqa: BLE001
                base["error"] = f"{type(e).__name__}: {e}"
                self._log(base["variant"], f"FAILED in the CPU part: {base['error']}")
                self.failed += 1
            base.pop("pending", None)
            write_json(vdir / "metrics.json", base)
        self._pending = keep

    def finish(self) -> int:
        """Waits for the CPU parts, writes ``<table>.json``; returns the number of failures."""
        self._collect(block=True)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        write_json(self.work / f"{self.table.name}.json",
                   gather_table(self.work, self.table, env=environment(self.device)))
        print(f"written {self.work / (self.table.name + '.json')}", flush=True)
        return self.failed
