"""A run's outputs: one JSON file with everything (configuration, per point the summary, the
cluster's figures and every request's record) and a Markdown summary of it.

A run JSON holds one or more points (a sweep); `compare` reads several and puts their points
side by side with the same tables.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest.records import RequestRecord
from loadtest.runner import PointResult
from loadtest.summary import Slo, summarize

VERSION = 1


def build_report(name: str, target: str, config: dict[str, Any], points: Sequence[PointResult],
                 slo: Slo) -> dict[str, Any]:
    """The JSON document of a run."""
    return {
        "version": VERSION, "name": name, "target": target,
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "config": config,
        "points": [{"label": p.load.label, "load": asdict(p.load),
                    "summary": summarize(p.records, p.duration_s, slo), "cluster": p.cluster,
                    "records": [r.to_dict() for r in p.records]} for p in points],
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=1) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(Path(path).read_text())
    if report.get("version") != VERSION:
        raise ValueError(f"{path}: not a loadtest run file of version {VERSION}")
    return report


def point_records(point: dict[str, Any]) -> list[RequestRecord]:
    return [RequestRecord.from_dict(r) for r in point["records"]]


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:,.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def summary_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One line per (name, point): requests, throughput, goodput and latencies in ms."""
    head = ("| run | sent | ok | err | cut | req/s | out tok/s | goodput req/s | TTFT p50 | "
            "p90 | p99 | ITL p50 | p99 | TPOT p50 | p99 | E2E p50 | p99 |")
    lines = [head, _rule(head)]
    for name, point in rows:
        s = point["summary"]
        req, lat = s["requests"], s["latency_s"]
        lines.append("| " + " | ".join([
            name, str(req["sent"]), str(req["ok"]), str(req["errors"]), str(req["cancelled"]),
            _num(s["throughput"]["requests_per_s"]),
            _num(s["throughput"]["output_tokens_per_s"], 1),
            _num(s["goodput"]["requests_per_s"]),
            _ms(lat["ttft"]["p50"]), _ms(lat["ttft"]["p90"]), _ms(lat["ttft"]["p99"]),
            _ms(lat["itl"]["p50"]), _ms(lat["itl"]["p99"]),
            _ms(lat["tpot"]["p50"]), _ms(lat["tpot"]["p99"]),
            _ms(lat["e2e"]["p50"]), _ms(lat["e2e"]["p99"])]) + " |")
    return "\n".join(lines)


CLUSTER_COLUMNS = (("prefix hit ratio (router)", "prefix_hit_ratio", 3),
                   ("prefill cached ratio", "prefill_cached_ratio", 3),
                   ("KV blocks sent", "kv_blocks_sent", 0),
                   ("transfers", "transfers_completed", 0),
                   ("transfers failed", "transfers_failed", 0),
                   ("local prefills", "local_prefills", 0),
                   ("fallback prefills", "fallback_prefills", 0),
                   ("retries", "retries", 0))


def cluster_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The cluster's figures per (name, point); empty when no point has any."""
    if not any(point["cluster"] for _, point in rows):
        return ""
    head = "| run | client cached ratio | " + " | ".join(c[0] for c in CLUSTER_COLUMNS) + " |"
    lines = [head, _rule(head)]
    for name, point in rows:
        cluster = point["cluster"]
        cells = [_num(cluster.get(key), digits) for _, key, digits in CLUSTER_COLUMNS]
        cached = point["summary"]["tokens"]["cached_prompt_ratio"]
        lines.append(f"| {name} | {_num(cached, 3)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rule(head: str) -> str:
    return "|" + " --- |" * (head.count("|") - 1)


def markdown(report: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The run's Markdown summary: what ran, the tables, the plots."""
    config = report["config"]
    slo = report["points"][0]["summary"]["goodput"] if report["points"] else {}
    rows = [(point["label"], point) for point in report["points"]]
    parts = [f"# Load test: {report['name']}", "",
             f"Target `{report['target']}`, workload `{config.get('workload')}`, seed "
             f"{config.get('seed')}, bounds {config.get('duration')} s / "
             f"{config.get('max_requests')} requests per point; goodput SLO: TTFT "
             f"{_ms(slo.get('slo_ttft_s'))} ms, TPOT {_ms(slo.get('slo_tpot_s'))} ms "
             f"(– : none). Latencies in ms; `cut`: requests cancelled at the time bound.", "",
             summary_table(rows), ""]
    table = cluster_table(rows)
    if table:
        parts += ["The cluster's own figures over each point:", "", table, ""]
    errors: Counter[str] = Counter()
    for point in report["points"]:
        errors.update(point["summary"]["errors_by_code"])
    if errors:
        parts += ["Errors by code: " + ", ".join(f"{c} × {n}" for c, n in errors.items()), ""]
    parts += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(parts) + "\n"
