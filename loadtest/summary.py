"""A run point's figures from its records: latency percentiles, throughput, errors, goodput.

Latencies are of requests that ended well (`ok`): TTFT (send to first token), ITL (every gap
between token messages, pooled over requests), TPOT (per request, (last - first token) /
(output tokens - 1)) and end-to-end. Throughput and goodput divide by the point's measured
length. Goodput counts the `ok` requests within both SLOs (an SLO not given always holds; a
one-token answer has no TPOT and meets that SLO), as DistServe defines it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.records import CANCELLED, ERROR, OK, RequestRecord

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    """Latency objectives in seconds; None: no objective."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        if record.outcome != OK:
            return False
        ttft, tpot = record.ttft, record.tpot
        if self.ttft_s is not None and (ttft is None or ttft > self.ttft_s):
            return False
        return self.tpot_s is None or tpot is None or tpot <= self.tpot_s


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 / mean / count (numpy's linear percentiles); None when empty."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "count": 0}
    array = np.asarray(values, dtype=np.float64)
    out: dict[str, float | None] = {
        f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(array, PERCENTILES),
                                          strict=True)}
    out["mean"] = float(array.mean())
    out["count"] = len(array)
    return out


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: Slo) -> dict[str, Any]:
    """Everything the report says about one point."""
    ok = [r for r in records if r.outcome == OK]
    errors = [r for r in records if r.outcome == ERROR]
    cancelled = sum(r.outcome == CANCELLED for r in records)
    ended = len(ok) + len(errors)
    good = sum(slo.met_by(r) for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok if r.cached_tokens is not None)
    cached = sum(r.cached_tokens or 0 for r in ok)
    per_s = 1 / duration_s if duration_s > 0 else 0.0
    return {
        "duration_s": duration_s,
        "requests": {"sent": len(records), "ok": len(ok), "errors": len(errors),
                     "cancelled": cancelled, "error_rate": len(errors) / ended if ended else 0.0},
        "errors_by_code": dict(Counter(r.error_code or "" for r in errors)),
        "throughput": {"requests_per_s": len(ok) * per_s,
                       "output_tokens_per_s": out_tokens * per_s,
                       "input_tokens_per_s": in_tokens * per_s},
        "goodput": {"requests_per_s": good * per_s, "fraction_ok": good / len(ok) if ok else 0.0,
                    "slo_ttft_s": slo.ttft_s, "slo_tpot_s": slo.tpot_s},
        "latency_s": {
            "ttft": distribution([r.ttft for r in ok if r.ttft is not None]),
            "itl": distribution([gap for r in ok for gap in r.itl]),
            "tpot": distribution([t for r in ok if (t := r.tpot) is not None]),
            "e2e": distribution([e for r in ok if (e := r.e2e) is not None]),
        },
        "tokens": {"input": in_tokens, "output": out_tokens,
                   "cached_prompt_ratio": cached / prompt if prompt else None},
    }


def tokens_over_time(records: Sequence[RequestRecord], bin_s: float = 1.0,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Output tokens per second in `bin_s` bins from the point's start: (bin starts, rates)."""
    times = [t for r in records for t in r.chunk_times]
    counts = [c for r in records for c in r.chunk_tokens]
    if not times:
        return np.zeros(0), np.zeros(0)
    edges = np.arange(0.0, max(times) + bin_s, bin_s)
    if len(edges) < 2:
        edges = np.array([0.0, bin_s])
    hist, edges = np.histogram(times, bins=edges, weights=counts)
    return edges[:-1], hist / bin_s
