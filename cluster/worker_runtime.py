"""What a prefill or decode worker process is made of, besides its gRPC servicer.

The engine on its own thread (`EngineLoop`), the KV transfer agent registered on the engine's
cache, the gRPC server (health, reflection, error mapping; the internal services answer only
callers with the cluster secret, `cluster.cluster_secret`), and — when a Redis URL is given —
the registry heartbeat and the prefix-index writer fed by the block manager's events. The
engine thread polls the transfer agent and drains block events between steps and hands them
to the event loop; nothing here blocks the loop. While transfers are in flight
(`agent.in_flight()`) it polls every `transfer_poll_interval_s`, also between the layers of a
step (when the role has a layer hook) and while the engine is idle, so a write that lands is
seen within that interval rather than after the next step or the idle wait; otherwise the engine
thread waits for a command, a control-link event (a sender announcing a write, a peer lost:
`agent.set_wakeup`), the agent's next deadline (`agent.next_deadline()`) or the idle wait
(`WorkerConfig.idle_wait_s`), whichever comes first; no step of a request waits for that last
one (tests/e2e/test_idle_wait.py). Its
background tasks (the index writer, the engine watch) are kept in `BackgroundTasks`: failures
logged, cancelled and awaited on close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from cluster import cluster_secret
from cluster.background import BackgroundTasks
from cluster.grpc_server import ServiceBinding
from cluster.process import ProcessOptions, serve_until_stopped
from cluster.worker_config import WorkerConfig
from engine.block_manager import BlockEvent
from engine.engine import Engine, StepLayerCallback
from engine.engine_loop import EngineLoop, build_engine
from engine.scheduler import ScheduledBatch
from index.prefix_index import PrefixIndexWriter
from index.redis_client import check_auth, connect
from index.registry import Heartbeat, LoadReport, WorkerRecord, WorkerRegistry
from kv_transfer.base import KVTransferAgent, TransferEvent
from kv_transfer.registry import create_agent
from kv_transfer.spec import KVLayoutSpec
from observability.metrics_worker import IndexCounts, WorkerMetrics, WorkerSources

log = logging.getLogger(__name__)


class WorkerRuntime:
    """Builds and runs one worker process's parts; the role adds its servicer."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = config.id
        self.engine = build_engine(config.model, config.engine)  # not on this thread: see there
        spec = KVLayoutSpec.from_cache_shape(self.engine.cache_shape, self.engine.model_id,
                                             self.engine.device)
        self.agent: KVTransferAgent = create_agent(spec, config.transfer_config())
        self.agent.register_cache(self.engine.runner.kv_cache)
        self.loop: EngineLoop | None = None
        self.writer: PrefixIndexWriter | None = None
        self.heartbeat: Heartbeat | None = None
        self.started_ms = int(time.time() * 1000)
        self.address = ""  # host:port peers dial, known once serving
        self.registry = CollectorRegistry()
        self.queued_prompt_blocks = 0  # set by the engine thread between steps
        self._last_poll = 0.0  # engine thread: time.monotonic() of the last agent.poll()
        self._aio: asyncio.AbstractEventLoop | None = None
        self._transfer_listeners: list[Callable[[list[TransferEvent]], None]] = []
        self.tasks = BackgroundTasks(f"{config.role.value} worker {self.worker_id}")
        self._stopping = asyncio.Event()

    # ---- wiring --------------------------------------------------------------------------

    def on_transfer_events(self, listener: Callable[[list[TransferEvent]], None]) -> None:
        """`listener` runs on the event loop with every batch of transfer events."""
        self._transfer_listeners.append(listener)

    def start_engine(self, on_layer_done: StepLayerCallback | None = None) -> EngineLoop:
        """Starts the engine thread; `on_layer_done` (the role's, engine thread) runs as each
        layer of a step is cached, followed by a poll of the transfer agent when one is due."""
        self._aio = asyncio.get_running_loop()
        hook: StepLayerCallback | None = None
        if on_layer_done is not None:
            role_hook = on_layer_done

            def hook(layer: int, batch: ScheduledBatch) -> None:
                role_hook(layer, batch)
                if self.agent.in_flight() and time.monotonic() - self._last_poll >= \
                        self.config.transfer_poll_interval_s:
                    self._poll_transfer()

        self.loop = EngineLoop(self.engine, on_layer_done=hook, on_idle=self._on_idle,
                               step_delay_s=self.config.step_delay_s,
                               idle_wait_s=self.config.idle_wait_s)
        self.agent.set_wakeup(self.loop.wake)
        self.loop.start()
        return self.loop

    def _on_idle(self, engine: Engine) -> float | None:
        """Engine thread, between steps: drive the transfer agent, hand off block events; asks
        to be called again within the poll interval while transfers are in flight."""
        assert self._aio is not None
        self.queued_prompt_blocks = engine.num_queued_prompt_blocks()
        self._poll_transfer()
        block_events = engine.block_manager.drain_events()
        if block_events and self.writer is not None:
            self._aio.call_soon_threadsafe(self._publish_blocks, block_events)
        if self.agent.in_flight():
            return self.config.transfer_poll_interval_s
        deadline = self.agent.next_deadline()  # a request's KV deadline, a lost sender's grace
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    def _poll_transfer(self) -> None:
        """Engine thread: one `agent.poll()`, its events handed to the event loop."""
        assert self._aio is not None
        self._last_poll = time.monotonic()
        events = self.agent.poll()
        if events:
            self._aio.call_soon_threadsafe(self._dispatch_transfer, events)

    def _dispatch_transfer(self, events: list[TransferEvent]) -> None:
        for listener in self._transfer_listeners:
            listener(events)

    def _publish_blocks(self, events: list[BlockEvent]) -> None:
        assert self.writer is not None
        for event in events:
            if event.kind == "stored":
                self.writer.stored([event.block_hash])
            else:
                self.writer.evicted([event.block_hash])

    def attach_metrics(self, decode: Callable[[], Any] | None = None,
                       prefill: Callable[[], Any] | None = None) -> WorkerMetrics:
        """Builds this worker's metrics (read from the engine, transfer and role stats at
        scrape time) and records every engine step. Call after `start_engine`."""
        assert self.loop is not None
        metrics = WorkerMetrics(self.registry, self.config.role.value, self.worker_id,
                                WorkerSources.from_engine(self.engine,
                                                          transfer=self.agent.stats.snapshot,
                                                          decode=decode, prefill=prefill,
                                                          index=self.index_counts))
        self.loop.on_step = lambda step: metrics.step(step.seconds, step.prefill_tokens,
                                                      step.decode_seqs, step.batch_size)
        return metrics

    def index_counts(self) -> IndexCounts:
        """The Redis fallbacks so far: failed heartbeats, failed and full publishes (zeros
        when this worker runs without Redis)."""
        writer, heartbeat = self.writer, self.heartbeat
        return IndexCounts(
            heartbeat_failures=heartbeat.failures if heartbeat is not None else 0,
            publish_failures=writer.publish_failures if writer is not None else 0,
            republishes=writer.republishes if writer is not None else 0)

    def load(self) -> LoadReport:
        """Approximate, lock-free read of the engine's load (ints read from another thread)."""
        engine = self.engine
        return LoadReport(
            running=len(engine.scheduler.running),
            waiting=len(engine.scheduler.waiting),
            kv_blocks_used=engine.block_manager.num_used_blocks,
            kv_blocks_total=engine.num_blocks,
            queued_prompt_blocks=self.queued_prompt_blocks,
            max_running=engine.config.max_num_seqs)

    # ---- running -------------------------------------------------------------------------

    async def serve(self, services: Sequence[ServiceBinding]) -> None:
        """Serves `services` (see `cluster.process`): registers with Redis once serving,
        deregisters first when stopping; a dead engine stops the process."""
        cfg = self.config

        async def started(address: str) -> None:
            self.address = address
            if cfg.redis_url:
                redis_cfg = cfg.redis_config()
                redis = connect(redis_cfg)
                await check_auth(redis, redis_cfg)  # a refused password ends the worker
                self.writer = PrefixIndexWriter(redis, redis_cfg, self.worker_id)
                registry = WorkerRegistry(redis, redis_cfg, ttl_s=cfg.heartbeat_ttl_s)
                self.heartbeat = Heartbeat(registry, lambda: WorkerRecord(
                    worker_id=self.worker_id, role=cfg.role, address=address,
                    transfer_metadata=self.agent.metadata().encode(), load=self.load(),
                    started_unix_ms=self.started_ms))
                self.tasks.spawn(self._run_writer(), "prefix index writer")
                await self.heartbeat.start()
            self.tasks.spawn(self._watch_engine(), "engine watch")

        async def stopping() -> None:
            if self.heartbeat is not None:
                await self.heartbeat.stop(deregister=True)

        options = ProcessOptions(
            name=f"{cfg.role.value} worker {self.worker_id}", listen=cfg.listen,
            metrics_registry=self.registry, metrics_listen=cfg.metrics_listen,
            advertise_host=cfg.host, grace_s=cfg.shutdown_grace_s, stop=self._stopping,
            on_started=started, on_stopping=stopping,
            interceptors=[cluster_secret.server_interceptor(cfg.cluster_secret())],
            tls=cfg.tls, require_client_cert=True)
        try:
            await serve_until_stopped(services, options)
        finally:
            await self.close()

    async def _watch_engine(self) -> None:
        """A dead engine ends the process, so its supervisor restarts it."""
        while self.loop is None or self.loop.fatal is None:
            await asyncio.sleep(0.5)
        log.error("engine failed: stopping this worker")
        self._stopping.set()

    def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        """Stops the background tasks, takes this worker out of the prefix index, stops the
        engine thread and the transfer agent."""
        await self.tasks.close()
        if self.writer is not None:
            try:
                await asyncio.wait_for(self.writer.remove(), timeout=1.0)
            except Exception:  # Redis gone: its keys expire or are wiped at our next start
                log.warning("could not remove this worker's prefix-index entries")
        if self.loop is not None:
            self.loop.stop()
        self.agent.close()

    async def _run_writer(self) -> None:
        assert self.writer is not None
        try:
            await self.writer.start()
        except Exception as error:  # Redis down at start: run() keeps retrying and re-publishes
            log.warning("prefix index unavailable at start (%s); will re-publish", error)
        await self.writer.run()
