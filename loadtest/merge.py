"""Merges the runs of several load processes that sent together into one run.

One Python client process tops out at a few hundred requests/s on this kind of machine (its
event loop and the gRPC or HTTP stack cost more CPU per request than a fast server), so a
server's ceiling is measured with several processes at once (`loadtest/scripts/
parallel_load.py`, each process started with the same `--start-at`). Each process's run holds
one point with its share of the load; the merged point holds every record, its times moved to
the earliest process's clock (`config.started_unix` of each run), and is summarized again over
the span from the first process's start to the last one's end. The cluster's figures are those
of the first process (its status before and after bracket the others' requests when they
started together; `start_skew_s` says how far apart they started).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from loadtest.arrivals import Load
from loadtest.records import RequestRecord
from loadtest.report import build_report, point_records
from loadtest.runner import PointResult
from loadtest.summary import Slo


def shifted(record: RequestRecord, offset_s: float) -> RequestRecord:
    """`record` with every time moved `offset_s` later."""
    return dataclasses.replace(
        record, scheduled_s=record.scheduled_s + offset_s, send_s=record.send_s + offset_s,
        chunk_times=[t + offset_s for t in record.chunk_times],
        end_s=None if record.end_s is None else record.end_s + offset_s)


def merge_point(reports: Sequence[dict[str, Any]], load: Load) -> tuple[PointResult, float]:
    """One point from the single-point runs `reports` of processes that sent together, and
    how far apart they started (seconds)."""
    if not reports:
        raise ValueError("reports: need at least one run to merge")
    for report in reports:
        if len(report["points"]) != 1:
            raise ValueError(f"run {report['name']!r}: has {len(report['points'])} points; "
                             "each process must run exactly one")
        if "started_unix" not in report["config"]:
            raise ValueError(f"run {report['name']!r}: no config.started_unix (a run from "
                             "before --start-at existed)")
    starts = [float(r["config"]["started_unix"]) for r in reports]
    origin = min(starts)
    records: list[RequestRecord] = []
    end = 0.0
    for report, start in zip(reports, starts, strict=True):
        point = report["points"][0]
        records += [shifted(r, start - origin) for r in point_records(point)]
        end = max(end, start - origin + point["summary"]["duration_s"])
    records.sort(key=lambda r: r.send_s)
    cluster = reports[0]["points"][0]["cluster"]
    return PointResult(load, records, end, cluster), max(starts) - origin


def merge_runs(name: str, target: str, points: Sequence[tuple[PointResult, float, int]],
               slo: Slo, config: dict[str, Any]) -> dict[str, Any]:
    """The run document of merged points, each given as (point, start skew, processes)."""
    report = build_report(name, target, config, [p for p, _, _ in points], slo)
    for doc, (_, skew, processes) in zip(report["points"], points, strict=True):
        doc["label"] += f" ({processes} processes)"
        doc["processes"] = processes
        doc["start_skew_s"] = skew
    return report
