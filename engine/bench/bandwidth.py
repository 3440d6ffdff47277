"""This machine's memory read bandwidth: the ceiling of batch-1 decode, which reads every
weight once per token."""

from __future__ import annotations

import time

import torch

PROBE_BYTES = 1 << 30  # 1 GiB: far past any cache, as the model's weights are
PROBE_REPEATS = 5


def read_bandwidth(num_bytes: int = PROBE_BYTES, repeats: int = PROBE_REPEATS) -> float:
    """Bytes per second of a float32 `sum` over a `num_bytes` tensor, best of `repeats`
    (the best run is the one least disturbed by other processes on a shared machine)."""
    data = torch.ones(num_bytes // 4, dtype=torch.float32)  # [N]: written once, paged in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best
