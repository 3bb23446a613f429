"""The CPU count the server sizes its torch threads by: affinity mask and cgroup quota, read
from fake /proc/self/cgroup and cgroup trees (v1 and v2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import cpus
from server.cpus import cgroup_cpu_quota, usable_cpus


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2(tmp_path: Path, group: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 tree: ``limits`` maps a group path ("" for the root) to its cpu.max."""
    proc, root = tmp_path / "proc-cgroup", tmp_path / "cgroup"
    write(proc, f"0::{group}\n")
    root.mkdir()
    for rel, text in limits.items():
        write(root / rel / "cpu.max", text + "\n")
    return proc, root


def test_v2_no_quota(tmp_path):
    proc, root = v2(tmp_path, "/", {"": "max 100000"})
    assert cgroup_cpu_quota(proc, root) is None


def test_v2_quota_of_two_and_a_half_cpus(tmp_path):
    proc, root = v2(tmp_path, "/", {"": "250000 100000"})
    assert cgroup_cpu_quota(proc, root) == 2.5


def test_v2_tightest_along_the_path_wins(tmp_path):
    limits = {"": "max 100000", "kubepods": "800000 100000", "kubepods/pod1": "150000 100000"}
    proc, root = v2(tmp_path, "/kubepods/pod1/ctr", limits)
    assert cgroup_cpu_quota(proc, root) == 1.5
    (root / "kubepods/pod1/ctr").mkdir()
    write(root / "kubepods/pod1/ctr/cpu.max", "50000 100000")
    assert cgroup_cpu_quota(proc, root) == 0.5


def test_v1_quota_and_unlimited(tmp_path):
    proc, root = tmp_path / "proc-cgroup", tmp_path / "cgroup"
    write(proc, "5:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "300000\n")
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(proc, root) == 3.0
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(proc, root) is None


def test_v1_inside_a_container_reads_the_mount_root(tmp_path):
    """In a container the mount's root is the container's own group; the path named in
    /proc/self/cgroup does not exist under it."""
    proc, root = tmp_path / "proc-cgroup", tmp_path / "cgroup"
    write(proc, "1:cpu:/docker/abc\n")
    write(root / "cpu/cpu.cfs_quota_us", "200000\n")
    write(root / "cpu/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(proc, root) == 2.0


def test_unreadable_or_malformed_files_mean_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path / "missing", tmp_path) is None
    proc, root = v2(tmp_path, "/", {"": "garbage"})
    assert cgroup_cpu_quota(proc, root) is None


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "want"),
    [(64, "200000 100000", 2), (64, "150000 100000", 1), (64, "50000 100000", 1), (4, "max 1", 4)],
)
def test_usable_cpus_caps_affinity_by_the_quota(tmp_path, monkeypatch, affinity, cpu_max, want):
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    proc, root = v2(tmp_path, "/", {"": cpu_max})
    assert usable_cpus(proc, root) == want
