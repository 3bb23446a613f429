"""How many CPUs this process may really use: its affinity mask and its cgroup CPU quota.

A container limited to 2 CPUs on a 64-core host sees 64 CPUs in ``os.cpu_count()``; an OpenMP
team of 64 threads there is throttled by the quota and spins against itself. The quota is read
from cgroup v2 (``cpu.max``: ``"$QUOTA $PERIOD"`` or ``"max $PERIOD"``) or v1
(``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, -1 for none), the tightest along the process's
cgroup path from its own group up to the root.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_cpu_quota(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> float | None:
    """The CPUs (possibly fractional) the cgroup quota allows, or None when there is no quota
    or it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: "0::/path"
            for directory in _up_from(root, path):
                limits += _v2_limit(directory / "cpu.max")
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    for directory in _up_from(mount, path):
                        limits += _v1_limit(directory)
                    break
    return min(limits) if limits else None


def usable_cpus(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> int:
    """Threads worth running: the affinity mask's CPUs, capped by the cgroup quota rounded
    down (at least 1): a thread beyond the quota only waits for its share."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_quota(proc_cgroup, root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def _up_from(mount: Path, path: str) -> list[Path]:
    """``mount/path`` and each of its parents down to ``mount`` (inside a container the
    process's path may not exist under the mount, whose root is its own group: then only the
    mount itself is read)."""
    out = []
    rel = Path(path.strip("/"))
    while True:
        directory = mount / rel
        if directory.is_dir():
            out.append(directory)
        if rel == Path("."):
            return out
        rel = rel.parent


def _v2_limit(path: Path) -> list[float]:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return []
    if quota == "max":
        return []
    return _ratio(quota, period)


def _v1_limit(directory: Path) -> list[float]:
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return []
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> list[float]:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return []
    return [q / p] if q > 0 and p > 0 else []
