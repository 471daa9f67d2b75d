"""torchrun with the gloo backend and 2 CPU processes: same plan, same images, resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from cachequant.plan import load_plan

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cli(args, nproc=1, **kw):
    if nproc == 1:
        cmd = [sys.executable, "-m", "cachequant", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "cachequant", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def test_plan_identical_for_one_and_two_processes(tmp_path):
    args = ["calibrate", "--model", "tiny-ddim", "--steps", "6", "--interval", "2", "--schedule", "dps",
            "--bits", "w8a8", "--num-samples", "8", "--batch-size", "2"]
    r1 = _cli(args + ["--out", str(tmp_path / "p1.cqplan")])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = _cli(args + ["--out", str(tmp_path / "p2.cqplan")], nproc=2)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "(2 processes)" in r2.stdout
    p1, p2 = load_plan(tmp_path / "p1.cqplan"), load_plan(tmp_path / "p2.cqplan")
    assert p1.to_meta() == p2.to_meta()
    assert set(p1.tensors) == set(p2.tensors)
    for k in p1.tensors:
        assert torch.equal(p1.tensors[k], p2.tensors[k]), k
    assert "qdec.up_blocks.2.resnets.0.conv1" in p1.tensors  # DEC statistics were combined too


def _eval_args(out, n=12, shard=2):
    return ["evaluate", "--model", "tiny-ddim", "--steps", "4", "--num-samples", str(n), "--shard-size",
            str(shard), "--batch-size", "2", "--out-dir", str(out), "--quiet"]


def test_same_images_for_one_and_two_processes_and_resume_after_kill(tmp_path):
    r = _cli(_eval_args(tmp_path / "k1"))
    assert r.returncode == 0, r.stderr[-2000:]
    ref = np.load(tmp_path / "k1" / "samples.npz")["images"]
    r = _cli(_eval_args(tmp_path / "k2"), nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "k2" / "samples.npz")["images"], ref)
    assert json.loads((tmp_path / "k2" / "metrics.json").read_text())["metrics"]["world_size"] == 2

    # kill -9 a two-process run once some shards exist, then rerun the same command (100 shards:
    # enough that the run cannot finish between two polls, however fast the machine)
    n_kill = 200
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "cachequant",
           *_eval_args(out, n=n_kill)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("shard-*.npz"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("shard-*.npz"))
    assert 3 <= len(done) < n_kill // 2, done  # interrupted mid-run
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    r = _cli(_eval_args(out, n=n_kill), nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    for name, t in stamps.items():  # finished shards were kept, not redone
        assert (out / name).stat().st_mtime_ns == t
    assert not list(out.glob(".*"))  # temporary files of the killed writers were cleaned up
    full = _cli(_eval_args(tmp_path / "uninterrupted", n=n_kill))
    assert full.returncode == 0
    np.testing.assert_array_equal(np.load(out / "samples.npz")["images"],
                                  np.load(tmp_path / "uninterrupted" / "samples.npz")["images"])
