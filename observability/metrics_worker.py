"""A prefill or decode worker's metrics: its stats objects read at scrape time, step histograms.

    metrics = WorkerMetrics(registry, "decode", worker_id, WorkerSources.from_engine(
        runtime.engine, transfer=runtime.agent.stats.snapshot, decode=lambda: worker.stats))
    metrics.step(seconds, num_prefill_tokens, num_decode_seqs, batch_size)  # engine thread

A worker's counters and gauges already live in plain stats objects (`EngineStats`,
`BlockManagerStats`, `DecodeStats`, `PrefillStats`, `TransferStats`, and the Redis fallbacks
as `IndexCounts`: failed heartbeats, failed and full prefix-index publishes): a custom
collector reads them at every scrape (counters as Prometheus counters, the transfer histograms
as cumulative histograms), so the services keep no extra bookkeeping. Every series carries
`worker` and `role` labels. The stats objects are read through Protocols: no service (nor
torch) import.
Names, buckets and shared label values live in `observability.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from observability.metrics import (
    BATCH_SEQ_BUCKETS,
    BATCH_TOKEN_BUCKETS,
    ROLES,
    STEP_BUCKETS_S,
    TRANSFER_FAILURE_REASONS,
    TRANSFER_FAILURE_WHERE,
    WORKER_LABELS,
)

log = logging.getLogger(__name__)


# ---- the workers: what the stats objects look like (duck-typed, no service imports) ------

class EngineStatsLike(Protocol):
    """`engine.engine.EngineStats`."""

    steps: int
    prefill_tokens_computed: int
    decode_tokens_computed: int
    generated_tokens: int
    preemptions: int


class BlockManagerStatsLike(Protocol):
    """`engine.block_manager.BlockManagerStats`."""

    prefix_queries_tokens: int
    prefix_hit_tokens: int
    hash_collisions: int
    evictions: int


class DecodeStatsLike(Protocol):
    """`decode_worker.worker.DecodeStats`."""

    reservations: int
    lease_expiries: int
    local_prefills: int
    routed_prefills: int
    transfers_completed: int
    transfers_failed: int
    cached_prompt_tokens: int


class PrefillStatsLike(Protocol):
    """`prefill_worker.worker.PrefillStats`."""

    requests: int
    blocks_sent: int
    transfer_failures: int
    connect_failures: int


class IndexCounts(NamedTuple):
    """A worker's Redis fallbacks so far (`index.registry.Heartbeat.failures`,
    `index.prefix_index.PrefixIndexWriter.publish_failures` and `.republishes`)."""

    heartbeat_failures: int
    publish_failures: int
    republishes: int


class KVBlockCounts(NamedTuple):
    used: int
    free: int
    total: int


class RequestCounts(NamedTuple):
    running: int
    waiting: int


class _BlockManagerLike(Protocol):
    @property
    def stats(self) -> BlockManagerStatsLike: ...
    @property
    def num_used_blocks(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...


class _SchedulerLike(Protocol):
    @property
    def running(self) -> Any: ...  # sized
    @property
    def waiting(self) -> Any: ...  # sized


class EngineLike(Protocol):
    """What `WorkerSources.from_engine` reads of an `engine.engine.Engine`."""

    @property
    def stats(self) -> EngineStatsLike: ...
    @property
    def block_manager(self) -> _BlockManagerLike: ...
    @property
    def scheduler(self) -> _SchedulerLike: ...
    @property
    def num_blocks(self) -> int: ...


@dataclass(frozen=True)
class WorkerSources:
    """Callables the worker collector reads at every scrape; any may be None (not exported).

    They run on the metrics server's thread: they must be cheap and must not block on the
    engine thread (reading ints and `len()` of the engine's containers is fine under the GIL,
    as `WorkerRuntime.load` does).
    """

    engine_stats: Callable[[], EngineStatsLike] | None = None
    block_stats: Callable[[], BlockManagerStatsLike] | None = None
    blocks: Callable[[], KVBlockCounts] | None = None
    requests: Callable[[], RequestCounts] | None = None
    decode_stats: Callable[[], DecodeStatsLike] | None = None
    prefill_stats: Callable[[], PrefillStatsLike] | None = None
    transfer: Callable[[], Mapping[str, Any]] | None = None  # TransferStats.snapshot
    index: Callable[[], IndexCounts] | None = None

    @classmethod
    def from_engine(cls, engine: EngineLike,
                    transfer: Callable[[], Mapping[str, Any]] | None = None,
                    decode: Callable[[], DecodeStatsLike] | None = None,
                    prefill: Callable[[], PrefillStatsLike] | None = None,
                    index: Callable[[], IndexCounts] | None = None) -> WorkerSources:
        """Sources reading an `Engine` (stats, blocks, scheduler) plus the role's stats and
        the Redis fallbacks."""
        bm = engine.block_manager
        return cls(
            engine_stats=lambda: engine.stats,
            block_stats=lambda: bm.stats,
            blocks=lambda: KVBlockCounts(bm.num_used_blocks, bm.num_free_blocks,
                                         engine.num_blocks),
            requests=lambda: RequestCounts(len(engine.scheduler.running),
                                           len(engine.scheduler.waiting)),
            decode_stats=decode, prefill_stats=prefill, transfer=transfer, index=index)


class WorkerMetrics:
    """A prefill or decode worker's metrics: stats read at scrape time, step histograms."""

    def __init__(self, registry: CollectorRegistry, role: str, worker_id: str,
                 sources: WorkerSources | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role: {role!r} is not one of {ROLES}")
        self.role = role
        self.worker_id = worker_id
        labels = (worker_id, role)
        self._step = Histogram(
            "tandem_step_duration_seconds", "Duration of one engine step (schedule, forward, "
            "sample).", WORKER_LABELS, buckets=STEP_BUCKETS_S, registry=registry,
        ).labels(*labels)
        self._prefill_tokens = Histogram(
            "tandem_prefill_batch_tokens", "Prompt tokens computed in one engine step (steps "
            "with any).", WORKER_LABELS, buckets=BATCH_TOKEN_BUCKETS, registry=registry,
        ).labels(*labels)
        self._batch_size = Histogram(
            "tandem_step_batch_size", "Sequences in one engine step.", WORKER_LABELS,
            buckets=BATCH_SEQ_BUCKETS, registry=registry).labels(*labels)
        self._decode_batch = Histogram(
            "tandem_decode_batch_size", "Sequences decoding one token in one engine step "
            "(steps with any).", WORKER_LABELS, buckets=BATCH_SEQ_BUCKETS, registry=registry,
        ).labels(*labels)
        registry.register(_WorkerCollector(labels, sources or WorkerSources()))

    def step(self, seconds: float, num_prefill_tokens: int, num_decode_seqs: int,
             batch_size: int) -> None:
        """After every engine step that ran a batch (engine thread; thread-safe)."""
        self._step.observe(seconds)
        if batch_size > 0:
            self._batch_size.observe(batch_size)
        if num_prefill_tokens > 0:
            self._prefill_tokens.observe(num_prefill_tokens)
        if num_decode_seqs > 0:
            self._decode_batch.observe(num_decode_seqs)


class _Families:
    """Builds metric families that all carry the worker's `worker` and `role` labels."""

    def __init__(self, labels: tuple[str, str]) -> None:
        self.labels = list(labels)

    def counter(self, name: str, doc: str, value: float | Mapping[tuple[str, ...], float],
                extra: tuple[str, ...] = ()) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=[*WORKER_LABELS, *extra])
        values = value if isinstance(value, Mapping) else {(): value}
        for extra_values, v in values.items():
            family.add_metric([*self.labels, *extra_values], v)
        return family

    def gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(WORKER_LABELS))
        family.add_metric(self.labels, value)
        return family


class _WorkerCollector(Collector):
    """Reads the worker's stats objects at scrape time."""

    def __init__(self, labels: tuple[str, str], sources: WorkerSources) -> None:
        self.f = _Families(labels)
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self.sources
        parts: list[tuple[str, Callable[[], Iterable[Metric]]]] = [
            ("engine_stats", self._engine), ("block_stats", self._block_stats),
            ("blocks", self._blocks), ("requests", self._requests),
            ("decode_stats", self._decode), ("prefill_stats", self._prefill),
            ("transfer", self._transfer), ("index", self._index)]
        for name, part in parts:
            if getattr(s, name) is None:
                continue
            try:
                families = list(part())
            except Exception:  # one broken source must not fail the whole scrape
                log.warning("metrics: reading %s failed; its series are left out", name,
                            exc_info=True)
                continue
            yield from families

    def _engine(self) -> Iterator[Metric]:
        assert self.sources.engine_stats is not None
        e = self.sources.engine_stats()
        f = self.f
        yield f.counter("tandem_engine_steps_total", "Engine steps that ran a batch.", e.steps)
        yield f.counter("tandem_prompt_tokens_computed_total", "Prompt (and recomputed) tokens "
                        "run through the model.", e.prefill_tokens_computed)
        yield f.counter("tandem_decode_tokens_computed_total", "Decode tokens run through the "
                        "model.", e.decode_tokens_computed)
        yield f.counter("tandem_engine_generated_tokens_total", "Tokens sampled by the engine.",
                        e.generated_tokens)
        yield f.counter("tandem_num_preemptions_total", "Requests preempted for lack of KV "
                        "blocks.", e.preemptions)

    def _block_stats(self) -> Iterator[Metric]:
        assert self.sources.block_stats is not None
        b = self.sources.block_stats()
        f = self.f
        yield f.counter("tandem_prefix_cache_query_tokens_total", "Prompt tokens looked up in "
                        "the worker's prefix cache.", b.prefix_queries_tokens)
        yield f.counter("tandem_prefix_cache_hit_tokens_total", "Of those, tokens found "
                        "cached (not computed).", b.prefix_hit_tokens)
        yield f.counter("tandem_prefix_cache_hash_collisions_total", "Block hash hits whose "
                        "tokens differed (counted as misses).", b.hash_collisions)
        yield f.counter("tandem_prefix_cache_evictions_total", "Cached blocks evicted.",
                        b.evictions)

    def _blocks(self) -> Iterator[Metric]:
        assert self.sources.blocks is not None
        c = self.sources.blocks()
        f = self.f
        yield f.gauge("tandem_kv_blocks_used", "KV cache blocks held by requests.", c.used)
        yield f.gauge("tandem_kv_blocks_free", "KV cache blocks free (including evictable "
                      "prefix-cached ones).", c.free)
        yield f.gauge("tandem_kv_blocks_capacity", "KV cache blocks in all.", c.total)
        yield f.gauge("tandem_kv_cache_usage_ratio", "Used / all KV cache blocks (0 to 1).",
                      c.used / c.total if c.total else 0.0)

    def _requests(self) -> Iterator[Metric]:
        assert self.sources.requests is not None
        c = self.sources.requests()
        yield self.f.gauge("tandem_num_requests_running", "Requests in the running batch.",
                           c.running)
        yield self.f.gauge("tandem_num_requests_waiting", "Requests waiting to be scheduled.",
                           c.waiting)

    def _decode(self) -> Iterator[Metric]:
        assert self.sources.decode_stats is not None
        d = self.sources.decode_stats()
        f = self.f
        yield f.counter("tandem_decode_reservations_total", "KV block reservations made for "
                        "prompts a prefill worker will send.", d.reservations)
        yield f.counter("tandem_lease_expiries_total", "Reservations released because their "
                        "lease ended before decoding started.", d.lease_expiries)
        yield f.counter("tandem_local_prefill_fallbacks_total", "Requests whose KV did not "
                        "arrive and were prefilled on the decode worker.", d.local_prefills)
        yield f.counter("tandem_decode_routed_prefills_total", "Prompts the router sent to "
                        "this worker to prefill itself, no transfer (an aggregated worker, or "
                        "a short uncached prompt).", d.routed_prefills)
        yield f.counter("tandem_decode_kv_arrivals_total", "Reservations whose KV transfer "
                        "completed or failed.", {("completed",): d.transfers_completed,
                                                  ("failed",): d.transfers_failed},
                        extra=("result",))
        yield f.counter("tandem_decode_cached_prompt_tokens_total", "Prompt tokens the decode "
                        "worker already held (not sent).", d.cached_prompt_tokens)

    def _prefill(self) -> Iterator[Metric]:
        assert self.sources.prefill_stats is not None
        p = self.sources.prefill_stats()
        f = self.f
        yield f.counter("tandem_prefill_requests_total", "Prefill requests accepted.",
                        p.requests)
        yield f.counter("tandem_prefill_blocks_sent_total", "KV blocks pushed to decode "
                        "workers.", p.blocks_sent)
        yield f.counter("tandem_prefill_transfer_failures_total", "Prefills whose KV push "
                        "failed.", p.transfer_failures)
        yield f.counter("tandem_prefill_connect_failures_total", "Prefills refused because "
                        "the decode peer could not be (re)connected, or was backing off after "
                        "a failed connect.", p.connect_failures)

    def _index(self) -> Iterator[Metric]:
        assert self.sources.index is not None
        c = self.sources.index()
        f = self.f
        yield f.counter("tandem_registry_heartbeat_failures_total", "Registry heartbeats that "
                        "did not reach Redis (the worker drops out of routing once its record "
                        "expires).", c.heartbeat_failures)
        yield f.counter("tandem_prefix_index_publish_failures_total", "Prefix-index publishes "
                        "(and epoch checks between them) Redis did not answer; the worker "
                        "re-publishes its whole state once it answers.", c.publish_failures)
        yield f.counter("tandem_prefix_index_republishes_total", "Full prefix-index state "
                        "publishes: one at start, then one each time Redis lost (or may have "
                        "lost) the worker's state.", c.republishes)

    def _transfer(self) -> Iterator[Metric]:
        assert self.sources.transfer is not None
        t = self.sources.transfer()
        f = self.f
        yield f.counter("tandem_kv_transfer_bytes_total", "KV bytes written to peers (sent) "
                        "or landed from peers (received).",
                        {("sent",): t["bytes_sent"], ("received",): t["bytes_received"]},
                        extra=("direction",))
        yield f.counter("tandem_kv_transfer_writes_total", "KV writes completed.",
                        t["writes_done"])
        yield f.counter("tandem_kv_transfer_requests_total", "Requests whose KV arrived "
                        "completely.", t["requests_completed"])
        yield f.counter("tandem_kv_transfer_peers_connected_total", "Peer connections made.",
                        t["peers_connected"])
        failures: dict[tuple[str, ...], float] = {
            (w, r): 0.0 for w in TRANSFER_FAILURE_WHERE for r in TRANSFER_FAILURE_REASONS}
        for key, count in t["failures"].items():
            where, _, reason = str(key).partition(":")
            label = (where, reason or "unknown")
            failures[label] = failures.get(label, 0.0) + count
        yield f.counter("tandem_kv_transfer_failures_total", "KV transfer failures by where "
                        "(write, request, handshake) and reason.", failures,
                        extra=("where", "reason"))
        latency = HistogramMetricFamily(
            "tandem_kv_transfer_latency_seconds", "KV transfer latency: one write on the "
            "sender (op=write), a whole request's KV on the receiver (op=request).",
            labels=[*WORKER_LABELS, "op"])
        for op in ("write", "request"):
            h = t[f"{op}_latency"]
            latency.add_metric([*f.labels, op], _cumulative(h["bounds"], h["counts"]),
                               float(h["sum"]))
        yield latency


def _cumulative(bounds: Iterable[float], counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one above every bound) → Prometheus cumulative buckets."""
    buckets, total = [], 0
    bounds = list(bounds)
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"counts: {len(counts)} buckets for {len(bounds)} bounds")
    for bound, count in zip(bounds, counts, strict=False):
        total += count
        buckets.append((floatToGoString(bound), float(total)))
    buckets.append(("+Inf", float(total + counts[-1])))
    return buckets
