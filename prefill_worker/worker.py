"""Prefill-side request handling: compute the prompt, push its KV a layer group at a time.

`prefill` registers a push plan (the decode worker's agent, its reserved block ids, how many
leading blocks it already holds) and queues the prompt in the engine, where it is batched
and chunked with other prompts. As the last layer of each layer group of a step finishes
(groups of g layers: the cache layout, engine/kv_cache.py), `on_layer_done` (engine thread)
posts one write of that group's blocks touched by the step — blocks the decode worker lacks,
including ones this worker had cached and did not recompute — so each block's group is one
contiguous region and the transfer of a group overlaps the compute of the next ones. The
write of the last group of the last chunk is marked `last`, so the decode side knows when the
request is complete. `prefill` returns the first sampled token once every write has landed,
and has the blocks freed (they stay in this worker's prefix cache) at the engine's next step
boundary, without waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field

from opentelemetry.trace import SpanKind, Status, StatusCode

from cluster.errors import HandshakeMismatch, InvalidRequest, TransferFailed
from cluster.worker_config import WorkerConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop
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

    peer: str
    dst_blocks: list[int]
    trace_context: str
    next_block: int  # first block not yet final on the decode side
    pending: set[int] = field(default_factory=set)  # write ids in flight
    blocks_sent: set[int] = field(default_factory=set)
    last_posted: bool = False
    error: str = ""
    done: asyncio.Future[None] | None = None
    aio: asyncio.AbstractEventLoop | None = None


@dataclass
class PrefillStats:
    requests: int = 0
    blocks_sent: int = 0
    transfer_failures: int = 0


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
        self._peers: dict[str, str] = {}  # decode agent metadata → peer name
        self.block_bytes = (  # one block, all layers
            loop.engine.cache_shape.block_bytes_per_layer * loop.engine.model_config.num_layers)

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
        peer = await self._connect(target_metadata)
        aio = asyncio.get_running_loop()
        # kv.send covers every write of this request; its traceparent rides in the transfer
        # notifications, so the decode side's kv.receive span is its child
        send = tracer().start_span("kv.send", kind=SpanKind.PRODUCER, attributes={
            "tandem.peer": peer, "tandem.kv.backend": self.agent.config.backend,
            "tandem.kv.first_block": num_cached_blocks})
        plan = PushPlan(peer, list(dst_blocks), traceparent_of(send), num_cached_blocks,
                        done=aio.create_future(), aio=aio)
        queue = self.loop.subscribe(request_id)

        def add(engine: Engine) -> Request:
            request = engine.add_prefill_request(request_id, prompt, sampling, cache_salt)
            with self._lock:
                self.plans[request_id] = plan
            return request

        try:
            with span("prefill.compute") as compute:
                request = await self.loop.call(add)
                self.stats.requests += 1
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                compute.set_attributes({
                    "tandem.tokens.computed": len(prompt) - request.num_cached_tokens,
                    "tandem.tokens.cached": request.num_cached_tokens})
            assert plan.done is not None
            try:
                await asyncio.wait_for(asyncio.shield(plan.done), self.transfer_timeout_s)
            except TimeoutError:
                plan.error = plan.error or f"writes not done after {self.transfer_timeout_s} s"
            if plan.error:
                self.stats.transfer_failures += 1
                raise TransferFailed(f"KV transfer from {self.worker_id} to decode peer "
                                     f"{peer} failed: {plan.error}")
            self.stats.blocks_sent += len(plan.blocks_sent)
            return PrefillResult(item.new_token_ids[0],
                                 len(prompt) - request.num_cached_tokens,
                                 request.num_cached_tokens, len(plan.blocks_sent))
        finally:
            self.loop.unsubscribe(request_id)
            with self._lock:
                self.plans.pop(request_id, None)
            blocks = len(plan.blocks_sent)
            send.set_attributes({"tandem.kv.blocks": blocks,
                                 "tandem.kv.layers": self.loop.engine.model_config.num_layers,
                                 "tandem.kv.bytes": blocks * self.block_bytes})
            if plan.error:
                send.set_status(Status(StatusCode.ERROR, plan.error))
            send.end()
            # not awaited: the first token must not wait for another request's step to end
            self.loop.post(lambda e: e.release(request_id))

    def counters(self) -> dict[str, float]:
        """For the Worker service's status (cumulative)."""
        return {"prefill_requests": self.stats.requests, "kv_blocks_sent": self.stats.blocks_sent,
                "transfer_failures": self.stats.transfer_failures,
                "kv_bytes_sent": self.agent.stats.bytes_sent}

    def gauges(self) -> dict[str, float]:
        """For the Worker service's status (current)."""
        return {"pushes": len(self.plans)}

    async def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Stops a prefill in progress and its writes; its `prefill` call fails."""
        log.info("cancelling %s: %s", request_id, reason)
        with self._lock:
            plan = self.plans.pop(request_id, None)
        found = await self.loop.call(lambda e: e.release(request_id))
        if plan is not None and plan.done is not None and not plan.done.done():
            plan.error = "cancelled"
            plan.done.set_result(None)
        return found or plan is not None

    async def _connect(self, metadata: str) -> str:
        peer = self._peers.get(metadata)
        if peer is not None:
            return peer
        try:
            peer = await self.loop.call(lambda e: self.agent.connect(metadata))
        except HandshakeError as error:
            raise HandshakeMismatch(self.worker_id, "decode peer", str(error)) from None
        except TransferError as error:
            raise TransferFailed(f"cannot reach decode peer: {error}") from None
        self._peers[metadata] = peer
        return peer

    # ---- engine thread -------------------------------------------------------------------

    def on_layer_done(self, layer: int, batch: ScheduledBatch) -> None:
        """After the last layer of a layer group: posts the group's writes for every planned
        request in the step."""
        engine = self.loop.engine
        group = engine.cache_shape.layer_group
        if (layer + 1) % group:
            return  # the group's other layers are still to come
        layers = range(layer + 1 - group, layer + 1)
        bs = engine.config.block_size
        last_layer = engine.model_config.num_layers - 1
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
            is_last = final and layer == last_layer
            try:
                write_id = self.agent.write(
                    plan.peer, request.request_id, src, plan.dst_blocks[first_block:end_block],
                    layers, last=is_last, trace_context=plan.trace_context)
            except (TransferError, ValueError) as error:
                self._fail(plan, str(error))
                continue
            with self._lock:
                plan.pending.add(write_id)
                plan.blocks_sent.update(range(first_block, end_block))
                plan.last_posted = is_last
            if layer == last_layer:
                plan.next_block = end // bs

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
