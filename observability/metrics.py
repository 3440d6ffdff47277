"""Tandem's Prometheus metrics: names, buckets, the router's metrics, the `/metrics` server.

Names follow vLLM's and Dynamo's habits with a `tandem_` prefix and base units in the name
(`_seconds`, `_bytes`, `_total` for counters), so existing dashboards and habits carry over.
Each process builds its own `CollectorRegistry` (never the global default one), so tests can
build several in one process:

    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)          # the router; workers: observability.metrics_worker
    port = start_metrics_server(registry, "127.0.0.1", 0)

The router records request-level events as they happen (histograms, counters, gauges); its
fallback counters (prefix-tail reloads and failed syncs, failed registry listings, index mode
changes) are read at scrape time from the objects that keep them (`watch_fallbacks`). The
workers' metrics (`observability.metrics_worker.WorkerMetrics`) are read from their stats objects
at scrape time. All metric names are here or there; the dashboard
(`observability.dashboard`) and the alert rules (`deploy/prometheus/alerts.yaml`) use them,
and tests check that every name they use is exported. No torch import: the router uses this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# ---- buckets: wide enough for a CPU box (seconds per token) and a GPU (milliseconds) --------

TTFT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                  1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 60.0)
ITL_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
QUEUE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0, 10.0)
BATCH_TOKEN_BUCKETS = tuple(float(2**i) for i in range(16))  # 1 … 32768 tokens per step
BATCH_SEQ_BUCKETS = tuple(float(2**i) for i in range(11))  # 1 … 1024 sequences per step

# ---- label values known up front: exported at 0 so dashboards and alerts see a series ------

FINISH_OUTCOMES = ("stop", "length", "cancelled")
ERROR_OUTCOMES = ("CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                  "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                  "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")  # gRPC code names but OK
OUTCOMES = FINISH_OUTCOMES + ERROR_OUTCOMES
SUCCESS_OUTCOMES = ("stop", "length")  # what latency histograms of whole requests count
RETRY_REASONS = ("reserve", "prefill", "kv_transfer", "decode")
LOCAL_PREFILL_REASONS = ("aggregated", "short_prompt")  # why a request skipped the transfer
# why a request left its decode worker mid-generation (router/migration.py)
MIGRATION_REASONS = ("unreachable", "error", "ended", "stalled")
INDEX_MODES = ("exact", "degraded")
# why the router's in-memory index reloaded a worker (index.prefix_tail.RESYNC_REASONS; a test
# checks they agree)
TAIL_RESYNC_REASONS = ("new", "gap", "restart", "reset", "epoch")
ROLES = ("prefill", "decode", "aggregated")
# kv_transfer.base.FailureReason values and the `where` of TransferStats.record_failure; kept
# here as strings because kv_transfer imports torch (a test checks they agree).
TRANSFER_FAILURE_REASONS = ("timeout", "peer_lost", "handshake", "auth", "aborted", "protocol",
                            "backend", "closed")
TRANSFER_FAILURE_WHERE = ("write", "request", "handshake")

# The router's fallback counters: `RouterMetrics.watch_fallbacks` argument → (name, help).
ROUTER_FALLBACKS: Mapping[str, tuple[str, str]] = {
    "prefix_tail_reloads": ("tandem_router_prefix_tail_reloads", "Workers reloaded whole into "
                            "the router's in-memory prefix index: new worker, stream gap, "
                            "worker re-publish or Redis epoch change."),
    "prefix_tail_sync_failures": ("tandem_router_prefix_tail_sync_failures", "Syncs of the "
                                  "in-memory prefix index Redis did not answer."),
    "prefix_tail_drops": ("tandem_router_prefix_tail_drops", "Workers whose entries the "
                          "in-memory prefix index dropped: their registry heartbeat lapsed (or "
                          "discovery lost them)."),
    "registry_list_failures": ("tandem_router_registry_list_failures", "Worker registry "
                               "listings Redis did not answer (the router keeps routing to the "
                               "workers it knew)."),
    "index_mode_transitions": ("tandem_router_index_mode_transitions", "Changes of prefix "
                               "index mode (exact to degraded and back)."),
    "discovery_relists": ("tandem_router_discovery_relists", "Relists of the worker pods "
                          "forced by a watch answered 410 Gone (resourceVersion too old)."),
    "discovery_watch_drops": ("tandem_router_discovery_watch_drops", "Pod watches that failed "
                              "mid-stream and were resumed from the last resourceVersion."),
    "discovery_errors": ("tandem_router_discovery_errors", "Failed Kubernetes API calls of "
                         "worker discovery (the router keeps routing to the workers it knew)."),
    "discovery_forbidden": ("tandem_router_discovery_forbidden", "Kubernetes API calls of "
                            "worker discovery answered 403 Forbidden: the router's "
                            "ServiceAccount lacks get, list and watch on pods."),
}

WORKER_LABELS = ("worker", "role")


# ---- the router ------------------------------------------------------------------------------

class RouterMetrics:
    """Request-level metrics, recorded by the router as events happen."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests_received = Counter(
            "tandem_requests_received", "Requests that reached the router.", registry=r)
        self.requests = Counter(
            "tandem_requests", "Requests ended, by outcome: a finish reason (stop, length, "
            "cancelled) or the gRPC status code name of the error.", ["outcome"], registry=r)
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds", "Time from arrival at the router to the "
            "first token.", buckets=TTFT_BUCKETS_S, registry=r)
        self.itl = Histogram(
            "tandem_inter_token_latency_seconds", "Time between two streamed tokens of a "
            "request.", buckets=ITL_BUCKETS_S, registry=r)
        self.tpot = Histogram(
            "tandem_time_per_output_token_seconds", "Per request: (end-to-end - TTFT) / "
            "(generated tokens - 1), for requests that finished with stop or length.",
            buckets=ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram(
            "tandem_e2e_request_latency_seconds", "Arrival to last token, for requests that "
            "finished with stop or length.", buckets=E2E_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter(
            "tandem_prompt_tokens", "Prompt tokens of ended requests.", registry=r)
        self.generation_tokens = Counter(
            "tandem_generation_tokens", "Tokens generated for ended requests.", registry=r)
        self.cached_tokens = Counter(
            "tandem_prompt_tokens_cached", "Prompt tokens of ended requests that the prefill "
            "worker took from its prefix cache.", registry=r)
        self.queue_time = Histogram(
            "tandem_router_queue_time_seconds", "Time a request waited for an admission slot.",
            buckets=QUEUE_BUCKETS_S, registry=r)
        self.queue_depth = Gauge(
            "tandem_router_queue_depth", "Requests waiting for an admission slot.", registry=r)
        self.inflight = Gauge(
            "tandem_router_inflight_requests", "Requests holding an admission slot (routed "
            "or streaming).", registry=r)
        self.retries = Counter(
            "tandem_router_retries", "Attempts that failed before the first token and were "
            "retried on another worker pair, by the hop that failed.", ["reason"], registry=r)
        self.migrations = Counter(
            "tandem_router_migrations", "Requests moved to another worker pair mid-generation "
            "(re-prefilled with the tokens so far), by why the decode stream was lost.",
            ["reason"], registry=r)
        self.local_prefills = Counter(
            "tandem_router_local_prefills", "Requests prefilled on their decode worker with no "
            "prefill worker and no transfer: routed to an aggregated worker, or a short prompt "
            "(uncached part at most local_prefill_max_tokens).", ["reason"], registry=r)
        self.decisions = Counter(
            "tandem_router_decisions", "Routing decisions, by policy and prefix index mode.",
            ["policy", "mode"], registry=r)
        self.index_mode = Gauge(
            "tandem_router_index_mode", "1 for the prefix index mode the router is in "
            "(exact or degraded), 0 for the other.", ["mode"], registry=r)
        self.degraded = Gauge(
            "tandem_router_degraded", "1 while the prefix index is unavailable and the router "
            "routes by load alone.", registry=r)
        self.prefix_hit_blocks = Counter(
            "tandem_router_prefix_hit_blocks", "Prompt blocks the chosen prefill worker held "
            "in its prefix cache, per the index.", registry=r)
        self.prefix_query_blocks = Counter(
            "tandem_router_prefix_query_blocks", "Prompt blocks looked up in the prefix index.",
            registry=r)
        self.live_workers = Gauge(
            "tandem_router_live_workers", "Workers the router can route to, by role.", ["role"],
            registry=r)
        self.auth_failures = Counter(
            "tandem_router_auth_failures", "Public API calls refused for a missing or wrong "
            "bearer token, by API (grpc or http).", ["api"], registry=r)
        self.stale_index_routes = Counter(
            "tandem_router_stale_index_routes", "Routes whose worker held fewer leading prompt "
            "blocks than the prefix index predicted (its Reserve or Prefill reply said so), by "
            "the worker's role in the route.", ["role"], registry=r)
        self._fallbacks = _FallbackCounters()
        r.register(self._fallbacks)
        self._resyncs = _ResyncCounters()
        r.register(self._resyncs)
        for role in ("prefill", "decode"):
            self.stale_index_routes.labels(role)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for reason in RETRY_REASONS:
            self.retries.labels(reason)
        for reason in LOCAL_PREFILL_REASONS:
            self.local_prefills.labels(reason)
        for reason in MIGRATION_REASONS:
            self.migrations.labels(reason)
        for role in ROLES:
            self.live_workers.labels(role)
        for api in ("grpc", "http"):
            self.auth_failures.labels(api)
        self.set_index_mode("exact")

    # -- events --

    def request_started(self) -> None:
        self.requests_received.inc()

    def queued(self, seconds: float) -> None:
        """Time the request waited for its admission slot (0 when one was free)."""
        self.queue_time.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def request_finished(self, outcome: str, e2e_seconds: float, prompt_tokens: int = 0,
                         generation_tokens: int = 0, cached_tokens: int = 0,
                         ttft_seconds: float | None = None) -> None:
        """Once per request, whatever ended it. `outcome`: "stop", "length", "cancelled" or a
        gRPC code name ("INVALID_ARGUMENT"); anything else is counted as "UNKNOWN"."""
        outcome = outcome if outcome in OUTCOMES else "UNKNOWN"
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(max(prompt_tokens, 0))
        self.generation_tokens.inc(max(generation_tokens, 0))
        self.cached_tokens.inc(max(cached_tokens, 0))
        if outcome in SUCCESS_OUTCOMES:
            self.e2e.observe(e2e_seconds)
            if ttft_seconds is not None and generation_tokens > 1:
                self.tpot.observe(max(e2e_seconds - ttft_seconds, 0.0) / (generation_tokens - 1))

    def retry(self, reason: str) -> None:
        """`reason`: the hop that failed: "reserve", "prefill", "kv_transfer" or "decode"."""
        self.retries.labels(reason.lower().replace(" ", "_")).inc()

    def migration(self, reason: str) -> None:
        """`reason`: one of MIGRATION_REASONS."""
        self.migrations.labels(reason).inc()

    def local_prefill(self, reason: str) -> None:
        """`reason`: "aggregated" or "short_prompt" (LOCAL_PREFILL_REASONS)."""
        self.local_prefills.labels(reason).inc()

    def decision(self, policy: str, mode: str) -> None:
        self.decisions.labels(policy, str(mode)).inc()

    def stale_index_route(self, role: str) -> None:
        """A route's `role` ("prefill" or "decode") worker held fewer blocks than predicted."""
        self.stale_index_routes.labels(role).inc()

    def prefix_lookup(self, hit_blocks: int, prompt_blocks: int) -> None:
        self.prefix_hit_blocks.inc(max(hit_blocks, 0))
        self.prefix_query_blocks.inc(max(prompt_blocks, 0))

    # -- gauges, set as they change --

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def set_inflight(self, n: int) -> None:
        self.inflight.set(n)

    def set_index_mode(self, mode: str) -> None:
        """`mode`: "exact" or "degraded" (`router.prefix.IndexMode` is a StrEnum of those)."""
        mode = str(mode)
        if mode not in INDEX_MODES:
            raise ValueError(f"mode: {mode!r} is not one of {INDEX_MODES}")
        for name in INDEX_MODES:
            self.index_mode.labels(name).set(1.0 if name == mode else 0.0)
        self.degraded.set(1.0 if mode == "degraded" else 0.0)

    def set_live_workers(self, role: str, n: int) -> None:
        self.live_workers.labels(role).set(n)

    # -- or gauges read at scrape time --

    def watch(self, queue_depth: Callable[[], float] | None = None,
              inflight: Callable[[], float] | None = None,
              index_mode: Callable[[], str] | None = None,
              live_workers: Callable[[], Mapping[str, int]] | None = None) -> None:
        """Reads the gauges from these callables at every scrape instead of `set_*` calls.

        `live_workers` returns {role: count}; `index_mode` returns "exact" or "degraded".
        """
        if queue_depth is not None:
            self.queue_depth.set_function(queue_depth)
        if inflight is not None:
            self.inflight.set_function(inflight)
        if index_mode is not None:
            for name in INDEX_MODES:
                self.index_mode.labels(name).set_function(_is_mode(index_mode, name))
            self.degraded.set_function(_is_mode(index_mode, "degraded"))
        if live_workers is not None:
            for role in ROLES:
                self.live_workers.labels(role).set_function(_count_of(live_workers, role))

    def watch_fallbacks(self, prefix_tail_reloads: Callable[[], float] | None = None,
                        prefix_tail_sync_failures: Callable[[], float] | None = None,
                        prefix_tail_drops: Callable[[], float] | None = None,
                        registry_list_failures: Callable[[], float] | None = None,
                        index_mode_transitions: Callable[[], float] | None = None,
                        discovery_relists: Callable[[], float] | None = None,
                        discovery_watch_drops: Callable[[], float] | None = None,
                        discovery_errors: Callable[[], float] | None = None,
                        discovery_forbidden: Callable[[], float] | None = None) -> None:
        """Reads the fallback counters from these callables at every scrape (each a count
        since start kept by its owner: `PrefixIndexTail.reloads` and `.sync_failures`,
        `WorkerRegistry.list_failures`, `PrefixLookup.transitions`, `PodWatcher.relists`,
        `.watch_drops`, `.errors` and `.forbidden`). Unwatched ones are exported as 0: a
        router without the tail never reloads it."""
        sources = {"prefix_tail_reloads": prefix_tail_reloads,
                   "prefix_tail_sync_failures": prefix_tail_sync_failures,
                   "prefix_tail_drops": prefix_tail_drops,
                   "registry_list_failures": registry_list_failures,
                   "index_mode_transitions": index_mode_transitions,
                   "discovery_relists": discovery_relists,
                   "discovery_watch_drops": discovery_watch_drops,
                   "discovery_errors": discovery_errors,
                   "discovery_forbidden": discovery_forbidden}
        self._fallbacks.sources.update({k: v for k, v in sources.items() if v is not None})

    def watch_resyncs(self, resyncs: Callable[[], Mapping[str, int]]) -> None:
        """Reads `PrefixIndexTail.resyncs` ({reason: count}) at every scrape."""
        self._resyncs.source = resyncs


class _FallbackCounters(Collector):
    """The router's fallback counters, read at scrape time (`RouterMetrics.watch_fallbacks`)."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], float]] = {}

    def collect(self) -> Iterator[Metric]:
        for key, (name, doc) in ROUTER_FALLBACKS.items():
            source = self.sources.get(key)
            family = CounterMetricFamily(name, doc)
            family.add_metric([], float(source()) if source is not None else 0.0)
            yield family


class _ResyncCounters(Collector):
    """Workers the in-memory prefix index reloaded, by reason (`watch_resyncs`); every reason
    exported, at 0 without the tail."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        counts = self.source() if self.source is not None else {}
        family = CounterMetricFamily(
            "tandem_router_prefix_tail_resyncs", "Workers reloaded whole into the router's "
            "in-memory prefix index from their snapshot, by reason: new (first seen), gap (a "
            "sequence number skipped), restart (a new worker incarnation), reset (the worker "
            "re-published), epoch (Redis lost its data).", labels=["reason"])
        for reason in TAIL_RESYNC_REASONS:
            family.add_metric([reason], float(counts.get(reason, 0)))
        yield family


def _is_mode(mode: Callable[[], str], name: str) -> Callable[[], float]:
    return lambda: 1.0 if str(mode()) == name else 0.0


def _count_of(counts: Callable[[], Mapping[str, int]], key: str) -> Callable[[], float]:
    return lambda: float(counts().get(key, 0))


# ---- serving /metrics ------------------------------------------------------------------------

class MetricsServer:
    """A running `/metrics` HTTP server on a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1",
                 port: int = 0, certfile: str | None = None,
                 keyfile: str | None = None) -> None:
        # https when given a certificate (no client certificate asked)
        self._httpd, self._thread = start_http_server(port, host, registry, certfile=certfile,
                                                      keyfile=keyfile)
        self.host = host
        self.port: int = self._httpd.server_address[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)


def serve_metrics(registry: CollectorRegistry, host: str = "127.0.0.1",
                  port: int = 0, certfile: str | None = None,
                  keyfile: str | None = None) -> MetricsServer:
    """Serves `registry` on http://host:port/metrics (port 0: a free one); https with
    `certfile` and `keyfile` (PEM)."""
    return MetricsServer(registry, host, port, certfile, keyfile)


def start_metrics_server(registry: CollectorRegistry, host: str = "127.0.0.1",
                         port: int = 0) -> int:
    """Serves `registry` on http://host:port/metrics for the life of the process; returns the
    bound port (port 0 picks a free one)."""
    return serve_metrics(registry, host, port).port
