"""The Grafana dashboard, built from code next to the metric definitions.

`build_dashboard()` returns the dashboard as plain Grafana JSON (schema 39) with a
`${datasource}` Prometheus data-source variable; `scripts/gen_dashboard.py` writes it to
`deploy/grafana/tandem-dashboard.json` (checked in; a test fails when it is stale).
`dashboard_exprs()` lists every PromQL expression in a dashboard with the template variables
replaced, so tests can run each against a real Prometheus.

Rows: service level (TTFT / ITL / end-to-end percentiles, throughput, requests by outcome,
error rate, goodput), router, prefill, decode, KV transfer, fallbacks (every path that keeps
serving in a lesser way: Redis outages seen by workers and routers, prefix-index re-publishes,
failed KV pushes and peer connects; lease expiries, local prefills and retries are in their
roles' rows).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.utils import floatToGoString

from observability.metrics import TTFT_BUCKETS_S

UID = "tandem-overview"
TITLE = "Tandem: disaggregated serving"
RATE = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The goodput SLO picks a TTFT bucket bound, so `le="$ttft_slo"` matches a real bucket.
TTFT_SLO_OPTIONS = tuple(floatToGoString(b) for b in TTFT_BUCKETS_S if 0.1 <= b <= 10.0)
TTFT_SLO_DEFAULT = "0.5"
# What a dashboard query becomes outside Grafana (tests): the variables' defaults.
DEFAULT_VARIABLES = {"__rate_interval": "1m", "ttft_slo": TTFT_SLO_DEFAULT}
ERRORS = 'outcome!~"stop|length|cancelled|CANCELLED"'  # client cancels are not errors
WITHIN_SLO_SELECTOR = 'le="$ttft_slo"'

PANEL_W, PANEL_H, COLUMNS = 8, 8, 3


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: list[Target]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"


@dataclass(frozen=True)
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def rate(metric: str, selector: str = "") -> str:
    sel = f"{{{selector}}}" if selector else ""
    return f"rate({metric}{sel}[{RATE}])"


WITHIN_SLO = f"sum({rate('tandem_time_to_first_token_seconds_bucket', WITHIN_SLO_SELECTOR)})"
ALL_FIRST_TOKENS = f"sum({rate('tandem_time_to_first_token_seconds_count')})"


def quantiles(metric: str, selector: str = "", by: str = "",
              qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[Target]:
    """histogram_quantile targets of a histogram, one per quantile (legend "p50 …")."""
    group = ", ".join(["le", *([by] if by else [])])
    legend_by = f" {{{{{by}}}}}" if by else ""
    return [Target(f"histogram_quantile({q}, sum by ({group}) "
                   f"({rate(metric + '_bucket', selector)}))",
                   f"p{round(q * 100)}{legend_by}") for q in qs]


def _service_row() -> Row:
    return Row("Service level", [
        Panel("Time to first token", "TTFT percentiles, from arrival at the router.",
              quantiles("tandem_time_to_first_token_seconds"), "s"),
        Panel("Inter-token latency", "Gap between streamed tokens, percentiles.",
              quantiles("tandem_inter_token_latency_seconds"), "s"),
        Panel("End-to-end latency", "Arrival to last token (finished requests), and time "
              "per output token p50.",
              [*quantiles("tandem_e2e_request_latency_seconds"),
               *[Target(t.expr, f"TPOT {t.legend}")
                 for t in quantiles("tandem_time_per_output_token_seconds", qs=(0.5,))]], "s"),
        Panel("Token throughput", "Prompt and generated tokens per second of ended requests.",
              [Target(f"sum({rate('tandem_generation_tokens_total')})", "generated"),
               Target(f"sum({rate('tandem_prompt_tokens_total')})", "prompt"),
               Target(f"sum({rate('tandem_prompt_tokens_cached_total')})", "prompt cached")],
              "short"),
        Panel("Requests by outcome", "Ended requests per second: finish reason or gRPC code.",
              [Target(f"sum by (outcome) ({rate('tandem_requests_total')}) > 0",
                      "{{outcome}}"),
               Target(f"sum({rate('tandem_requests_received_total')})", "received")], "reqps"),
        Panel("Error rate", "Share of ended requests that ended with an error code (client "
              "cancellations excluded).",
              [Target(f"sum({rate('tandem_requests_total', ERRORS)}) / "
                      f"sum({rate('tandem_requests_total')})", "errors")], "percentunit"),
        Panel("Goodput", "Requests per second whose first token came within the TTFT SLO "
              "($ttft_slo s), against all first tokens.",
              [Target(WITHIN_SLO, "within SLO"), Target(ALL_FIRST_TOKENS, "all")],
              "reqps"),
        Panel("Goodput ratio", "Share of first tokens within the TTFT SLO ($ttft_slo s).",
              [Target(f"{WITHIN_SLO} / {ALL_FIRST_TOKENS}", "within SLO")], "percentunit"),
    ])


def _router_row() -> Row:
    return Row("Router", [
        Panel("Routing decisions", "Decisions per second by policy and prefix index mode "
              "(degraded: the index is unavailable, routing by load).",
              [Target(f"sum by (policy, mode) ({rate('tandem_router_decisions_total')})",
                      "{{policy}} / {{mode}}")], "ops"),
        Panel("Prefix hit ratio", "Router: blocks the chosen prefill worker held per the index. "
              "Workers: prompt tokens found in their prefix cache.",
              [Target(f"sum({rate('tandem_router_prefix_hit_blocks_total')}) / "
                      f"sum({rate('tandem_router_prefix_query_blocks_total')})", "router index"),
               Target(f"sum by (role) ({rate('tandem_prefix_cache_hit_tokens_total')}) / "
                      f"sum by (role) ({rate('tandem_prefix_cache_query_tokens_total')})",
                      "{{role}} cache")], "percentunit"),
        Panel("Degraded mode", "1 while a router routes without the prefix index.",
              [Target("max by (instance) (tandem_router_degraded)", "{{instance}}")],
              "none", "stat"),
        Panel("Queue and in flight", "Requests waiting for an admission slot, and holding one.",
              [Target("sum(tandem_router_queue_depth)", "queued"),
               Target("sum(tandem_router_inflight_requests)", "in flight")]),
        Panel("Queue time", "Time waited for an admission slot.",
              quantiles("tandem_router_queue_time_seconds", qs=(0.5, 0.99)), "s"),
        Panel("Retries and migrations", "Attempts retried on another pair before the first "
              "token, by the hop that failed; requests migrated to another pair "
              "mid-generation, by why their decode stream was lost.",
              [Target(f"sum by (reason) ({rate('tandem_router_retries_total')})",
                      "retry {{reason}}"),
               Target(f"sum by (reason) ({rate('tandem_router_migrations_total')})",
                      "migration {{reason}}")], "ops"),
        Panel("Local prefills", "Requests prefilled on their decode worker, no transfer: "
              "routed to an aggregated worker, or a short uncached prompt (conditional "
              "disaggregation).",
              [Target(f"sum by (reason) ({rate('tandem_router_local_prefills_total')})",
                      "{{reason}}")], "ops"),
        Panel("Live workers", "Workers the router routes to, and scrape targets up.",
              [Target("max by (role) (tandem_router_live_workers)", "{{role}}"),
               Target('sum by (job) (up{job=~".*tandem.*"})', "{{job}} targets up")]),
    ])


def _prefill_row() -> Row:
    p = 'role="prefill"'
    return Row("Prefill", [
        Panel("Prompt tokens computed vs cached", "Per second on prefill workers: run "
              "through the model, or taken from the prefix cache.",
              [Target(f"sum({rate('tandem_prompt_tokens_computed_total', p)})", "computed"),
               Target(f"sum({rate('tandem_prefix_cache_hit_tokens_total', p)})", "cached")]),
        Panel("Prefill batch tokens", "Prompt tokens computed per engine step.",
              quantiles("tandem_prefill_batch_tokens", p, qs=(0.5, 0.99)), "short"),
        Panel("Prefill step time", "Engine step duration per prefill worker.",
              quantiles("tandem_step_duration_seconds", p, "worker", qs=(0.5, 0.99)), "s"),
        Panel("Prefill requests", "Prefill requests and KV blocks pushed per second.",
              [Target(f"sum by (worker) ({rate('tandem_prefill_requests_total')})",
                      "{{worker}} requests"),
               Target(f"sum by (worker) ({rate('tandem_prefill_blocks_sent_total')})",
                      "{{worker}} blocks sent")], "ops"),
        Panel("Prefill queue", "Requests running and waiting on each prefill worker.",
              [Target(f"sum by (worker) (tandem_num_requests_running{{{p}}})",
                      "{{worker}} running"),
               Target(f"sum by (worker) (tandem_num_requests_waiting{{{p}}})",
                      "{{worker}} waiting")]),
    ])


def _decode_row() -> Row:
    d = 'role=~"decode|aggregated"'  # aggregated workers decode too
    return Row("Decode", [
        Panel("Running and waiting", "Requests in each decode worker's batch, and waiting.",
              [Target(f"sum by (worker) (tandem_num_requests_running{{{d}}})",
                      "{{worker}} running"),
               Target(f"sum by (worker) (tandem_num_requests_waiting{{{d}}})",
                      "{{worker}} waiting")]),
        Panel("Decode batch size", "Sequences decoding per engine step.",
              quantiles("tandem_decode_batch_size", d, qs=(0.5, 0.99)), "short"),
        Panel("KV cache usage", "Share of each worker's KV blocks held by requests.",
              [Target("max by (worker, role) (tandem_kv_cache_usage_ratio)",
                      "{{worker}}")], "percentunit"),
        Panel("Decode step time", "Engine step duration per decode worker.",
              quantiles("tandem_step_duration_seconds", d, "worker", qs=(0.5, 0.99)), "s"),
        Panel("Lease expiries and local prefills", "Reservations whose lease ended, and "
              "requests prefilled on the decode worker after a failed transfer.",
              [Target(f"sum by (worker) ({rate('tandem_lease_expiries_total')})",
                      "{{worker}} lease expiries"),
               Target(f"sum by (worker) ({rate('tandem_local_prefill_fallbacks_total')})",
                      "{{worker}} local prefills")], "ops"),
        Panel("Preemptions and evictions", "Requests preempted for lack of blocks; prefix "
              "blocks evicted.",
              [Target(f"sum by (worker) ({rate('tandem_num_preemptions_total')})",
                      "{{worker}} preemptions"),
               Target(f"sum by (worker) ({rate('tandem_prefix_cache_evictions_total')})",
                      "{{worker}} evictions")], "ops"),
    ])


def _transfer_row() -> Row:
    return Row("KV transfer", [
        Panel("Bandwidth", "KV bytes per second written (sent) and landed (received).",
              [Target(f"sum by (worker, direction) ({rate('tandem_kv_transfer_bytes_total')})",
                      "{{worker}} {{direction}}")], "Bps"),
        Panel("Transfer latency", "One write on the sender; a request's whole KV on the "
              "receiver.",
              quantiles("tandem_kv_transfer_latency_seconds", by="op", qs=(0.5, 0.99)), "s"),
        Panel("Failures by reason", "Transfer failures per second by where and reason.",
              [Target(f"sum by (where, reason) ({rate('tandem_kv_transfer_failures_total')})",
                      "{{where}}: {{reason}}")], "ops"),
        Panel("KV arrivals on decode", "Reservations whose KV completed or failed.",
              [Target(f"sum by (result) ({rate('tandem_decode_kv_arrivals_total')})",
                      "{{result}}")], "ops"),
    ])


def _fallback_row() -> Row:
    def per_worker(metric: str, legend: str) -> Target:
        return Target(f"sum by (worker) ({rate(metric)})", f"{{{{worker}}}} {legend}")

    def per_router(metric: str, legend: str) -> Target:
        return Target(f"sum by (instance) ({rate(metric)})", f"{{{{instance}}}} {legend}")

    return Row("Fallbacks", [
        Panel("Workers: Redis failures", "Registry heartbeats and prefix-index publishes that "
              "did not reach Redis. A worker whose heartbeats fail drops out of routing once "
              "its record expires.",
              [per_worker("tandem_registry_heartbeat_failures_total", "heartbeats"),
               per_worker("tandem_prefix_index_publish_failures_total", "publishes")], "ops"),
        Panel("Prefix index re-publishes", "Full-state publishes per worker over 10 minutes: "
              "one at start, then one each time Redis lost (or may have lost) its state.",
              [Target("sum by (worker) (increase(tandem_prefix_index_republishes_total[10m]))",
                      "{{worker}}")]),
        Panel("Router: index and registry", "Workers reloaded into the router's in-memory "
              "prefix index, syncs and registry listings Redis did not answer, index mode "
              "changes.",
              [per_router("tandem_router_prefix_tail_reloads_total", "tail reloads"),
               per_router("tandem_router_prefix_tail_sync_failures_total", "tail sync failures"),
               per_router("tandem_router_registry_list_failures_total", "registry failures"),
               per_router("tandem_router_index_mode_transitions_total", "mode changes")], "ops"),
        Panel("Prefill: failed pushes", "Prefills whose KV push failed, and prefills refused "
              "because the decode peer could not be (re)connected or was backing off.",
              [per_worker("tandem_prefill_transfer_failures_total", "push failures"),
               per_worker("tandem_prefill_connect_failures_total", "connect failures")], "ops"),
    ])


def rows() -> list[Row]:
    return [_service_row(), _router_row(), _prefill_row(), _decode_row(), _transfer_row(),
            _fallback_row()]


# ---- Grafana JSON ----------------------------------------------------------------------------

def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": panel_id, "type": panel.kind, "title": panel.title,
        "description": panel.description, "datasource": DATASOURCE,
        "gridPos": {"h": PANEL_H, "w": PANEL_W, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [{"datasource": DATASOURCE, "expr": t.expr, "legendFormat": t.legend,
                     "refId": chr(ord("A") + i)} for i, t in enumerate(panel.targets)],
    }
    if panel.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                            "values": False}, "colorMode": "background"}
        out["fieldConfig"]["defaults"]["thresholds"] = {
            "mode": "absolute", "steps": [{"color": "green", "value": None},
                                          {"color": "red", "value": 1}]}
    return out


def _templating() -> dict[str, Any]:
    return {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
        {"name": "ttft_slo", "label": "TTFT SLO (s)", "type": "custom",
         "query": ",".join(TTFT_SLO_OPTIONS),
         "current": {"text": TTFT_SLO_DEFAULT, "value": TTFT_SLO_DEFAULT},
         "options": [{"text": o, "value": o, "selected": o == TTFT_SLO_DEFAULT}
                     for o in TTFT_SLO_OPTIONS], "hide": 0},
    ]}


def build_dashboard() -> dict[str, Any]:
    """The whole dashboard as Grafana JSON."""
    panels: list[dict[str, Any]] = []
    panel_id, y = 1, 0
    for row in rows():
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y = panel_id + 1, y + 1
        for i, panel in enumerate(row.panels):
            x = (i % COLUMNS) * PANEL_W
            panels.append(_panel_json(panel, panel_id, x, y + (i // COLUMNS) * PANEL_H))
            panel_id += 1
        y += -(-len(row.panels) // COLUMNS) * PANEL_H
    return {
        "uid": UID, "title": TITLE, "tags": ["tandem", "llm-serving"],
        "description": "Generated by scripts/gen_dashboard.py from observability/dashboard.py;"
                       " do not edit by hand.",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "refresh": "30s", "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "timezone": "", "annotations": {"list": []}, "links": [],
        "templating": _templating(), "panels": panels,
    }


def render() -> str:
    """The dashboard file's exact text."""
    return json.dumps(build_dashboard(), indent=2, ensure_ascii=False) + "\n"


# ---- reading a dashboard back ----------------------------------------------------------------

def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows nest their panels


def dashboard_exprs(dashboard: Mapping[str, Any],
                    variables: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in `dashboard`, template variables (`$name`,
    `${name}`) replaced by `variables` (default: `DEFAULT_VARIABLES`)."""
    values = dict(DEFAULT_VARIABLES if variables is None else variables)

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"dashboard variable ${name} has no value for tests")
        return values[name]

    out = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, target["expr"])
            out.append((str(panel.get("title", "")), expr))
    return out
