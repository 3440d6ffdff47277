"""Keeps freed activation memory in the heap, so the CPU engine does not page-fault per step.

glibc serves allocations above its mmap threshold (128 KiB at start, raised dynamically up to
32 MiB) with fresh `mmap`s and returns them on free, and trims the heap top once more than
twice the threshold is free. A CPU forward pass allocates and frees the same multi-MiB
activations every step, so each step page-faults them in again: ~46,000 minor faults per
batch-128 generate on the engine bench, ~5 us each on our VMs. Raising the mmap threshold to
its maximum and never trimming keeps that memory mapped; the process's resident size then
stays at its high-water mark, as it does with the tcmalloc vLLM's CPU build recommends.

Applied once per process by the CPU engine; a no-op where glibc's `mallopt` is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only past 2 GiB free at the top
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps


@functools.cache
def keep_freed_memory() -> bool:
    """Tunes glibc malloc as above; True if every setting was accepted."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.info("malloc tuning skipped: no glibc mallopt")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (M_TOP_PAD, TOP_PAD))
    ok = all(mallopt(param, value) == 1 for param, value in settings)
    log.info("malloc tuned for steady CPU steps: %s", "ok" if ok else "partly refused")
    return ok
