"""One record per request, as measured at the client.

Times are seconds on the runner's monotonic clock from the run point's start. A stream message
carrying tokens is one arrival (`chunk_times`, `chunk_tokens`): the router sends each decode
step's tokens as they come, and an OpenAI server one token per chunk, so the gaps between
arrivals are the inter-token latencies, as vLLM's and genai-perf's benchmarks count them.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

OK, ERROR, CANCELLED = "ok", "error", "cancelled"  # cancelled: cut by the run's time bound


@dataclass
class RequestRecord:
    """What happened to one request."""

    request_id: str
    index: int
    group: str
    scheduled_s: float  # when the load said to send it
    send_s: float  # when it was sent
    input_tokens: int
    max_tokens: int
    chunk_times: list[float] = field(default_factory=list)  # arrival of each token message
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each message
    end_s: float | None = None
    outcome: str = OK
    finish_reason: str | None = None
    error_code: str | None = None  # gRPC status name or HTTP status, on errors
    error: str | None = None
    prompt_tokens: int | None = None  # as the server counted them (usage), when it says
    cached_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def output_tokens(self) -> int:
        """The server's count when it gave one (an HTTP chunk may hold several tokens), else
        the tokens of the messages received."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.send_s if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return self.end_s - self.send_s if self.end_s is not None and self.outcome == OK else None

    @property
    def itl(self) -> list[float]:
        """Gaps between successive token messages."""
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def tpot(self) -> float | None:
        """(last token - first token) / (output tokens - 1); None below two tokens."""
        if self.outcome != OK or self.output_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RequestRecord:
        return cls(**raw)
