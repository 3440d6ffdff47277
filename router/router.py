"""The request lifecycle: validate, admit, route, reserve, prefill, stream.

    client ─Generate─▶ router ─Reserve─▶ D ; ─Prefill(D's blocks)─▶ P ─KV over UCX─▶ D
                       router ◀─first token─ P   (streamed to the client at once)
                       router ─Decode(first token)─▶ D ─tokens─▶ router ─▶ client

A local route (an aggregated worker, or — conditional disaggregation — a decode worker whose
reservation shows at most `local_prefill_max_tokens` uncached prompt tokens) skips the prefill
worker: the router opens the decode stream without a first token, the worker prefills the
prompt itself, and the stream's first token is the request's (`router.local`).

Before the first token a failed hop is retried on another pair (up to `max_attempts`), each
attempt with its own id (`<request id>.<n>`, n counting every attempt of the request, retries
and migrations alike) so a late write, event or cancel of a failed attempt never touches the
next one. A worker that cannot be reached, or a prefill that runs past `prefill_timeout_s`, is
marked down; a pair whose KV transfer fails is counted by `PairHealth` and avoided while it
keeps failing. After the first token the request streams from its decode worker; if that
stream is lost (the worker fails the call or is unreachable, the stream ends early, or no
token comes for `decode_stall_s`), the request migrates (`router.migration`): the prompt and
the tokens so far are prefilled on another pair, never the lost worker, and the same client
stream continues with no token repeated or lost; past `max_migrations` it ends with
UNAVAILABLE naming the workers. If the worker releases the request it ends with
FINISH_REASON_CANCELLED. Whatever ends an attempt or a request (finish, stop string, client
cancel, error, migration) frees its admission slot and, in the background, whatever the
workers still hold for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry

from cluster.convert import sampling_to_pb
from cluster.errors import AlreadyRunning, NoCapacity, NoWorker
from cluster.roles import Role
from engine.block_hash import BlockHash, hash_prompt_blocks
from engine.model_config import ModelConfig
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from observability.metrics import RouterMetrics
from observability.tracing import record_span, span
from router.admission import Admission
from router.clients import FirstToken, PairFailed, TokenChunk, WorkerFailed, WorkerFull
from router.config import RouterConfig
from router.decide import PREFIX_POLICIES, Decider
from router.load import Assignment, InFlightTracker, Route
from router.local import LocalStream, open_local
from router.measure import measured
from router.migration import DecodeLost, Progress, within_stall_bound
from router.pair_health import PairHealth
from router.policies import Policy, make_policy
from router.prefix import PrefixLookup
from router.request import Delta, GenerateInput, Usage
from router.stale_index import is_stale
from router.stats import RouterStats
from router.stops import StopChecker
from router.validate import PromptValidator, request_limits
from router.workers import WorkerPool

log = logging.getLogger(__name__)


class _Bound(NamedTuple):
    """A request after its first token: the decode worker that holds it."""

    decode_id: str
    attempt_id: str
    first: FirstToken
    assignment: Assignment
    local: LocalStream | None  # a local prefill's stream, open, its first token read


class Router:
    def __init__(self, config: RouterConfig, pool: WorkerPool, lookup: PrefixLookup) -> None:
        self.config = config
        self.pool = pool
        self.lookup = lookup
        self.tokenizer = Tokenizer.from_dir(config.model)
        self.validator = PromptValidator(self.tokenizer, ModelConfig.from_dir(config.model),
                                         request_limits(config))
        self.policy: Policy = make_policy(config.policy)
        self.decider = Decider(self.policy, lookup)
        self.tracker = InFlightTracker()
        self.admission = Admission(config.max_inflight, config.max_queue, config.queue_timeout_s)
        self.pair_health = PairHealth()
        pool.on_removed.append(self.pair_health.forget)
        self.stats = RouterStats()
        self.registry = CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)
        self.metrics.watch(
            queue_depth=lambda: self.admission.waiting,
            inflight=lambda: self.admission.inflight,
            index_mode=lambda: self.lookup.mode.value,
            live_workers=lambda: {r.value: len(pool.live(r)) for r in Role})
        self._running: set[str] = set()  # request ids being served: a duplicate is refused
        self._tasks: set[asyncio.Future[None]] = set()

    async def close(self) -> None:
        """Lets pending cleanup calls finish (`cleanup_timeout_s` at most), then stops the
        index tail and the worker pool."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.config.cleanup_timeout_s)
        await self.lookup.close()
        await self.pool.close()

    def excluded_pairs(self) -> dict[tuple[str, str], str]:
        """Pairs never to pick now, with why: incompatible KV layouts, or failing transfers."""
        return {**self.pair_health.broken(), **self.pool.incompatible_pairs()}

    def generate(self, request: GenerateInput) -> AsyncGenerator[Delta, None]:
        """Streams a request's deltas, its metrics recorded whatever ends it (`aclose()` it,
        or let its task be cancelled, to cancel the request)."""
        return measured(self._generate(request), self.metrics, self.stats.outcomes)

    async def _generate(self, request: GenerateInput) -> AsyncIterator[Delta]:
        prompt = await self.validator.prompt_ids(request)
        if request.request_id in self._running:
            raise AlreadyRunning(f"request_id: {request.request_id!r} is already running")
        self._running.add(request.request_id)
        self.stats.requests += 1
        queued_at = time.perf_counter()
        try:
            async with self.admission.slot():
                waited = time.perf_counter() - queued_at
                self.metrics.queued(waited)
                record_span("router.queue", parent=None, duration_s=waited,
                            attributes={"tandem.queue_depth": self.admission.waiting})
                progress = Progress(request.request_id, prompt, request.sampling)
                stops = StopChecker(self.tokenizer, request.stop)
                while True:
                    bound = await self._first_token(progress, request)
                    try:
                        async for delta in self._stream(bound, progress, stops):
                            yield delta
                        return
                    except DecodeLost as lost:
                        self._migrate(progress, lost)
        finally:
            self._running.discard(request.request_id)

    def _migrate(self, progress: Progress, lost: DecodeLost) -> None:
        """Counts a lost decode stream as a migration, or raises NoWorker past the limit."""
        progress.lost.append(lost)
        if len(progress.lost) > self.config.max_migrations:
            raise NoWorker(f"request {progress.request_id}: {progress.lost_summary()}; not "
                           f"migrated again (max_migrations={self.config.max_migrations})")
        self.stats.migrations[lost.reason] += 1
        self.metrics.migration(lost.reason)
        log.warning("request %s: migrating to another pair after %d tokens (migration %d of "
                    "at most %d): %s", progress.request_id, len(progress.generated),
                    len(progress.lost), self.config.max_migrations, lost)

    # ---- before the first token: route, reserve, prefill, retry --------------------------

    async def _first_token(self, progress: Progress, request: GenerateInput) -> _Bound:
        """The next attempt's first token: the client's first, or — after a lost decode
        stream — the one after the tokens so far (then excluding every lost worker, and a
        failure names them)."""
        try:
            return await self._attempts(progress, request)
        except NoWorker as failed:
            if not progress.lost:
                raise
            raise NoWorker(f"request {progress.request_id}: {progress.lost_summary()}; "
                           f"migrating it failed: {failed}") from None

    async def _attempts(self, progress: Progress, request: GenerateInput) -> _Bound:
        prompt, sampling = progress.attempt_prompt, progress.attempt_sampling
        hashes = hash_prompt_blocks(prompt, self.config.block_size, request.cache_salt.encode(),
                                    self.config.hash_seed)
        excluded = set(progress.lost_workers)  # workers, for this request
        failed_pairs: set[tuple[str, str]] = set()
        errors: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.queue_timeout_s
        attempt = 0
        while attempt < self.config.max_attempts:
            route, prefill_blocks, hits = await self._route(hashes, excluded, failed_pairs,
                                                            errors, attempt)
            assignment = self.tracker.assign(route, prefill_blocks)
            attempt_id = progress.next_attempt_id()
            try:
                first, local = await self._try_pair(route, attempt_id, prompt, sampling,
                                                    request.cache_salt, hits)
            except WorkerFull as full:
                assignment.finish()
                excluded.add(full.worker_id)
                if loop.time() > deadline:
                    raise NoCapacity("every decode worker is out of KV blocks") from None
                if {h.worker_id for h in self.pool.live(Role.DECODE)
                        + self.pool.live(Role.AGGREGATED)} <= excluded:
                    # everyone was full: wait a little and try again (lost workers stay out)
                    excluded = set(progress.lost_workers)
                    await asyncio.sleep(self.config.no_capacity_backoff_s)
                continue
            except (WorkerFailed, PairFailed) as failed:
                assignment.finish()
                errors.append(str(failed))
                self._note_failure(failed, excluded, failed_pairs)
                attempt += 1
                log.warning("request %s attempt %d failed: %s", request.request_id, attempt,
                            failed)
                continue
            except BaseException:
                assignment.finish()
                raise
            assignment.prefill_done()
            if local is None:
                self.pair_health.succeeded((route.prefill, route.decode))
            return _Bound(route.decode, attempt_id, first, assignment, local)
        raise NoWorker(f"request {request.request_id} failed on {attempt} worker pairs: "
                       + "; ".join(errors))

    async def _route(self, hashes: list[BlockHash], excluded: set[str],
                     failed_pairs: set[tuple[str, str]], errors: list[str],
                     attempt: int) -> tuple[Route, int, dict[str, int]]:
        """The pair for this attempt, the prompt blocks its prefill worker must compute, and
        the index's leading cached blocks per worker ({} when not looked up)."""
        aggregated = self.pool.live(Role.AGGREGATED)  # candidates in both roles (policies.py)
        prefill = [h for h in self.pool.live(Role.PREFILL) + aggregated
                   if h.worker_id not in excluded]
        decode = [h for h in self.pool.live(Role.DECODE) + aggregated
                  if h.worker_id not in excluded]
        if not prefill or not decode:
            missing = "prefill" if not prefill else "decode"
            raise NoWorker(f"no live {missing} worker"
                           + (f" (tried: {'; '.join(errors)})" if errors else ""))
        with span("router.route") as route_span:
            decision = await self.decider.decide(
                hashes, self.tracker.apply([h.load() for h in prefill]),
                self.tracker.apply([h.load() for h in decode]),
                incompatible={*self.excluded_pairs(), *failed_pairs})
            route, hits = decision.route, decision.hits
            if route_span.is_recording():  # tracing off: no attributes to build
                route_span.set_attributes({
                    "tandem.policy": decision.policy, "tandem.index_mode": decision.mode.value,
                    "tandem.prefill": route.prefill, "tandem.decode": route.decode,
                    "tandem.prefix_hit_blocks.prefill": hits.get(route.prefill, 0),
                    "tandem.prefix_hit_blocks.decode": hits.get(route.decode, 0),
                    "tandem.prompt_blocks": len(hashes), "tandem.attempt": attempt})
        self.stats.decisions[f"{decision.policy}/{decision.mode.value}"] += 1
        self.metrics.decision(decision.policy, decision.mode.value)
        prompt_blocks = max(len(hashes), 1)
        if decision.policy in PREFIX_POLICIES:
            self.metrics.prefix_lookup(max(hits.values(), default=0), prompt_blocks)
        return route, max(prompt_blocks - hits.get(route.prefill, 0), 0), hits

    async def _try_pair(self, route: Route, attempt_id: str, prompt: list[int],
                        params: SamplingParams, cache_salt: str, hits: dict[str, int],
                        ) -> tuple[FirstToken, LocalStream | None]:
        """Reserves on D, prefills on P — or on D itself for a local route or a short
        uncached prompt (then with D's stream, open); whatever fails, nothing stays held.
        Counts a worker that held fewer blocks than the index's `hits` predicted."""
        decode = self.pool.decode_client(route.decode)
        sampling = sampling_to_pb(params)
        salt = cache_salt or None
        try:
            reservation = await decode.reserve(attempt_id, prompt, sampling,
                                               self.config.lease_ms, salt)
        except BaseException:  # failed or cancelled while reserving: D may hold blocks for us
            self._background(decode.cancel(attempt_id, "reserve failed"))
            raise
        self._check_index("decode", route.decode, hits, reservation.num_cached_blocks, prompt)
        threshold = self.config.local_prefill_max_tokens
        short = threshold is not None and \
            len(prompt) - reservation.num_cached_tokens <= threshold
        if route.local or short:
            reason = "aggregated" if route.local else "short_prompt"
            try:
                first, local = await open_local(decode, attempt_id, len(prompt), reservation,
                                                self.config.prefill_timeout_s)
            except BaseException:
                self._background(decode.cancel(attempt_id, "local prefill failed"))
                raise
            self.stats.local_prefills[reason] += 1
            self.metrics.local_prefill(reason)
            return first, local
        prefill = self.pool.prefill_client(route.prefill)
        try:
            first = await prefill.prefill(attempt_id, prompt, sampling, route.decode,
                                          reservation, salt)
        except BaseException:
            self._background(decode.cancel(attempt_id, "prefill failed"))
            self._background(prefill.cancel(attempt_id, "request ended before its first token"))
            raise
        self._check_index("prefill", route.prefill, hits,
                          first.num_cached_tokens // self.config.block_size, prompt)
        return first, None

    def _check_index(self, role: str, worker_id: str, hits: dict[str, int], reported: int,
                     prompt: list[int]) -> None:
        """Counts (and logs) a route the prefix index got wrong: `worker_id` held `reported`
        leading blocks, fewer than the index predicted (`router.stale_index`)."""
        predicted = hits.get(worker_id, 0)
        if is_stale(predicted, reported, len(prompt), self.config.block_size):
            self.stats.stale_index_routes[role] += 1
            self.metrics.stale_index_route(role)
            log.info("stale prefix index: %s worker %s held %d leading blocks, the index "
                     "said %d", role, worker_id, reported, predicted)

    def _note_failure(self, failed: WorkerFailed | PairFailed, excluded: set[str],
                      failed_pairs: set[tuple[str, str]]) -> None:
        self.stats.retries += 1
        if isinstance(failed, PairFailed):
            pair = (failed.prefill_id, failed.decode_id)
            failed_pairs.add(pair)
            self.metrics.retry("kv_transfer")
            if self.pair_health.failed(pair, str(failed)):
                log.warning("pair %s -> %s avoided for now: %s", *pair, failed)
            return
        excluded.add(failed.worker_id)
        self.metrics.retry(failed.hop)
        if failed.down:
            self.pool.mark_down(failed.worker_id, f"{failed.hop}: {failed.code.name}")

    # ---- after the first token: the decode stream ----------------------------------------

    async def _stream(self, bound: _Bound, progress: Progress,
                      stops: StopChecker) -> AsyncIterator[Delta]:
        """Relays one attempt's tokens, from its first; raises DecodeLost if its decode
        stream is lost before the finish reason (the request may migrate then)."""
        decode = self.pool.decode_client(bound.decode_id)
        if progress.cached_tokens is None:
            progress.cached_tokens = bound.first.num_cached_tokens

        def last(tokens: list[int], text: str, reason: str) -> Delta:
            usage = Usage(len(progress.prompt), progress.cached_tokens or 0,
                          len(progress.generated))
            return Delta(tokens, text, reason, usage, stops.matched)

        released = False  # the decode worker ended the request itself: nothing to cancel
        final: Delta | None = None
        try:
            progress.generated.append(bound.first.token_id)
            text, stopped = stops.push([bound.first.token_id])
            if stopped:
                yield last([bound.first.token_id], text, "stop")
                return
            yield Delta([bound.first.token_id], text)
            async with self._rest_of_stream(bound) as chunks, contextlib.aclosing(
                    within_stall_bound(chunks, decode.worker_id,
                                       self.config.decode_stall_s)) as bounded:
                async for chunk in bounded:
                    if final is not None:
                        break  # nothing may follow a finish reason
                    progress.generated += chunk.token_ids
                    text, stopped = stops.push(chunk.token_ids)
                    if stopped:
                        final = last(chunk.token_ids, text, "stop")
                        break  # leaving the stream cancels what the worker would still send
                    if chunk.finish_reason is not None:
                        released = True  # read on: the call (and its span) ends cleanly
                        final = last(chunk.token_ids, text + stops.flush(),
                                     chunk.finish_reason)
                    elif chunk.token_ids:
                        yield Delta(chunk.token_ids, text)
            if final is None:
                raise DecodeLost(decode.worker_id, "ended", "the stream ended early")
            yield final
        except DecodeLost as lost:
            if lost.worker_down:
                self.pool.mark_down(decode.worker_id, f"decode stream: {lost}")
            if final is not None:  # it failed after the last message: the request is whole
                yield final
                return
            if len(progress.generated) >= progress.sampling.max_tokens or \
                    len(progress.attempt_prompt) >= self.validator.context:
                # every token was relayed, only the finish reason was lost
                yield last([], stops.flush(), "length")
                return
            raise
        finally:
            if bound.local is not None:  # a stop string in the first token: never read on
                await bound.local.close()
            bound.assignment.finish()
            if not released:
                self._background(decode.cancel(bound.attempt_id, "router ended the stream"))

    def _rest_of_stream(self, bound: _Bound,
                        ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[TokenChunk]]:
        """The decode stream after the first token: the local prefill's, already open, or a
        new one started with the prefill worker's first token."""
        if bound.local is not None:
            return bound.local.rest()
        return self.pool.decode_client(bound.decode_id).stream(bound.attempt_id,
                                                               bound.first.token_id)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Runs a cleanup call to completion even if the request's task is cancelled."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

