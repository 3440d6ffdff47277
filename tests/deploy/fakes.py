"""A fake cluster's metrics: a router and two workers' registries fed by real stats objects.

No model, no network besides `/metrics`: the stats dataclasses are the real ones
(`EngineStats`, `BlockManagerStats`, `DecodeStats`, `PrefillStats`, `TransferStats`), filled
by `FakeCluster.traffic()` as a running cluster would fill them; the Redis fallback counts
(`IndexCounts`) are what a healthy worker reports: one full publish, at start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest

from decode_worker.worker import DecodeStats
from engine.block_manager import BlockManagerStats
from engine.engine import EngineStats
from kv_transfer.stats import TransferStats
from observability.metrics import (
    MetricsServer,
    RouterMetrics,
    serve_metrics,
)
from observability.metrics_worker import (
    IndexCounts,
    KVBlockCounts,
    RequestCounts,
    WorkerMetrics,
    WorkerSources,
)
from prefill_worker.worker import PrefillStats


@dataclass
class FakeWorker:
    role: str
    worker_id: str
    engine: EngineStats = field(default_factory=EngineStats)
    blocks: BlockManagerStats = field(default_factory=BlockManagerStats)
    transfer: TransferStats = field(default_factory=TransferStats)
    decode: DecodeStats = field(default_factory=DecodeStats)
    prefill: PrefillStats = field(default_factory=PrefillStats)
    used_blocks: int = 0
    total_blocks: int = 64
    running: int = 0
    waiting: int = 0
    index: IndexCounts = field(default_factory=lambda: IndexCounts(
        heartbeat_failures=0, publish_failures=0, republishes=1))
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        sources = WorkerSources(
            engine_stats=lambda: self.engine, block_stats=lambda: self.blocks,
            blocks=lambda: KVBlockCounts(self.used_blocks, self.total_blocks - self.used_blocks,
                                         self.total_blocks),
            requests=lambda: RequestCounts(self.running, self.waiting),
            transfer=self.transfer.snapshot,
            decode_stats=(lambda: self.decode) if self.role == "decode" else None,
            prefill_stats=(lambda: self.prefill) if self.role == "prefill" else None,
            index=lambda: self.index)
        self.metrics = WorkerMetrics(self.registry, self.role, self.worker_id, sources)


class FakeCluster:
    """A router and one prefill and one decode worker, each with its own registry."""

    def __init__(self) -> None:
        self.router_registry = CollectorRegistry()
        self.router = RouterMetrics(self.router_registry)
        self.prefill = FakeWorker("prefill", "prefill-1")
        self.decode = FakeWorker("decode", "decode-1")
        self.servers: list[MetricsServer] = []

    @property
    def registries(self) -> list[CollectorRegistry]:
        return [self.router_registry, self.prefill.registry, self.decode.registry]

    def expositions(self) -> dict[str, str]:
        """The `/metrics` text of each process, by process name."""
        return {name: generate_latest(r).decode() for name, r in zip(
            ("router", "prefill-1", "decode-1"), self.registries, strict=True)}

    def serve(self) -> list[str]:
        """Serves each registry on its own loopback port; returns the "host:port"s."""
        self.servers = [serve_metrics(r) for r in self.registries]
        return [s.address for s in self.servers]

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def sample_names(self) -> set[str]:
        """Every sample name the three processes export (`_bucket`, `_total` included)."""
        names: set[str] = set()
        for text in self.expositions().values():
            names |= {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                      if line and not line.startswith("#")}
        return names

    def traffic(self, requests: int = 4) -> None:
        """What `requests` requests of 40 prompt / 8 generated tokens leave in the metrics."""
        r, p, d = self.router, self.prefill, self.decode
        r.set_live_workers("prefill", 1)
        r.set_live_workers("decode", 1)
        for i in range(requests):
            r.request_started()
            r.queued(0.002)
            r.decision("kv_aware", "exact")
            r.prefix_lookup(hit_blocks=1, prompt_blocks=3)
            r.first_token(0.3 + 0.1 * i)
            for _ in range(7):
                r.inter_token(0.03)
            r.request_finished("length", 0.6 + 0.1 * i, prompt_tokens=40, generation_tokens=8,
                               cached_tokens=16, ttft_seconds=0.3 + 0.1 * i)
            p.engine.prefill_tokens_computed += 24
            p.blocks.prefix_queries_tokens += 40
            p.blocks.prefix_hit_tokens += 16
            p.prefill.requests += 1
            p.prefill.blocks_sent += 3
            p.transfer.record_write(3 * 4096, 0.004)
            p.metrics.step(0.05, num_prefill_tokens=24, num_decode_seqs=0, batch_size=1)
            d.decode.reservations += 1
            d.decode.transfers_completed += 1
            d.transfer.record_request(3 * 4096, 0.02)
            for _ in range(7):
                d.engine.decode_tokens_computed += 1
                d.engine.generated_tokens += 1
                d.metrics.step(0.02, num_prefill_tokens=0, num_decode_seqs=2, batch_size=2)
        r.request_started()
        r.request_finished("INVALID_ARGUMENT", 0.001)
        r.retry("kv_transfer")
        p.transfer.record_failure("write", "timeout")
        d.decode.local_prefills += 1
        d.used_blocks, d.running, p.waiting = 12, 2, 1
