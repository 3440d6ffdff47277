"""A request's metrics, recorded as its stream goes by: TTFT, inter-token gaps, the outcome.

The outcome is the finish reason of the last message, the status code name of the error that
ended the stream, or "cancelled" when the client went away; it is counted whatever happens.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator

from cluster.grpc_errors import status_for
from observability.metrics import RouterMetrics
from router.request import Delta


async def measured(deltas: AsyncIterator[Delta], metrics: RouterMetrics,
                   outcomes: Counter[str]) -> AsyncGenerator[Delta, None]:
    """`deltas`, unchanged, with the request's metrics recorded (see the module doc)."""
    metrics.request_started()
    started = last_at = time.perf_counter()
    ttft: float | None = None
    outcome, usage = "cancelled", None
    try:
        async for delta in deltas:
            now = time.perf_counter()
            if ttft is None:
                ttft = now - started
                metrics.first_token(ttft)
            elif delta.token_ids:
                metrics.inter_token((now - last_at) / len(delta.token_ids))
            last_at = now
            if delta.finish_reason is not None:
                outcome, usage = delta.finish_reason, delta.usage
            yield delta
    except Exception as error:
        outcome = status_for(error)[0].name
        raise
    finally:
        outcomes[outcome] += 1
        metrics.request_finished(
            outcome, time.perf_counter() - started,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            generation_tokens=usage.completion_tokens if usage else 0,
            cached_tokens=usage.cached_tokens if usage else 0, ttft_seconds=ttft)
