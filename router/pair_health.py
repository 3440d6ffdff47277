"""Which (prefill, decode) pairs currently fail to move KV, so routing avoids them for a while.

A pair whose transfer fails `threshold` times in a row is *broken*: it is listed in the cluster
status's pair errors with the last failure, and not picked, for `backoff_s`. Then it is tried
again (one request may go to it); a success heals it, another failure breaks it again with the
backoff doubled, up to `max_backoff_s`. A prefill worker reconnects a lost transfer link on the
next request it gets for that decode worker, so a pair broken by a stall (a GC pause, a
`SIGSTOP`, a network blip) heals on that retry instead of staying broken for good. Pure and
synchronous; the clock is injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Pair = tuple[str, str]  # (prefill worker id, decode worker id)


@dataclass
class _PairState:
    failures: int = 0  # in a row
    broken_until: float = 0.0
    backoff_s: float = 0.0
    last_error: str = ""


class PairHealth:
    """Transfer failures per pair, with a breaker per pair (see the module doc)."""

    def __init__(self, threshold: int = 2, backoff_s: float = 2.0, max_backoff_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if threshold < 1:
            raise ValueError(f"threshold: must be >= 1, got {threshold}")
        self.threshold = threshold
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._pairs: dict[Pair, _PairState] = {}
        self.breaks = 0  # times a pair became broken, for a metric

    def failed(self, pair: Pair, why: str) -> bool:
        """Records a failed transfer; returns whether the pair is now broken."""
        state = self._pairs.setdefault(pair, _PairState())
        state.failures += 1
        state.last_error = why
        if state.failures < self.threshold:
            return False
        state.backoff_s = min(state.backoff_s * 2 or self.backoff_s, self.max_backoff_s)
        state.broken_until = self._clock() + state.backoff_s
        self.breaks += 1
        return True

    def succeeded(self, pair: Pair) -> None:
        """A transfer of the pair worked: it is healthy again."""
        self._pairs.pop(pair, None)

    def broken(self) -> dict[Pair, str]:
        """Pairs not to pick now → why (their backoff has not run out)."""
        now = self._clock()
        return {pair: f"KV transfer failing ({state.failures} in a row, retried in "
                      f"{state.broken_until - now:.1f} s): {state.last_error}"
                for pair, state in self._pairs.items() if state.broken_until > now}

    def forget(self, worker_id: str) -> None:
        """Drops the pairs of a worker that left the cluster."""
        for pair in [p for p in self._pairs if worker_id in p]:
            del self._pairs[pair]
