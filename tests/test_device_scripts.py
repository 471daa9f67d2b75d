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
