"""CPU seconds used by a process tree or by this process, for judging a benchmark's fairness.

`tree_cpu_seconds(pid)` sums user + system time of `pid` and every live descendant (all their
threads), so a subprocess engine's helper processes and OpenMP threads count;
`own_cpu_seconds()` is this process's, all threads. Both are cumulative: take differences.
(psutil, from the test extra, like the bench's transformers.)
"""

from __future__ import annotations

import resource

import psutil


def tree(root: int) -> list[psutil.Process]:
    """`root` and its live descendants, root first ([] once `root` has ended)."""
    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(root: int) -> float:
    """User + system seconds of `root` and its live descendants (a descendant that has ended
    drops out; the bench measures across runs, where the tree is stable)."""
    total = 0.0
    for proc in tree(root):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def own_cpu_seconds() -> float:
    """User + system seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
