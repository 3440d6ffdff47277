"""Decode-side request handling: reservations under leases, KV arrival, the token stream.

A request's life here:

1. `reserve`: blocks for the prompt are allocated (blocks already held by prefix hash are
   reported as cached and need not be sent); the transfer agent starts the request's deadline.
   The reservation holds a lease: if its KV is not complete and its `decode` call has not
   started within `lease_s`, the blocks are released (counted in `stats.lease_expiries`).
2. The prefill worker writes the KV into the reserved blocks; the agent reports
   REQUEST_COMPLETE (or REQUEST_FAILED).
3. `decode(first_token)`: waits for the KV, admits the request to the running batch and
   streams every later token. If the transfer failed, it prefills locally instead
   (prompt + first token, recomputed here; counted in `stats.local_prefills` and logged).
   `decode(None)`: no KV is coming (the router chose to prefill here: an aggregated worker,
   or a prompt whose uncached part is short); the reservation's blocks are freed and the
   prompt joins the engine's queue like any request of an aggregated engine, its cached
   prefix found again by hash; the stream starts with the first token (counted in
   `stats.routed_prefills`). The same local prefill as the fallback, without a first token.
4. Whatever ends the stream (finish, cancel, error) releases the blocks in `finally`.

Once admitted, a request may be preempted when the running batch outgrows the blocks: the
engine frees its blocks and recomputes prompt + generated tokens later (engine/scheduler.py);
its stream only pauses, and no new reservation is granted until it runs again.

Blocks of a request released before its KV completed are kept out of use for
`quarantine_s`, so a write still in flight from the prefill side cannot land in blocks that
already belong to another request.

The lease checker and every delayed quarantine release are background tasks held in
`BackgroundTasks` (kept, failures logged); `stop()` cancels and awaits them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from opentelemetry.trace import SpanKind

from cluster.background import BackgroundTasks
from cluster.errors import NoCapacity, UnknownRequest
from cluster.worker_config import WorkerConfig
from engine.engine import Engine, RequestOutput
from engine.engine_loop import EngineLoop
from engine.errors import DuplicateRequest
from engine.request import FinishReason
from engine.sampling import SamplingParams
from kv_transfer.base import EventKind, KVTransferAgent, TransferEvent
from observability.tracing import record_span, span

log = logging.getLogger(__name__)


class TransferFailed(Exception):
    """The request's KV did not arrive; `reason` says why."""


@dataclass
class DecodeStats:
    """Counters for metrics and status."""

    reservations: int = 0
    lease_expiries: int = 0
    local_prefills: int = 0  # fallbacks: the transfer failed, the prompt was recomputed here
    routed_prefills: int = 0  # prompts the router sent here to prefill (no transfer)
    transfers_completed: int = 0
    transfers_failed: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens found in this worker's prefix cache


@dataclass
class Reservation:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    cache_salt: bytes
    block_ids: list[int]
    num_cached_tokens: int
    lease_deadline: float  # time.monotonic()
    kv_ready: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    decoding: bool = False
    local_prefill: bool = False  # the transfer failed and the prompt was recomputed here
    released: str = ""  # why it was released while decoding (a cancel, a shutdown); "" if not
    outputs: asyncio.Queue[RequestOutput | BaseException] | None = None  # its decode stream

    @property
    def writes_settled(self) -> bool:
        """No write can still land in the blocks: the KV completed, or we recomputed."""
        done = self.kv_ready.done() and not self.kv_ready.cancelled() and \
            self.kv_ready.exception() is None
        return done or self.local_prefill


class DecodeWorker:
    """The decode role over an `EngineLoop` and a transfer agent."""

    def __init__(self, loop: EngineLoop, agent: KVTransferAgent, worker_id: str,
                 lease_s: float, quarantine_s: float = WorkerConfig.quarantine_s,
                 lease_check_interval_s: float = WorkerConfig.lease_check_interval_s) -> None:
        self.loop = loop
        self.agent = agent
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.quarantine_s = quarantine_s
        self.lease_check_interval_s = lease_check_interval_s
        self.stats = DecodeStats()
        self.reservations: dict[str, Reservation] = {}
        self._reserved = asyncio.Event()  # set by each reservation: wakes the lease checker
        self.tasks = BackgroundTasks(f"decode worker {worker_id}")

    def start(self) -> None:
        self.tasks.spawn(self._expire_leases(), "lease expiry")

    async def stop(self) -> None:
        """Cancels and awaits the background tasks (pending quarantine releases included:
        the blocks go with the process)."""
        await self.tasks.close()

    # ---- reserve -------------------------------------------------------------------------

    async def reserve(self, request_id: str, prompt: list[int], sampling: SamplingParams,
                      lease_s: float | None = None, cache_salt: bytes = b"") -> Reservation:
        """Allocates blocks for `prompt` (its block hashes salted with `cache_salt`);
        NoCapacity if they are not free now, or while a preempted request waits for blocks."""
        if request_id in self.reservations:
            raise DuplicateRequest(f"request_id: {request_id!r} is already reserved here")
        # the caller may ask a shorter lease, never a longer one: a lease is blocks held
        lease = min(lease_s, self.lease_s) if lease_s else self.lease_s

        def reserve_on_engine(engine: Engine) -> tuple[list[int], int] | None:
            allocation = engine.reserve(request_id, prompt, sampling, cache_salt)
            if allocation is None:
                return None
            self.agent.expect(request_id, lease)
            return allocation.block_ids, allocation.num_cached_tokens

        result = await self.loop.call(reserve_on_engine)
        if result is None:
            raise NoCapacity(f"decode worker {self.worker_id} has no free KV blocks for a "
                             f"{len(prompt)}-token prompt")
        block_ids, cached = result
        reservation = Reservation(request_id, prompt, sampling, cache_salt, block_ids, cached,
                                  time.monotonic() + lease)
        self.reservations[request_id] = reservation
        self._reserved.set()
        self.stats.reservations += 1
        self.stats.cached_prompt_tokens += cached
        return reservation

    # ---- transfer events -----------------------------------------------------------------

    def on_transfer_events(self, events: list[TransferEvent]) -> None:
        """Event loop: the agent saw requests complete or fail."""
        for event in events:
            reservation = self.reservations.get(event.request_id)
            if reservation is None or reservation.kv_ready.done():
                continue
            if event.kind in (EventKind.REQUEST_COMPLETE, EventKind.REQUEST_FAILED):
                record_span("kv.receive", parent=event.trace_context or None,
                            duration_s=event.latency_s, kind=SpanKind.CONSUMER, attributes={
                                "tandem.request_id": event.request_id,
                                "tandem.kv.bytes": event.nbytes, "tandem.peer": event.peer},
                            error="" if event.ok else f"{event.reason}: {event.message}")
            if event.kind is EventKind.REQUEST_COMPLETE:
                self.stats.transfers_completed += 1
                reservation.kv_ready.set_result(None)
            elif event.kind is EventKind.REQUEST_FAILED:
                self.stats.transfers_failed += 1
                reservation.kv_ready.set_exception(TransferFailed(
                    f"{event.reason}: {event.message}"))
                reservation.kv_ready.exception()  # retrieved: no "never retrieved" warning

    # ---- decode --------------------------------------------------------------------------

    async def decode(self, request_id: str,
                     first_token: int | None) -> AsyncIterator[RequestOutput]:
        """Streams the tokens after `first_token` (None: prefills here and streams every
        token, the first included); the last output has `finished` set."""
        reservation = self.reservations.get(request_id)
        if reservation is None or reservation.decoding:
            raise UnknownRequest(f"decode worker {self.worker_id} holds no reservation "
                                 f"{request_id!r} (expired, released or never made)")
        reservation.decoding = True
        finished = False
        try:
            queue = reservation.outputs = self.loop.subscribe(request_id)
            with span("decode.admission") as admission:
                first = await self._start(reservation, first_token)
                admission.set_attribute("tandem.local_prefill", reservation.local_prefill)
            if first is not None and first.finished:
                finished = True
                yield dataclasses.replace(first, new_token_ids=[])
                return
            with span("decode.stream") as stream:
                tokens = 0
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    finished = item.finished
                    tokens += len(item.new_token_ids)
                    if finished and item.finish_reason is not None:
                        stream.set_attributes({"tandem.tokens": tokens + 1,
                                               "tandem.finish_reason": item.finish_reason.value})
                    yield item
                    if finished:
                        return
        finally:
            self.loop.unsubscribe(request_id)
            self.reservations.pop(request_id, None)
            if not finished:
                await self._release_on_engine(request_id,
                                              kv_complete=reservation.writes_settled)

    async def _start(self, reservation: Reservation,
                     first_token: int | None) -> RequestOutput | None:
        """Admits the request with its transferred KV, or prefills it here if that failed or
        no KV is coming (`first_token` None: returns None, every token is still to come); a
        request released meanwhile ends at once, cancelled."""
        rid = reservation.request_id
        if first_token is None:
            return await self._prefill_here(reservation)
        remaining = max(reservation.lease_deadline - time.monotonic(), 0.0)
        try:
            await asyncio.wait_for(asyncio.shield(reservation.kv_ready), timeout=remaining)
            if not reservation.released:
                return await self.loop.call(lambda e: e.admit_prefilled(rid, first_token))
        except (TransferFailed, TimeoutError) as error:
            if not reservation.released:
                why = "KV did not arrive before the lease ended" if isinstance(
                    error, TimeoutError) else str(error)
                log.warning("request %s: KV transfer failed (%s); prefilling locally on %s",
                            rid, why, self.worker_id)
                self.stats.local_prefills += 1
                return await self._prefill_locally(reservation, first_token)
        except KeyError:  # released between the KV's arrival and its admission
            if not reservation.released:
                raise
        return self._cancelled(reservation)

    def _cancelled(self, reservation: Reservation) -> RequestOutput:
        """The last output of a request released while decoding: no tokens, CANCELLED."""
        return RequestOutput(reservation.request_id, [], True, FinishReason.CANCELLED,
                             len(reservation.prompt), reservation.num_cached_tokens)

    async def _prefill_here(self, reservation: Reservation) -> RequestOutput | None:
        """The router sent no KV: frees the reservation and queues the prompt in the engine in
        one engine call (the freed blocks are there for it; its cached prefix is found again by
        hash). Nothing writes into the blocks, so they are freed at once."""
        if reservation.released:
            return self._cancelled(reservation)
        rid = reservation.request_id
        reservation.local_prefill = True
        self.stats.routed_prefills += 1

        def start(engine: Engine) -> None:
            self.agent.release(rid)
            engine.release(rid)
            engine.add_request(rid, reservation.prompt, reservation.sampling,
                               reservation.cache_salt)

        await self.loop.call(start)
        return None

    async def _prefill_locally(self, reservation: Reservation, first_token: int,
                               ) -> RequestOutput:
        rid, sampling = reservation.request_id, reservation.sampling
        await self._release_on_engine(rid, kv_complete=False)
        reservation.local_prefill = True
        ends = first_token in sampling.stop_token_ids or (
            not sampling.ignore_eos and first_token in self.loop.engine.model_config.eos_token_ids)
        if ends or sampling.max_tokens == 1:
            reason = FinishReason.STOP if ends else FinishReason.LENGTH
            return RequestOutput(rid, [first_token], True, reason, len(reservation.prompt), 0)
        rest = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - 1,
                                   seed_offset=sampling.seed_offset + 1)
        if reservation.released:
            return self._cancelled(reservation)
        await self.loop.call(lambda e: e.add_request(rid, [*reservation.prompt, first_token],
                                                     rest, reservation.cache_salt))
        return RequestOutput(rid, [first_token], False, None, len(reservation.prompt), 0)

    # ---- status --------------------------------------------------------------------------

    def counters(self) -> dict[str, float]:
        """For the Worker service's status (cumulative)."""
        stats = self.stats
        return {"reservations": stats.reservations, "lease_expiries": stats.lease_expiries,
                "local_prefills": stats.local_prefills,
                "routed_prefills": stats.routed_prefills,
                "transfers_completed": stats.transfers_completed,
                "transfers_failed": stats.transfers_failed,
                "cached_prompt_tokens": stats.cached_prompt_tokens,
                "kv_bytes_received": self.agent.stats.bytes_received}

    def gauges(self) -> dict[str, float]:
        """For the Worker service's status (current)."""
        return {"reservations_waiting": sum(not r.decoding for r in self.reservations.values())}

    # ---- release -------------------------------------------------------------------------

    async def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Drops a reservation, or stops a decoding request and ends its stream with
        FINISH_REASON_CANCELLED. False if unknown here."""
        log.info("releasing %s: %s", request_id, reason)
        reservation = self.reservations.get(request_id)
        if reservation is None:
            return await self.loop.call(lambda e: e.release(request_id))
        if not reservation.decoding:
            del self.reservations[request_id]
            await self._release_on_engine(request_id, kv_complete=reservation.writes_settled)
            return True
        if reservation.released:
            return True
        reservation.released = reason
        if not reservation.kv_ready.done():  # still waiting for its KV: stop waiting
            reservation.kv_ready.set_exception(TransferFailed(f"released: {reason}"))
            reservation.kv_ready.exception()
        await self._release_on_engine(request_id, kv_complete=reservation.writes_settled)
        if reservation.outputs is not None:  # the stream ends after what it already has
            reservation.outputs.put_nowait(self._cancelled(reservation))
        return True

    async def _release_on_engine(self, request_id: str, kv_complete: bool) -> None:
        """Frees the request's blocks now, or after the quarantine if KV may still land."""
        def release(engine: Engine) -> None:
            self.agent.release(request_id)
            if kv_complete or self.quarantine_s <= 0:
                engine.release(request_id)
            else:
                engine.quarantine(request_id)

        await self.loop.call(release)
        if not kv_complete and self.quarantine_s > 0 and not self.tasks.closed:
            self.tasks.spawn(self._release_quarantined(request_id),
                             f"quarantine release {request_id}")

    async def _release_quarantined(self, request_id: str) -> None:
        await asyncio.sleep(self.quarantine_s)
        await self.loop.call(lambda e: e.release_quarantined(request_id))

    async def _expire_leases(self) -> None:
        """Every `lease_check_interval_s` while a reservation waits for its `decode` call;
        asleep (no wake-ups) while none does."""
        while True:
            if all(r.decoding for r in self.reservations.values()):
                self._reserved.clear()
                await self._reserved.wait()
                continue
            await asyncio.sleep(self.lease_check_interval_s)
            now = time.monotonic()
            expired = [r for r in self.reservations.values()
                       if not r.decoding and now >= r.lease_deadline]
            for reservation in expired:
                log.warning("request %s: reservation lease expired on %s; releasing its blocks",
                            reservation.request_id, self.worker_id)
                self.stats.lease_expiries += 1
                try:
                    await self.cancel(reservation.request_id, "lease expired")
                except Exception:
                    log.exception("releasing expired reservation %s", reservation.request_id)
