"""A local route's first token: the decode stream opened without one, read up to its first.

For an aggregated worker, or a prompt short enough to skip disaggregation, the router opens
`Decode` with no first token: the worker prefills the prompt itself and its stream starts with
the first token. The router reads that first message inside the attempt (so a failure before
the first token is still retried on another worker, as for a pair) and keeps the stream open;
the rest of it is read after the first token has gone to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from router.clients import DecodeClient, FirstToken, Reservation, TokenChunk, WorkerFailed


class LocalStream:
    """An open decode stream whose first token was read; `rest()` reads the others."""

    def __init__(self, stack: contextlib.AsyncExitStack, chunks: AsyncIterator[TokenChunk],
                 rest_of_first: TokenChunk) -> None:
        self._stack = stack
        self._chunks = chunks
        self._rest_of_first = rest_of_first  # what the first message held after the token

    @contextlib.asynccontextmanager
    async def rest(self) -> AsyncIterator[AsyncIterator[TokenChunk]]:
        """The chunks after the first token; leaving the block closes (or cancels) the call."""
        async with self._stack:
            yield self._after_first()

    async def close(self) -> None:
        """Closes (or cancels) the call if `rest()` never read it; a no-op after `rest()`."""
        await self._stack.aclose()

    async def _after_first(self) -> AsyncIterator[TokenChunk]:
        first = self._rest_of_first
        if first.token_ids or first.finish_reason is not None:
            yield first
        async for chunk in self._chunks:
            yield chunk


async def open_local(decode: DecodeClient, attempt_id: str, prompt_tokens: int,
                     reservation: Reservation, timeout_s: float,
                     ) -> tuple[FirstToken, LocalStream]:
    """Opens `attempt_id`'s decode stream without a first token and reads up to it, for
    `timeout_s` at most (the deadline of a prefill). Raises WorkerFailed (the stream failed,
    ended first, or ran past the deadline: DEADLINE_EXCEEDED); the stream is closed then."""
    stack = contextlib.AsyncExitStack()
    try:
        chunks = await stack.enter_async_context(decode.stream(attempt_id, None))
        try:
            async with asyncio.timeout(timeout_s):
                first, rest = await _first_of(decode, chunks, prompt_tokens, reservation)
        except TimeoutError:
            raise WorkerFailed(decode.worker_id, "decode", grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no first token within {timeout_s:g} s "
                               "(prefill_timeout_s)") from None
        return first, LocalStream(stack, chunks, rest)
    except BaseException:
        await stack.aclose()
        raise


async def _first_of(decode: DecodeClient, chunks: AsyncIterator[TokenChunk], prompt_tokens: int,
                    reservation: Reservation) -> tuple[FirstToken, TokenChunk]:
    async for chunk in chunks:
        if chunk.token_ids:
            cached = reservation.num_cached_tokens
            first = FirstToken(chunk.token_ids[0], prompt_tokens - cached, cached, 0)
            return first, TokenChunk(chunk.token_ids[1:], chunk.finish_reason)
        if chunk.finish_reason is not None:
            raise WorkerFailed(decode.worker_id, "decode", grpc.StatusCode.ABORTED,
                               f"released before its first token ({chunk.finish_reason})")
    raise WorkerFailed(decode.worker_id, "decode", grpc.StatusCode.ABORTED,
                       "the stream ended before its first token")
