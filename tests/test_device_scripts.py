"""The device helper scripts, run here on the CPU: benchmarks/device/detached.sh keeps a job
running across device calls and hands back its files."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "device" / "detached.sh")


def _run(*args, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "OUT": str(out / "out"), "CQ_DETACHED_DIR": str(out / "jobs")})


def test_detached_job_outlives_its_call_and_hands_back_its_files(tmp_path):
    (tmp_path / "out").mkdir()
    name = "job-1"
    job = 'sleep 3; echo "{\\"rows\\": []}" > "$JOB_DIR/result.json"; echo done-writing; exit 3'
    r = _run("start", name, "bash", "-c", job, out=tmp_path)
    assert r.returncode == 0 and "started" in r.stdout, r.stderr
    again = _run("start", name, "true", out=tmp_path)  # one job of a name at a time
    assert again.returncode == 2 and "already running" in again.stderr
    first = _run("wait", name, "1", out=tmp_path)  # the starting call has ended; the job runs on
    assert "runs on" in first.stdout and not (tmp_path / "out" / "result.json").exists()
    last = _run("wait", name, "20", out=tmp_path)
    assert "ended with exit status 3" in last.stdout and "done-writing" in last.stdout
    assert (tmp_path / "out" / "result.json").read_text().strip() == '{"rows": []}'
    assert (tmp_path / "out" / f"{name}.log").is_file()


def test_detached_job_names_and_commands_are_checked(tmp_path):
    bad = _run("start", "a/b", "true", out=tmp_path)
    assert bad.returncode == 2 and "letters, digits" in bad.stderr
    none = _run("wait", "never-started", "1", out=tmp_path)
    assert none.returncode == 2 and "no job" in none.stderr
    assert _run("stop", "x", out=tmp_path).returncode == 2


AUTOTUNE = str(ROOT / "benchmarks" / "device" / "autotune_cache.sh")


def test_autotune_cache_packs_only_tuned_configs_and_restores_them(tmp_path):
    cache = tmp_path / "inductor"
    (cache / "ab").mkdir(parents=True)
    (cache / "cd" / "ef").mkdir(parents=True)
    (cache / "ab" / "k1.best_config").write_text('{"XBLOCK": 64, "found_by_coordesc": true}')
    (cache / "cd" / "ef" / "k2.best_config").write_text('{"XBLOCK": 128}')
    (cache / "ab" / "k1.py").write_text("kernel source, rebuilt on the new machine")
    tgz = tmp_path / "out" / "autotune-cache.tgz"
    tgz.parent.mkdir()
    r = subprocess.run(["bash", AUTOTUNE, "pack", str(cache), str(tgz)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "packed 2 tuned kernel configs" in r.stdout, r.stderr
    assert [p.name for p in tgz.parent.iterdir()] == ["autotune-cache.tgz"]  # no temporary file left
    fresh = tmp_path / "fresh"
    r = subprocess.run(["bash", AUTOTUNE, "unpack", str(tgz), str(fresh)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "unpacked 2" in r.stdout, r.stderr
    assert (fresh / "ab" / "k1.best_config").read_text() == '{"XBLOCK": 64, "found_by_coordesc": true}'
    assert (fresh / "cd" / "ef" / "k2.best_config").is_file() and not (fresh / "ab" / "k1.py").exists()


def test_autotune_cache_errors_name_what_is_missing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run(["bash", AUTOTUNE, "pack", str(empty), str(tmp_path / "e.tgz")], capture_output=True, text=True)
    assert r.returncode == 0 and "packed 0" in r.stdout  # nothing tuned yet: an empty, valid tarball
    no = subprocess.run(["bash", AUTOTUNE, "unpack", str(tmp_path / "none.tgz"), str(empty)], capture_output=True, text=True)
    assert no.returncode == 2 and "no file" in no.stderr
    nodir = subprocess.run(["bash", AUTOTUNE, "pack", str(tmp_path / "nodir"), str(tmp_path / "x.tgz")],
                           capture_output=True, text=True)
    assert nodir.returncode == 2 and "no cache directory" in nodir.stderr and not (tmp_path / "x.tgz").exists()
    (tmp_path / "junk.tgz").write_text("not a tarball")
    junk = subprocess.run(["bash", AUTOTUNE, "unpack", str(tmp_path / "junk.tgz"), str(empty)], capture_output=True,
                          text=True)
    assert junk.returncode == 2 and "not a tarball" in junk.stderr
    assert subprocess.run(["bash", AUTOTUNE, "list"], capture_output=True, text=True).returncode == 2


def _seeded_env(tmp_path: Path, fake_python: str) -> dict:
    """An environment for run_speed_rest.sh: `python3` is the given stand-in script, inductor's
    cache is under tmp_path, and CQ_AUTOTUNE_SEED is a packed seed holding old/y.best_config."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(fake_python)
    fake.chmod(0o755)
    seed_dir = tmp_path / "seed"
    (seed_dir / "old").mkdir(parents=True)
    (seed_dir / "old" / "y.best_config").write_text("{}")
    seed = tmp_path / "seed.tgz"
    subprocess.run(["bash", AUTOTUNE, "pack", str(seed_dir), str(seed)], check=True, capture_output=True)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"),
            "CQ_AUTOTUNE_SEED": str(seed)}


def test_sd15_batch8_torchao_part_overlaps_the_warmups_then_times_alone(tmp_path):
    """run_speed_rest.sh torchao-sd15-b8-rest, with a stand-in for python3 that logs when each
    speed.py call starts and ends and leaves a tuned config behind: the two warm-up-only calls
    overlap, the timed call starts after both ended, and the tuned configs come back packed."""
    log = tmp_path / "calls.log"
    env = _seeded_env(tmp_path, f"""#!/usr/bin/env bash
echo "start $$ $*" >> {log}
out=; prev=; for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
sleep 2
mkdir -p "$TORCHINDUCTOR_CACHE_DIR/k$$" && echo '{{"found_by_coordesc": true}}' > "$TORCHINDUCTOR_CACHE_DIR/k$$/x.best_config"
echo '{{"rows": []}}' > "$out"
echo "end $$" >> {log}
""")
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_speed_rest.sh"), str(out), "torchao-sd15-b8-rest"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    events = [line.split()[:2] for line in log.read_text().splitlines()]
    starts = [i for i, (kind, _) in enumerate(events) if kind == "start"]
    warm = [line for line in log.read_text().splitlines() if line.startswith("start") and "--repeats 0" in line]
    assert len(warm) == 2 and {"int8", "float8"} <= {w.split("torchao ")[1].split()[0] for w in warm}
    assert starts[:2] == [0, 1]  # both warm-ups started before either ended
    timed = next(i for i, line in enumerate(log.read_text().splitlines()) if "--repeats 5" in line)
    assert timed == 4  # after both warm-ups' ends
    assert {p.name for p in out.iterdir()} >= {"torchao-sd15-b8.json", "torchao-sd15-b8-warmup-int8.json",
                                               "torchao-sd15-b8-warmup-float8.json", "autotune-cache.tgz"}
    listing = subprocess.run(["tar", "tzf", str(out / "autotune-cache.tgz")], capture_output=True, text=True).stdout
    assert listing.count(".best_config") == 4  # the seed's, and one per speed.py call


def test_sd15_batch8_float8_part_starts_from_the_seed_with_the_graph_caches_off(tmp_path):
    """run_speed_rest.sh torchao-sd15-b8-float8: the seed's tuned configs are in inductor's cache
    before speed.py starts, the FX graph and AOTAutograd caches are off in its environment (their
    hits re-ran the tuning with torch 2.11), kernels compile in speed.py's own process unless the
    caller chose a thread count (from the worker pool a tuned config came back unmarked and was
    tuned again), and the configs come back packed; a seed that is not a tarball stops the part
    before any speed.py call."""
    log = tmp_path / "calls.log"
    env = _seeded_env(tmp_path, f"""#!/usr/bin/env bash
seeded=no; [ -f "$TORCHINDUCTOR_CACHE_DIR/old/y.best_config" ] && seeded=yes
echo "call seeded=$seeded fx=$TORCHINDUCTOR_FX_GRAPH_CACHE aot=$TORCHINDUCTOR_AUTOGRAD_CACHE threads=$TORCHINDUCTOR_COMPILE_THREADS $*" >> {log}
out=; prev=; for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
mkdir -p "$TORCHINDUCTOR_CACHE_DIR/new" && echo '{{}}' > "$TORCHINDUCTOR_CACHE_DIR/new/z.best_config"
echo '{{"rows": []}}' > "$out"
""")
    script = str(ROOT / "benchmarks" / "run_speed_rest.sh")
    out = tmp_path / "out"
    r = subprocess.run(["bash", script, str(out), "torchao-sd15-b8-float8"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("call seeded=yes fx=0 aot=0 threads=1 ")
    assert "--repeats 5" in calls[0] and "fp16 eager,torchao float8 dynamic + compile" in calls[0]
    assert {p.name for p in out.iterdir()} == {"torchao-sd15-b8-float8.json", "autotune-cache.tgz"}
    listing = subprocess.run(["tar", "tzf", str(out / "autotune-cache.tgz")], capture_output=True, text=True).stdout
    assert sorted(listing.split()) == ["new/z.best_config", "old/y.best_config"]
    log.unlink()
    chosen = subprocess.run(["bash", script, str(tmp_path / "out1"), "torchao-sd15-b8-float8"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env={**env, "TORCHINDUCTOR_COMPILE_THREADS": "4"})
    assert chosen.returncode == 0, chosen.stderr
    assert " threads=4 " in log.read_text()
    log.unlink()
    (tmp_path / "junk.tgz").write_text("not a tarball")
    bad = subprocess.run(["bash", script, str(tmp_path / "out2"), "torchao-sd15-b8-float8"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env={**env, "CQ_AUTOTUNE_SEED": str(tmp_path / "junk.tgz")})
    assert "not a tarball" in bad.stdout + bad.stderr and not log.exists()


def _training_bench(tmp_path):
    """A stand-in repository (train.sh copies cachequant/, scripts/, benchmarks/ from it) and a
    python3 that logs its arguments and writes what train_cifar.py would: train_info.json in --out,
    the fp16 export in --export."""
    repo, dev, bin_dir, log = tmp_path / "repo", tmp_path / "cqp", tmp_path / "bin", tmp_path / "calls.log"
    for d in ("cachequant/zoo/weights", "scripts", "benchmarks/device"):
        (repo / d).mkdir(parents=True)
    (repo / "benchmarks/device/train.sh").write_text((ROOT / "benchmarks/device/train.sh").read_text())
    (repo / "benchmarks/device/setup.sh").write_text((ROOT / "benchmarks/device/setup.sh").read_text())
    dev.mkdir()
    (dev / "train.zip").write_text("zip")
    bin_dir.mkdir()
    stub = bin_dir / "python3"
    stub.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
out=; ex=; prev=; for a in "$@"; do [ "$prev" = --out ] && out=$a; [ "$prev" = --export ] && ex=$a; prev=$a; done
[ -n "$out" ] && mkdir -p "$out" && echo '{{}}' > "$out/train_info.json"
[ -n "$ex" ] && mkdir -p "$ex" && echo w > "$ex/diffusion_pytorch_model.safetensors" && echo '{{}}' > "$ex/config.json"
exit 0
""")
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CQ_DEVICE_DIR": str(dev), "CQ_WAIT_REF_S": "0",
           "JOB_DIR": str(tmp_path / "job")}
    (tmp_path / "job").mkdir()
    return repo, dev, env, log


def test_training_starts_from_the_newest_state_it_finds(tmp_path):
    """train.sh's starting point, in order: this machine's checkpoint, carried pieces, CQ_INIT, the
    committed export that setup.sh keeps in /root/cqp/init, else from scratch; the fp16 export comes
    back with the job's files."""
    repo, dev, env, log = _training_bench(tmp_path)

    def start(**extra) -> str:
        log.unlink(missing_ok=True)
        r = subprocess.run(["bash", "benchmarks/device/train.sh", "unet", "1"], cwd=repo, env={**env, **extra},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return log.read_text().splitlines()[0]

    assert "--resume" not in start() and "--init" not in start()
    assert (tmp_path / "job" / "weights-unet.safetensors").read_text() == "w\n"
    assert (tmp_path / "job" / "config-unet.json").is_file()
    # setup.sh keeps the committed export on the machine
    committed = repo / "results/training/weights/cifar10-unet"
    committed.mkdir(parents=True)
    (committed / "config.json").write_text("{}")
    subprocess.run(["bash", "-c", "source benchmarks/device/setup.sh"], cwd=repo, env=env, capture_output=True,
                   timeout=60)
    assert (dev / "init" / "cifar10-unet" / "config.json").is_file()
    assert f"--init {dev}/init/cifar10-unet" in start()
    assert "--init /elsewhere" in start(CQ_INIT="/elsewhere")
    (dev / "ckpt-in" / "unet").mkdir(parents=True)
    (dev / "ckpt-in" / "unet" / "manifest.json").write_text("{}")
    call = start(CQ_INIT="/elsewhere")
    assert f"--resume {dev}/ckpt-in/unet" in call and "--init" not in call
    (dev / "train" / "unet" / "ckpt").mkdir(parents=True)
    (dev / "train" / "unet" / "ckpt" / "manifest.json").write_text("{}")
    assert f"--resume {dev}/train/unet/ckpt" in start()
