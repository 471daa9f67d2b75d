from pathlib import Path

from cachequant.utils.cpus import usable_cpus


def _cgroup(root: Path, cpu_max: str) -> Path:
    root.mkdir()
    (root / "cpu.max").write_text(cpu_max)
    return root


def test_usable_cpus_respects_the_cgroup_quota(tmp_path):
    unlimited = usable_cpus(_cgroup(tmp_path / "a", "max 100000\n"))
    assert unlimited >= 1
    assert usable_cpus(_cgroup(tmp_path / "b", "150000 100000\n")) == min(unlimited, 2)  # 1.5 CPUs -> 2 threads
    assert usable_cpus(_cgroup(tmp_path / "c", "10000 100000\n")) == 1  # a tenth of a CPU still gets one thread


def test_usable_cpus_without_cgroup_files(tmp_path):
    assert usable_cpus(tmp_path) >= 1
