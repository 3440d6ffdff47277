"""The router's request path: validate, look up prefixes, pick a pair, reserve, prefill,
stream.

    client ─Generate─▶ router ─Reserve─▶ D ; ─Prefill(D's blocks)─▶ P ─KV over UCX─▶ D
                       router ◀─first token─ P   (streamed to the client at once)
                       router ─Decode(first token)─▶ D ─tokens─▶ router ─▶ client

Before the first token, a failed worker is marked down and the request tries another pair
(up to `max_attempts`): a prefill worker that fails, a decode worker that refuses or dies, a
transfer that fails. Each attempt uses its own id (`<request id>.<attempt>`) so a late write
or event of a failed attempt can never touch the next one. After the first token the request
is bound to its decode worker: if that worker dies, the request ends with UNAVAILABLE.
Whatever ends a request (finish, stop string, client cancel, error) releases its reservation
and its prefill in `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from prometheus_client import CollectorRegistry

from cluster.convert import FINISH_FROM_PB, sampling_to_pb
from cluster.errors import InvalidRequest, NoCapacity, NoWorker
from cluster.grpc_errors import status_for
from cluster.roles import Role
from engine.block_hash import hash_prompt_blocks
from engine.model_config import ModelConfig
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from observability.metrics import RouterMetrics
from observability.tracing import record_span, span
from router.admission import Admission
from router.config import RouterConfig
from router.decide import PREFIX_POLICIES, Decider
from router.load import Assignment, InFlightTracker, Route
from router.policies import Policy, make_policy
from router.prefix import PrefixLookup
from router.stops import StopChecker
from router.workers import WorkerHandle, WorkerPool
from tandem_proto.tandem.v1 import common_pb2, decode_pb2, prefill_pb2

log = logging.getLogger(__name__)

NO_CAPACITY_BACKOFF_S = 0.05
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.CANCELLED}


@dataclass(frozen=True)
class GenerateInput:
    """A validated-on-use generation request, free of protobuf."""

    request_id: str
    text: str
    token_ids: list[int]
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    cache_salt: str = ""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Delta:
    """One message of the stream: new tokens and text; the last one has `finish_reason`."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    usage: Usage | None = None


@dataclass
class RouterStats:
    requests: int = 0
    retries: int = 0
    decisions: Counter[str] = field(default_factory=Counter)  # "policy/mode"
    outcomes: Counter[str] = field(default_factory=Counter)  # finish reason or error code


class Router:
    def __init__(self, config: RouterConfig, pool: WorkerPool, lookup: PrefixLookup) -> None:
        self.config = config
        self.pool = pool
        self.lookup = lookup
        self.tokenizer = Tokenizer.from_dir(config.model)
        self.model_config = ModelConfig.from_dir(config.model)
        self.policy: Policy = make_policy(config.policy)
        self.decider = Decider(self.policy, lookup)
        self.tracker = InFlightTracker()
        self.admission = Admission(config.max_inflight, config.max_queue, config.queue_timeout_s)
        self.stats = RouterStats()
        self.registry = CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)
        self.metrics.watch(
            queue_depth=lambda: self.admission.waiting,
            inflight=lambda: self.admission.inflight,
            index_mode=lambda: self.lookup.mode.value,
            live_workers=lambda: {r.value: len(pool.live(r)) for r in (Role.PREFILL,
                                                                       Role.DECODE)})
        self._tasks: set[asyncio.Future[None]] = set()

    async def close(self) -> None:
        """Lets pending cleanup calls finish (5 s at most), then stops the index tail and the
        worker pool."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        await self.lookup.close()
        await self.pool.close()

    # ---- validation ----------------------------------------------------------------------

    def prompt_ids(self, request: GenerateInput) -> list[int]:
        """The prompt's token ids; `InvalidRequest` naming the field when it is unusable."""
        if request.text and request.token_ids:
            raise InvalidRequest("prompt", "set exactly one of text and token_ids, not both")
        ids = self.tokenizer.encode(request.text) if request.text else list(request.token_ids)
        field_name = "text" if request.text else "token_ids"
        if not ids:
            raise InvalidRequest("prompt", "empty: set text or token_ids")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise InvalidRequest("token_ids", f"ids {bad[:5]} outside the vocabulary [0, {vocab})")
        limit = self.model_config.max_position_embeddings
        if len(ids) >= limit:
            raise InvalidRequest(field_name, f"the prompt has {len(ids)} tokens; the model's "
                                 f"context is {limit} and at least one token must be generated")
        bad_stops = [t for t in request.sampling.stop_token_ids if t >= vocab]
        if bad_stops:
            raise InvalidRequest("sampling.stop_token_ids",
                                 f"{bad_stops} outside the vocabulary [0, {vocab})")
        if any(not s for s in request.stop):
            raise InvalidRequest("sampling.stop", "stop strings must not be empty")
        if len(request.request_id) > 128:
            raise InvalidRequest("request_id", "longer than 128 characters")
        return ids

    # ---- the request path ----------------------------------------------------------------

    async def generate(self, request: GenerateInput) -> AsyncIterator[Delta]:
        """Streams a request's deltas; records its metrics whatever ends it."""
        self.metrics.request_started()
        started = time.perf_counter()
        last_at = started
        ttft: float | None = None
        outcome = "cancelled"
        final: Delta | None = None
        try:
            async for delta in self._generate(request):
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - started
                    self.metrics.first_token(ttft)
                elif delta.token_ids:
                    self.metrics.inter_token((now - last_at) / len(delta.token_ids))
                last_at = now
                if delta.finish_reason is not None:
                    outcome, final = delta.finish_reason, delta
                yield delta
        except Exception as error:
            outcome = status_for(error)[0].name
            raise
        finally:
            usage = final.usage if final is not None else None
            self.metrics.request_finished(
                outcome, time.perf_counter() - started,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                generation_tokens=usage.completion_tokens if usage else 0,
                cached_tokens=usage.cached_tokens if usage else 0, ttft_seconds=ttft)

    async def _generate(self, request: GenerateInput) -> AsyncIterator[Delta]:
        prompt = self.prompt_ids(request)
        request_id = request.request_id or uuid.uuid4().hex
        self.stats.requests += 1
        queued_at = time.perf_counter()
        async with self.admission.slot():
            waited = time.perf_counter() - queued_at
            self.metrics.queued(waited)
            record_span("router.queue", parent=None, duration_s=waited,
                        attributes={"tandem.queue_depth": self.admission.waiting})
            attempt = await self._first_token(request_id, prompt, request)
            decode, attempt_id, first_token, cached, assignment = attempt
            finished = False
            stops = StopChecker(self.tokenizer, request.stop)
            completion = 0
            stream = decode.stub.Decode(decode_pb2.DecodeRequest(  # type: ignore[union-attr]
                request_id=attempt_id, first_token_id=first_token))
            try:
                text, stopped = stops.push([first_token])
                completion += 1
                if stopped:
                    finished = True
                    yield self._last(Delta([first_token], text, "stop"), prompt, cached,
                                     completion)
                    return
                yield Delta([first_token], text)
                async for message in stream:
                    tokens = list(message.token_ids)
                    completion += len(tokens)
                    text, stopped = stops.push(tokens)
                    reason = "stop" if stopped else FINISH_FROM_PB.get(message.finish_reason)
                    if reason is None:
                        if tokens:
                            yield Delta(tokens, text)
                        continue
                    finished = True
                    yield self._last(Delta(tokens, text + stops.flush(), reason), prompt,
                                     cached, completion)
                    return
                raise NoWorker(f"decode worker {decode.worker_id} ended the stream early")
            except grpc.aio.AioRpcError as error:
                self.pool.mark_down(decode.worker_id, f"decode stream: {error.code().name}")
                raise NoWorker(f"decode worker {decode.worker_id} failed mid-request: "
                               f"{error.code().name}: {error.details()}") from None
            finally:
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await stream.read()  # ends the call's client span now, not at collection
                assignment.finish()
                if not finished:
                    self._background(self._release(decode, attempt_id))

    def _last(self, delta: Delta, prompt: list[int], cached: int, completion: int) -> Delta:
        self.stats.outcomes[delta.finish_reason or "unknown"] += 1
        return Delta(delta.token_ids, delta.text, delta.finish_reason,
                     Usage(len(prompt), cached, completion))

    async def _first_token(self, request_id: str, prompt: list[int], request: GenerateInput,
                           ) -> tuple[WorkerHandle, str, int, int, Assignment]:
        """Reserve on D, prefill on P; retries other pairs. Returns (D, attempt id, first
        token, cached prompt tokens, the in-flight assignment to finish at the end)."""
        salt = request.cache_salt.encode()
        hashes = hash_prompt_blocks(prompt, self.config.block_size, salt, self.config.hash_seed)
        prompt_blocks = max(len(hashes), 1)
        excluded: set[str] = set()
        errors: list[str] = []
        deadline = asyncio.get_running_loop().time() + self.config.queue_timeout_s
        attempt = 0
        while attempt < self.config.max_attempts:
            prefill = [h for h in self.pool.live(Role.PREFILL) if h.worker_id not in excluded]
            decode = [h for h in self.pool.live(Role.DECODE) if h.worker_id not in excluded]
            if not prefill or not decode:
                missing = "prefill" if not prefill else "decode"
                raise NoWorker(f"no live {missing} worker" + (
                    f" (tried: {'; '.join(errors)})" if errors else ""))
            with span("router.route") as route_span:
                decision = await self.decider.decide(
                    hashes, self.tracker.apply([h.load() for h in prefill]),
                    self.tracker.apply([h.load() for h in decode]),
                    incompatible=set(self.pool.incompatible_pairs()))
                route, hits = decision.route, decision.hits
                route_span.set_attributes({
                    "tandem.policy": decision.policy, "tandem.index_mode": decision.mode.value,
                    "tandem.prefill": route.prefill, "tandem.decode": route.decode,
                    "tandem.prefix_hit_blocks.prefill": hits.get(route.prefill, 0),
                    "tandem.prefix_hit_blocks.decode": hits.get(route.decode, 0),
                    "tandem.prompt_blocks": prompt_blocks, "tandem.attempt": attempt})
            self.stats.decisions[f"{decision.policy}/{decision.mode.value}"] += 1
            self.metrics.decision(decision.policy, decision.mode.value)
            cached_on_p = hits.get(route.prefill, 0)
            if decision.policy in PREFIX_POLICIES:
                self.metrics.prefix_lookup(max(hits.values(), default=0), prompt_blocks)
            assignment = self.tracker.assign(route, max(prompt_blocks - cached_on_p, 0))
            attempt_id = f"{request_id}.{attempt}"
            try:
                result = await self._try_pair(route, attempt_id, prompt, request)
            except _NoCapacityOn as full:
                assignment.finish()
                excluded.add(full.worker_id)
                if asyncio.get_running_loop().time() > deadline:
                    raise NoCapacity("every decode worker is out of KV blocks") from None
                if len(excluded & {h.worker_id for h in decode}) == len(decode):
                    excluded.clear()  # everyone was full: wait a little and try again
                    await asyncio.sleep(NO_CAPACITY_BACKOFF_S)
                continue
            except _WorkerFailed as failed:
                assignment.finish()
                excluded.add(failed.worker_id)
                errors.append(str(failed))
                self.stats.retries += 1
                self.metrics.retry(failed.hop)
                attempt += 1
                log.warning("request %s attempt %d failed: %s", request_id, attempt, failed)
                continue
            except BaseException:
                assignment.finish()
                raise
            assignment.prefill_done()
            decode_handle = self.pool.workers[route.decode]
            return (decode_handle, attempt_id, result.first_token_id, result.num_cached_tokens,
                    assignment)
        raise NoWorker(f"request {request_id} failed on {attempt} worker pairs: "
                       + "; ".join(errors))

    async def _try_pair(self, route: Route, attempt_id: str, prompt: list[int],
                        request: GenerateInput) -> prefill_pb2.PrefillResponse:
        decode = self.pool.workers[route.decode]
        prefill = self.pool.workers[route.prefill]
        sampling = sampling_to_pb(request.sampling)
        salt = request.cache_salt or None
        try:
            reservation = await decode.stub.Reserve(decode_pb2.ReserveRequest(  # type: ignore[union-attr]
                request_id=attempt_id, token_ids=prompt, sampling=sampling,
                lease_ms=self.config.lease_ms, cache_salt=salt),
                timeout=self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            self._raise_for(error, decode, "reserve")
            raise
        except BaseException:  # cancelled while reserving: D may hold blocks for us
            self._background(self._release(decode, attempt_id))
            raise
        released = False
        try:
            target = prefill_pb2.DecodeTarget(endpoint=reservation.endpoint,
                                              block_ids=reservation.block_ids,
                                              num_cached_blocks=reservation.num_cached_blocks)
            return await prefill.stub.Prefill(prefill_pb2.PrefillRequest(  # type: ignore[union-attr]
                request_id=attempt_id, token_ids=prompt, sampling=sampling, target=target,
                cache_salt=salt), timeout=self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            released = True
            self._background(self._release(decode, attempt_id))
            if error.code() == grpc.StatusCode.ABORTED:  # the transfer to D failed
                self._raise_for(error, decode, "KV transfer")
            self._raise_for(error, prefill, "prefill")
            raise
        except BaseException:
            if not released:
                self._background(self._release(decode, attempt_id))
                self._background(self._cancel_prefill(prefill, attempt_id))
            raise

    def _raise_for(self, error: grpc.aio.AioRpcError, worker: WorkerHandle, what: str,
                   ) -> NoReturn:
        code = error.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            field_name, _, message = (error.details() or "").partition(": ")
            raise InvalidRequest(field_name or "request", message or (error.details() or ""))
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise _NoCapacityOn(worker.worker_id)
        if code in _RETRYABLE:
            if code != grpc.StatusCode.FAILED_PRECONDITION:
                self.pool.mark_down(worker.worker_id, f"{what}: {code.name}")
            raise _WorkerFailed(worker.worker_id,
                                f"{what} on {worker.worker_id}: {code.name}: {error.details()}",
                                _HOPS[what])
        raise error

    # ---- cleanup -------------------------------------------------------------------------

    async def _release(self, decode: WorkerHandle, attempt_id: str) -> None:
        try:
            await decode.worker_stub.Cancel(common_pb2.CancelRequest(
                request_id=attempt_id, reason="router released"), timeout=5.0)
        except Exception as error:  # best effort: the lease frees it anyway
            log.info("release of %s on %s: %r", attempt_id, decode.worker_id, error)

    async def _cancel_prefill(self, prefill: WorkerHandle, attempt_id: str) -> None:
        try:
            await prefill.worker_stub.Cancel(common_pb2.CancelRequest(
                request_id=attempt_id, reason="cancelled"), timeout=5.0)
        except Exception as error:  # best effort
            log.info("cancel of %s on %s: %r", attempt_id, prefill.worker_id, error)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Runs a cleanup call to completion even if the request's task is cancelled."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _NoCapacityOn(Exception):
    def __init__(self, worker_id: str) -> None:
        super().__init__(f"{worker_id} is full")
        self.worker_id = worker_id


class _WorkerFailed(Exception):
    def __init__(self, worker_id: str, message: str, hop: str) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.hop = hop  # "reserve", "prefill" or "kv_transfer": the retry metric's label


_HOPS = {"reserve": "reserve", "prefill": "prefill", "KV transfer": "kv_transfer"}
__all__ = ["Delta", "GenerateInput", "Router", "Usage"]
