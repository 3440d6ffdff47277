"""Hand-made run results for the report, plot and compare tests."""

from __future__ import annotations

from typing import Any

from loadtest.arrivals import Load
from loadtest.records import RequestRecord
from loadtest.report import build_report
from loadtest.runner import PointResult
from loadtest.summary import Slo

CONFIG = {"workload": "synthetic", "seed": 0, "duration": 10.0, "max_requests": 5}


def point(load: Load, scale: float) -> PointResult:
    records = [RequestRecord(f"r{i}", i, "", i * 0.5, i * 0.5, 10, 3,
                             chunk_times=[i * 0.5 + scale * k for k in (1, 2, 3)],
                             chunk_tokens=[1, 1, 1], end_s=i * 0.5 + scale * 3,
                             prompt_tokens=10, cached_tokens=5, completion_tokens=3)
               for i in range(5)]
    cluster = {"prefix_hit_ratio": 0.5, "prefill_cached_ratio": 0.25, "kv_blocks_sent": 12.0,
               "transfers_completed": 5.0, "transfers_failed": 0.0, "local_prefills": 0.0,
               "fallback_prefills": 0.0, "retries": 0.0}
    return PointResult(load, records, 3.0, cluster)


def report(name: str, rates: tuple[float, ...] = (1.0, 2.0)) -> dict[str, Any]:
    points = [point(Load(rate=r), 0.01 * (i + 1)) for i, r in enumerate(rates)]
    return build_report(name, "tandem-grpc", CONFIG, points, Slo(ttft_s=0.015, tpot_s=0.05))
