"""Prefill-side request handling: compute the prompt, push its KV a layer group at a time.

`prefill` registers a push plan (the decode worker's agent, its reserved block ids, how many
leading blocks it already holds) and queues the prompt in the engine, where it is batched
and chunked with other prompts. As the last layer of each layer group of a step finishes
(groups of g layers: the cache layout, engine/kv_cache.py), `on_layer_done` (engine thread)
posts, once the group's kernels have finished (`engine.layer_ready`: CUDA events; at once on
the CPU), one write of that group's blocks touched by the step — blocks the decode worker lacks,
including ones this worker had cached and did not recompute — so each block's group is one
contiguous region and the transfer of a group overlaps the compute of the next ones. The
write of the last group of the last chunk is marked `last`, so the decode side knows when the
request is complete. `prefill` returns the first sampled token once every write has landed,
and has the blocks freed (they stay in this worker's prefix cache) at the engine's next step
boundary, without waiting for it.

Links to decode workers are the agent's: every request asks it for the peer
(`agent.connect`, no I/O while the link is alive), so a link the agent lost — the decode
worker restarted, or either side stalled past the transfer peer timeout (SIGSTOP, a long GC
pause) — is made again by the next request. A failed connect fails its request with
`TransferFailed` (ABORTED: the router tries another pair) and backs off: until the backoff
ends, requests for that peer fail at once without dialing it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from opentelemetry.trace import SpanKind, Status, StatusCode

from cluster.errors import Cancelled, HandshakeMismatch, InvalidRequest, TransferFailed
from cluster.worker_config import WorkerConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop
from engine.layer_ready import ReadyQueue, record_ready
from engine.request import Request
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledBatch
from kv_transfer.base import (
    EventKind,
    HandshakeError,
    KVTransferAgent,
    TransferError,
    TransferEvent,
)
from observability.tracing import span, traceparent_of, tracer

log = logging.getLogger(__name__)


@dataclass
class PrefillResult:
    first_token: int
    num_computed_tokens: int  # prompt tokens this worker ran through the model
    num_cached_tokens: int  # prompt tokens taken from this worker's prefix cache
    num_blocks_sent: int


@dataclass
class PushPlan:
    """Where one request's KV goes; touched by the engine thread and the event loop."""

    peer: str  # the decode worker's agent name
    dst_blocks: list[int]
    trace_context: str
    next_block: int  # first block not yet final on the decode side
    pending: set[int] = field(default_factory=set)  # write ids in flight
    blocks_sent: set[int] = field(default_factory=set)
    last_posted: bool = False
    error: str = ""
    cancelled: bool = False
    done: asyncio.Future[None] | None = None
    aio: asyncio.AbstractEventLoop | None = None


@dataclass(frozen=True)
class GroupWrite:
    """One request's write of one layer group, decided when the group was launched."""

    plan: PushPlan
    request_id: str
    src: list[int]  # this worker's blocks [first_block, end_block) of the request
    first_block: int
    end_block: int
    layers: range
    last: bool


@dataclass
class PrefillStats:
    """Counters for metrics and status (cumulative)."""

    requests: int = 0  # accepted: connected to the decode peer and queued in the engine
    blocks_sent: int = 0
    transfer_failures: int = 0  # accepted requests whose KV push failed
    connect_failures: int = 0  # requests refused: the decode peer could not be (re)connected


@dataclass(frozen=True)
class PeerBackoff:
    """A decode peer whose last connect failed: not dialed again before `retry_at`."""

    failures: int  # consecutive failed connects
    retry_at: float  # time.monotonic()
    error: str


class PrefillWorker:
    """The prefill role over an `EngineLoop` and a transfer agent."""

    def __init__(self, loop: EngineLoop, agent: KVTransferAgent, worker_id: str,
                 transfer_timeout_s: float = WorkerConfig.transfer_timeout_s) -> None:
        self.loop = loop
        self.agent = agent
        self.worker_id = worker_id
        self.transfer_timeout_s = transfer_timeout_s
        self.stats = PrefillStats()
        self.plans: dict[str, PushPlan] = {}
        self._lock = threading.Lock()
        self._backoff: dict[str, PeerBackoff] = {}  # decode agent metadata → its last failure
        self._posts = ReadyQueue()  # engine thread: layer groups launched, writes not posted
        self.block_bytes = (  # one block, all layers
            loop.engine.cache_shape.block_bytes_per_layer * loop.engine.cache_shape.num_layers)

    async def prefill(self, request_id: str, prompt: list[int], sampling: SamplingParams,
                      target_metadata: str, dst_blocks: list[int], num_cached_blocks: int,
                      cache_salt: bytes = b"") -> PrefillResult:
        """Computes `prompt` (its block hashes salted with `cache_salt`), writes its KV into
        `dst_blocks` on the decode worker."""
        engine = self.loop.engine
        needed = engine.block_manager.blocks_needed(len(prompt))
        if len(dst_blocks) != needed:
            raise InvalidRequest("target.block_ids", f"{len(dst_blocks)} blocks for a "
                                 f"{len(prompt)}-token prompt that needs {needed}")
        if not 0 <= num_cached_blocks < needed:
            raise InvalidRequest("target.num_cached_blocks",
                                 f"{num_cached_blocks} not in [0, {needed})")
        self._check_backoff(target_metadata)
        aio = asyncio.get_running_loop()
        # kv.send covers every write of this request; its traceparent rides in the transfer
        # notifications, so the decode side's kv.receive span is its child
        send = tracer().start_span("kv.send", kind=SpanKind.PRODUCER, attributes={
            "tandem.kv.backend": self.agent.config.backend,
            "tandem.kv.first_block": num_cached_blocks})
        done: asyncio.Future[None] = aio.create_future()
        queue = self.loop.subscribe(request_id)

        def add(engine: Engine) -> tuple[Request, PushPlan]:
            # the peer first: a request whose KV has nowhere to go is not queued
            plan = PushPlan(self._connect(target_metadata), list(dst_blocks),
                            traceparent_of(send), num_cached_blocks, done=done, aio=aio)
            request = engine.add_prefill_request(request_id, prompt, sampling, cache_salt)
            with self._lock:
                self.plans[request_id] = plan
            return request, plan

        plan: PushPlan | None = None
        try:
            with span("prefill.compute") as compute:
                request, push = await self.loop.call(add)
                plan = push  # for the `finally`
                self.stats.requests += 1
                send.set_attribute("tandem.peer", push.peer)
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                compute.set_attributes({
                    "tandem.tokens.computed": len(prompt) - request.num_cached_tokens,
                    "tandem.tokens.cached": request.num_cached_tokens})
            try:
                await asyncio.wait_for(asyncio.shield(done), self.transfer_timeout_s)
            except TimeoutError:
                push.error = push.error or f"writes not done after {self.transfer_timeout_s} s"
            if push.cancelled:
                raise Cancelled(f"prefill of {request_id} on {self.worker_id} was cancelled")
            if push.error:
                self.stats.transfer_failures += 1
                raise TransferFailed(f"KV transfer from {self.worker_id} to decode peer "
                                     f"{push.peer} failed: {push.error}")
            self.stats.blocks_sent += len(push.blocks_sent)
            return PrefillResult(item.new_token_ids[0],
                                 len(prompt) - request.num_cached_tokens,
                                 request.num_cached_tokens, len(push.blocks_sent))
        finally:
            self.loop.unsubscribe(request_id)
            with self._lock:
                self.plans.pop(request_id, None)
            blocks = len(plan.blocks_sent) if plan is not None else 0
            send.set_attributes({"tandem.kv.blocks": blocks,
                                 "tandem.kv.layers": self.loop.engine.cache_shape.num_layers,
                                 "tandem.kv.bytes": blocks * self.block_bytes})
            if plan is not None and plan.error:
                send.set_status(Status(StatusCode.ERROR, plan.error))
            send.end()
            # not awaited: the first token must not wait for another request's step to end
            self.loop.post(lambda e: e.release(request_id))

    def counters(self) -> dict[str, float]:
        """For the Worker service's status (cumulative)."""
        return {"prefill_requests": self.stats.requests, "kv_blocks_sent": self.stats.blocks_sent,
                "transfer_failures": self.stats.transfer_failures,
                "connect_failures": self.stats.connect_failures,
                "kv_bytes_sent": self.agent.stats.bytes_sent}

    def gauges(self) -> dict[str, float]:
        """For the Worker service's status (current)."""
        return {"pushes": len(self.plans)}

    async def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Stops a prefill in progress and its writes; its `prefill` call raises `Cancelled`."""
        log.info("cancelling %s: %s", request_id, reason)
        with self._lock:
            plan = self.plans.pop(request_id, None)
        found = await self.loop.call(lambda e: e.release(request_id))
        if plan is not None and plan.done is not None and not plan.done.done():
            plan.cancelled = True
            plan.error = plan.error or "cancelled"
            plan.done.set_result(None)
        return found or plan is not None

    # ---- decode peers --------------------------------------------------------------------

    def _check_backoff(self, metadata: str) -> None:
        """Fails the request at once while the peer at `metadata` is backing off."""
        with self._lock:
            backoff = self._backoff.get(metadata)
        if backoff is None:
            return
        wait = backoff.retry_at - time.monotonic()
        if wait > 0:
            with self._lock:
                self.stats.connect_failures += 1
            raise TransferFailed(f"decode peer at {metadata} unreachable ({backoff.failures} "
                                 f"failed connects, last: {backoff.error}); next try in "
                                 f"{wait:.1f} s")

    def _connect(self, metadata: str) -> str:
        """Engine thread: the peer's name from the agent, which reuses a live link and makes
        a new one otherwise (first use, or the last link was lost).

        A failure backs off exponentially from the agent's heartbeat interval up to its peer
        timeout: a link is declared lost after `peer_timeout_s` of silence, so dialing a
        silent peer more often than that learns nothing, and one still booting gets a quick
        second try. No tunable of its own."""
        try:
            peer = self.agent.connect(metadata)
        except HandshakeError as error:
            with self._lock:
                self.stats.connect_failures += 1
            raise HandshakeMismatch(self.worker_id, "decode peer", str(error)) from None
        except TransferError as error:
            failures, delay = self._back_off(metadata, str(error))
            log.warning("cannot connect to decode peer at %s (attempt %d): %s; next try in "
                        "%.1f s", metadata, failures, error, delay)
            raise TransferFailed(f"cannot reach decode peer at {metadata}: {error}") from None
        with self._lock:
            if self._backoff.pop(metadata, None) is not None:
                log.info("decode peer at %s (%s) reachable again", metadata, peer)
        return peer

    def _back_off(self, metadata: str, error: str) -> tuple[int, float]:
        """Records a failed connect; returns (consecutive failures, seconds until the next
        try). Entries idle for a peer timeout past their retry time are dropped (a peer that
        nobody asks for any more, or that starts afresh with a short backoff)."""
        config = self.agent.config
        now = time.monotonic()
        with self._lock:
            self.stats.connect_failures += 1
            for stale in [m for m, b in self._backoff.items()
                          if now - b.retry_at > config.peer_timeout_s]:
                del self._backoff[stale]
            last = self._backoff.get(metadata)
            failures = last.failures + 1 if last is not None else 1
            delay = min(config.heartbeat_interval_s * 2 ** (failures - 1), config.peer_timeout_s)
            self._backoff[metadata] = PeerBackoff(failures, now + delay, error)
        return failures, delay

    # ---- engine thread -------------------------------------------------------------------

    def on_layer_done(self, layer: int, batch: ScheduledBatch) -> None:
        """After each layer; after the last layer of a layer group, queues the group's writes
        for every planned request in the step behind a marker of the group's kernels
        (`engine.layer_ready`: on CUDA the hook runs when they are launched, not finished).
        Writes whose group has finished are posted now, in order; the last layer of the step
        waits for every group, so nothing of a step is left unposted after it."""
        engine = self.loop.engine
        group = engine.cache_shape.layer_group
        last_layer = engine.cache_shape.num_layers - 1  # of the KV cache (the sim has one)
        if (layer + 1) % group == 0:
            writes = self._group_writes(layer, batch)
            if writes:
                ready = record_ready(engine.device)
                self._posts.push(ready, lambda: self._post(writes))
        if layer == last_layer:
            self._posts.run_all()
        else:
            self._posts.run_ready()

    def _group_writes(self, layer: int, batch: ScheduledBatch) -> list[GroupWrite]:
        """The writes of the layer group ending at `layer`, one per planned request of the
        step with blocks the decode worker lacks; advances the plans after the last layer."""
        engine = self.loop.engine
        group = engine.cache_shape.layer_group
        layers = range(layer + 1 - group, layer + 1)
        bs = engine.config.block_size
        last_layer = engine.cache_shape.num_layers - 1  # of the KV cache (the sim has one)
        writes = []
        for request, num_new in zip(batch.requests, batch.num_new_tokens, strict=True):
            with self._lock:
                plan = self.plans.get(request.request_id)
            if plan is None or plan.error:
                continue
            end = request.num_computed_tokens + num_new
            final = end == request.num_tokens
            first_block, end_block = plan.next_block, -(-end // bs)
            if first_block >= end_block:
                continue
            src = engine.block_manager.block_ids(request.request_id)[first_block:end_block]
            writes.append(GroupWrite(plan, request.request_id, src, first_block, end_block,
                                     layers, final and layer == last_layer))
            if layer == last_layer:
                plan.next_block = end // bs
        return writes

    def _post(self, writes: list[GroupWrite]) -> None:
        """Posts the writes of one finished layer group."""
        for w in writes:
            plan = w.plan
            if plan.error:
                continue
            try:
                write_id = self.agent.write(
                    plan.peer, w.request_id, w.src, plan.dst_blocks[w.first_block:w.end_block],
                    w.layers, last=w.last, trace_context=plan.trace_context)
            except (TransferError, ValueError) as error:
                self._fail(plan, str(error))
                continue
            with self._lock:
                plan.pending.add(write_id)
                plan.blocks_sent.update(range(w.first_block, w.end_block))
                plan.last_posted = w.last

    # ---- event loop ----------------------------------------------------------------------

    def on_transfer_events(self, events: list[TransferEvent]) -> None:
        for event in events:
            if event.kind not in (EventKind.WRITE_DONE, EventKind.WRITE_FAILED):
                continue
            with self._lock:
                plan = self.plans.get(event.request_id)
                if plan is None or event.write_id not in plan.pending:
                    continue
                plan.pending.discard(event.write_id)
                settled = plan.last_posted and not plan.pending
            if event.kind is EventKind.WRITE_FAILED:
                self._fail(plan, f"{event.reason}: {event.message}")
            elif settled and plan.done is not None and not plan.done.done():
                plan.done.set_result(None)

    def _fail(self, plan: PushPlan, why: str) -> None:
        """Marks a plan failed (any thread) and wakes its `prefill` call."""
        plan.error = plan.error or why
        if plan.aio is not None and plan.done is not None:
            plan.aio.call_soon_threadsafe(_settle, plan.done)


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
