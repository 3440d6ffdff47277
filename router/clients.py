"""Typed clients of the workers' internal services, as the router uses them.

    decode = DecodeClient(handle_id, channel, timeouts)
    reservation = await decode.reserve(attempt_id, prompt, sampling, lease_ms, salt)
    first = await prefill.prefill(attempt_id, prompt, sampling, reservation, salt)
    async with decode.stream(attempt_id, first.token_id) as tokens:
        async for chunk in tokens: ...

Each call owns its deadline and turns a gRPC failure into what the router acts on:

| the worker answers                      | raised                   | the router then             |
| --------------------------------------- | ------------------------ | --------------------------- |
| INVALID_ARGUMENT                        | InvalidRequest (field)   | fails the request           |
| RESOURCE_EXHAUSTED                      | WorkerFull               | tries another worker        |
| ABORTED (prefill: the KV transfer)      | PairFailed               | another pair; pair breaker  |
| FAILED_PRECONDITION (prefill: handshake)| PairFailed               | another pair; pair breaker  |
| UNAVAILABLE, DEADLINE_EXCEEDED          | WorkerFailed(down=True)  | marks it down, another pair |
| anything else                           | WorkerFailed(down=False) | another pair                |

Only a worker that cannot be reached or does not answer in time is marked down: NOT_FOUND (a
lease ran out), ALREADY_EXISTS or INTERNAL say something about one request, not the worker.
The call spans (CLIENT) and the `traceparent` metadata come from the gRPC instrumentation on
the channel (`observability.grpc_tracing`); a decode stream's span ends when `stream` exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

import grpc
from grpc import aio

from cluster.convert import FINISH_FROM_PB
from cluster.errors import InvalidRequest
from tandem_proto.tandem.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    worker_pb2_grpc,
)

log = logging.getLogger(__name__)

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_PAIR_FAILURES = {grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION}


@dataclass(frozen=True)
class ClientTimeouts:
    """Deadlines of the router's calls to workers, in seconds."""

    rpc_s: float  # Reserve
    prefill_s: float  # Prefill (a long prompt, queued, included), a local route's first token
    status_s: float  # one status poll
    cleanup_s: float  # a best-effort Cancel


class WorkerFull(Exception):
    """The worker has no free KV blocks for this prompt now."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(f"{worker_id} is full")
        self.worker_id = worker_id


class WorkerFailed(Exception):
    """A call to one worker failed; `down` says whether the worker itself looks gone."""

    def __init__(self, worker_id: str, hop: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{hop} on {worker_id}: {code.name}: {details}")
        self.worker_id = worker_id
        self.hop = hop  # "reserve", "prefill" or "decode": the retry metric's label
        self.code = code
        self.down = code in _UNREACHABLE


class PairFailed(Exception):
    """The prefill worker could not move the KV to the chosen decode worker."""

    def __init__(self, prefill_id: str, decode_id: str, code: grpc.StatusCode,
                 details: str) -> None:
        super().__init__(f"KV transfer {prefill_id} -> {decode_id}: {code.name}: {details}")
        self.prefill_id = prefill_id
        self.decode_id = decode_id
        self.code = code


class Reservation(NamedTuple):
    """Blocks a decode worker reserved for one attempt."""

    block_ids: list[int]  # blocks the prefill worker must fill, in prompt order
    num_cached_blocks: int  # leading prompt blocks the decode worker already held
    num_cached_tokens: int
    endpoint: common_pb2.TransferEndpoint  # where the prefill worker writes
    lease_expires_unix_ms: int
    grant: common_pb2.TransferGrant  # the decode worker's permission, passed to the prefill


class FirstToken(NamedTuple):
    """What a prefill returned once the KV had landed on the decode worker."""

    token_id: int
    num_computed_tokens: int
    num_cached_tokens: int  # prompt tokens the prefill worker took from its prefix cache
    num_blocks_sent: int


class TokenChunk(NamedTuple):
    """Tokens from a decode stream; the last chunk has `finish_reason`."""

    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "cancelled" on the last chunk


class WorkerClient:
    """What every worker answers (`tandem.v1.Worker`)."""

    hop = "worker"

    def __init__(self, worker_id: str, channel: aio.Channel, timeouts: ClientTimeouts,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        """`metadata`: sent with every call (the cluster secret's credential)."""
        self.worker_id = worker_id
        self.timeouts = timeouts
        self.metadata = tuple(metadata)
        self._worker = worker_pb2_grpc.WorkerStub(channel)

    async def status(self) -> common_pb2.WorkerStatus:
        """The worker's status; raises WorkerFailed."""
        try:
            return await self._worker.Status(common_pb2.StatusRequest(),
                                             timeout=self.timeouts.status_s,
                                             metadata=self.metadata)
        except aio.AioRpcError as error:
            self._raise(error, "status")

    async def cancel(self, request_id: str, reason: str) -> None:
        """Best effort: drops what the worker holds for `request_id`; a failure is logged
        (the worker's lease or its own cleanup frees it anyway), never raised."""
        try:
            await self._worker.Cancel(common_pb2.CancelRequest(request_id=request_id,
                                                                reason=reason),
                                      timeout=self.timeouts.cleanup_s, metadata=self.metadata)
        except aio.AioRpcError as error:
            log.info("cancel of %s on %s: %s %s", request_id, self.worker_id,
                     error.code().name, error.details())

    def _raise(self, error: aio.AioRpcError, hop: str) -> NoReturn:
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            field, sep, message = details.partition(": ")
            raise InvalidRequest(field if sep else "request", message if sep else details)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise WorkerFull(self.worker_id)
        raise WorkerFailed(self.worker_id, hop, code, details)


class PrefillClient(WorkerClient):
    """A prefill worker (`tandem.v1.Prefill`)."""

    def __init__(self, worker_id: str, channel: aio.Channel, timeouts: ClientTimeouts,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(worker_id, channel, timeouts, metadata)
        self._stub = prefill_pb2_grpc.PrefillStub(channel)

    async def prefill(self, request_id: str, prompt: list[int],
                      sampling: common_pb2.SamplingParams, decode_id: str,
                      reservation: Reservation, cache_salt: str | None) -> FirstToken:
        """Computes the prompt, writes its KV into `reservation`'s blocks on `decode_id`, and
        returns the first token once it has landed. Raises InvalidRequest, PairFailed,
        WorkerFailed."""
        target = prefill_pb2.DecodeTarget(endpoint=reservation.endpoint,
                                          block_ids=reservation.block_ids,
                                          num_cached_blocks=reservation.num_cached_blocks,
                                          grant=reservation.grant)
        try:
            reply = await self._stub.Prefill(prefill_pb2.PrefillRequest(
                request_id=request_id, token_ids=prompt, sampling=sampling, target=target,
                cache_salt=cache_salt), timeout=self.timeouts.prefill_s, metadata=self.metadata)
        except aio.AioRpcError as error:
            if error.code() in _PAIR_FAILURES:
                raise PairFailed(self.worker_id, decode_id, error.code(),
                                 error.details() or "") from None
            self._raise(error, "prefill")
        return FirstToken(reply.first_token_id, reply.num_computed_tokens,
                          reply.num_cached_tokens, reply.num_blocks_sent)


class DecodeClient(WorkerClient):
    """A decode worker (`tandem.v1.Decode`)."""

    def __init__(self, worker_id: str, channel: aio.Channel, timeouts: ClientTimeouts,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(worker_id, channel, timeouts, metadata)
        self._stub = decode_pb2_grpc.DecodeStub(channel)

    async def reserve(self, request_id: str, prompt: list[int],
                      sampling: common_pb2.SamplingParams, lease_ms: int,
                      cache_salt: str | None) -> Reservation:
        """Reserves blocks for the prompt. Raises InvalidRequest, WorkerFull, WorkerFailed."""
        try:
            reply = await self._stub.Reserve(decode_pb2.ReserveRequest(
                request_id=request_id, token_ids=prompt, sampling=sampling, lease_ms=lease_ms,
                cache_salt=cache_salt), timeout=self.timeouts.rpc_s, metadata=self.metadata)
        except aio.AioRpcError as error:
            self._raise(error, "reserve")
        return Reservation(list(reply.block_ids), reply.num_cached_blocks,
                           reply.num_cached_tokens, reply.endpoint,
                           reply.lease_expires_unix_ms, reply.grant)

    @contextlib.asynccontextmanager
    async def stream(self, request_id: str, first_token: int | None,
                     ) -> AsyncIterator[AsyncIterator[TokenChunk]]:
        """The tokens after `first_token` (None: the worker prefills the prompt itself and
        the stream starts with the first token), as `TokenChunk`s; iteration raises
        WorkerFailed. Leaving the block early cancels the call (the worker frees the request)
        and ends its span at once."""
        call = self._stub.Decode(decode_pb2.DecodeRequest(request_id=request_id,
                                                          first_token_id=first_token),
                                 metadata=self.metadata)
        try:
            yield self._chunks(call)
        finally:
            if call.cancel():  # not finished: read on to the cancellation, ending the span
                with contextlib.suppress(asyncio.CancelledError, aio.AioRpcError):
                    await call.read()

    async def _chunks(self, call: aio.UnaryStreamCall) -> AsyncIterator[TokenChunk]:
        try:
            async for message in call:
                yield TokenChunk(list(message.token_ids),
                                 FINISH_FROM_PB.get(message.finish_reason))
        except aio.AioRpcError as error:
            self._raise(error, "decode")
