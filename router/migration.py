"""Request migration: a request's progress across attempts, and how a decode stream is lost.

After its first token a request streams from one decode worker. If that stream is lost — the
worker fails the call or cannot be reached (`unreachable`, `error`), the stream ends without a
finish reason (`ended`), or no message comes for `decode_stall_s` (`stalled`: a hung worker) —
the router re-prefills the prompt plus every token generated so far on another pair (never
the lost worker) and continues the same client stream: `Progress` holds what was sent, so
no token is repeated or lost. The new attempt samples with `max_tokens` less the tokens so far
and `seed_offset` at their count, so greedy and seeded requests produce exactly the tokens of
an undisturbed run (`engine/sampler.py`). Stop strings are checked by the router's own
`StopChecker`, which lives across attempts; usage counts the original prompt and every
generated token. Each request migrates at most `max_migrations` times.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from engine.sampling import SamplingParams
from router.clients import TokenChunk, WorkerFailed


class DecodeLost(Exception):
    """The decode stream of a request's attempt was lost before its finish reason."""

    def __init__(self, worker_id: str, reason: str, detail: str) -> None:
        super().__init__(f"decode worker {worker_id} failed mid-request: {detail}")
        self.worker_id = worker_id
        self.reason = reason  # one of observability.metrics.MIGRATION_REASONS

    @property
    def worker_down(self) -> bool:
        """Whether the worker itself looks gone or hung (then it is marked down)."""
        return self.reason in ("unreachable", "stalled")

    @classmethod
    def from_failure(cls, failed: WorkerFailed) -> DecodeLost:
        reason = "unreachable" if failed.down else "error"
        return cls(failed.worker_id, reason, f"{failed.code.name}: {failed}")


@dataclass
class Progress:
    """One request across its attempts: the tokens generated so far and where it failed."""

    request_id: str
    prompt: list[int]  # the client's prompt, as tokenized
    sampling: SamplingParams  # the client's
    generated: list[int] = field(default_factory=list)  # every token relayed, in order
    cached_tokens: int | None = None  # prompt tokens cached on the first attempt's pair
    attempts: int = 0  # attempt ids handed out: each attempt's id is fresh
    lost: list[DecodeLost] = field(default_factory=list)  # one per migration, in order

    def next_attempt_id(self) -> str:
        attempt_id = f"{self.request_id}.{self.attempts}"
        self.attempts += 1
        return attempt_id

    @property
    def attempt_prompt(self) -> list[int]:
        """What the next attempt prefills: the prompt and the tokens generated so far."""
        return self.prompt + self.generated

    @property
    def attempt_sampling(self) -> SamplingParams:
        """The client's sampling, less what was generated: the next attempt's first token is
        output position `len(generated)`."""
        if not self.generated:
            return self.sampling
        return dataclasses.replace(
            self.sampling, max_tokens=self.sampling.max_tokens - len(self.generated),
            seed_offset=self.sampling.seed_offset + len(self.generated))

    @property
    def lost_workers(self) -> set[str]:
        """Decode workers this request lost a stream on: never tried again for it."""
        return {lost.worker_id for lost in self.lost}

    def lost_summary(self) -> str:
        return "; ".join(str(lost) for lost in self.lost)


async def within_stall_bound(chunks: AsyncIterator[TokenChunk], worker_id: str,
                             stall_s: float) -> AsyncGenerator[TokenChunk, None]:
    """`chunks`, unchanged, as long as each arrives within `stall_s` of the one before (or of
    the start); otherwise raises DecodeLost("stalled"). A failure of the stream itself is
    raised as DecodeLost too."""
    iterator = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(stall_s):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DecodeLost(worker_id, "stalled",
                             f"no token for {stall_s:g} s (decode_stall_s)") from None
        except WorkerFailed as failed:
            raise DecodeLost.from_failure(failed) from None
        yield chunk
