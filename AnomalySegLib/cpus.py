"""How many CPUs this process may use (torch-free: the I/O and preprocessing threads use it)."""

from __future__ import annotations

import os

__all__ = ["usable_cpus", "usable_cpu_count", "worker_threads"]


def usable_cpus() -> "set[int]":
    """Logical CPU numbers this process may run on (its affinity mask where the OS has one,
    else all of them)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def usable_cpu_count() -> int:
    """How many logical CPUs this process may run on (at least 1)."""
    return max(1, len(usable_cpus()))


def worker_threads(limit: int = 8) -> int:
    """Threads for work that releases the GIL (deflate, scipy.ndimage): the usable CPUs,
    at most ``limit``."""
    return max(1, min(int(limit), usable_cpu_count()))
