"""CPU threads for torch: `threads=auto` is the number of cores this process may actually use.

torch's default is the machine's core count, which ignores CPU affinity (taskset, SLURM's cpus-per-task) and cgroup
quotas (containers): threads then outnumber the cores they may run on and wait on each other. The count also
changes float rounding on CPU, so it is recorded in every image and reused by from_image.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _cgroup_chains() -> list[list[Path]]:
    """For each cgroup hierarchy that holds CPU limits: this process's folder and its parents up to the mount."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return []
    chains = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        mounts = [""] if controllers == "" else [controllers, "cpu", "cpu,cpuacct"] \
            if "cpu" in controllers.split(",") else []
        root = next((CGROUP_ROOT / m for m in mounts if (CGROUP_ROOT / m).is_dir()), None)
        if root is not None:
            leaf = root / path.lstrip("/")
            chains.append([leaf, *[p for p in leaf.parents if p == root or root in p.parents]])
    return chains


def _quota(folder: Path) -> float | None:
    """The CPU quota of one cgroup folder in cores (v2 cpu.max, v1 cfs quota/period), None if unlimited."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def cgroup_cpu_limit() -> float | None:
    """The tightest CPU quota on this process's cgroups (a parent's quota limits its children), in cores."""
    limits = [q for chain in _cgroup_chains() for folder in chain if (q := _quota(folder)) is not None]
    return min(limits) if limits else None


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by its cgroup quota (rounded up), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def use_threads(requested: int | None) -> int:
    """Set torch's intra-op thread count (`requested`, or `available_cores()` for auto); return it."""
    import torch

    n = requested or available_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
