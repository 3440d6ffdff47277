"""What routing policies see: worker loads, the request's prefix hits, and the router's own
in-flight assignments. Plain dataclasses (no protobuf): the service converts at its edge.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cluster.roles import Role


@dataclass(frozen=True)
class WorkerLoad:
    """One candidate worker: its last report, plus the router's own in-flight counts."""

    worker_id: str
    role: Role
    running: int = 0  # reported: requests in the running batch
    waiting: int = 0  # reported: requests queued at the worker
    kv_blocks_used: int = 0  # reported
    kv_blocks_total: int = 0  # reported
    max_running: int = 0  # reported: the running batch's capacity (0: unknown)
    queued_prompt_blocks: int = 0  # reported (prefill): prompt blocks queued, not yet computed
    in_flight: int = 0  # router: its assignments to this worker that have not ended
    in_flight_prompt_blocks: int = 0  # router: prompt blocks it sent here, not yet prefilled

    @property
    def requests(self) -> int:
        """Requests on the worker. The report lags and the router's count misses other routers'
        requests; each is a lower bound, so take the larger (summing would count ours twice)."""
        return max(self.running + self.waiting, self.in_flight)

    @property
    def queued_blocks(self) -> int:
        """Prompt blocks waiting to be prefilled here (same max() reasoning as `requests`)."""
        return max(self.queued_prompt_blocks, self.in_flight_prompt_blocks)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, in [0, 1]; 0 when unknown."""
        if self.kv_blocks_total <= 0:
            return 0.0
        return min(self.kv_blocks_used / self.kv_blocks_total, 1.0)


@dataclass(frozen=True)
class RouteRequest:
    """What a policy needs to know of one request."""

    prompt_blocks: int  # full blocks in the prompt
    prefix_hits: Mapping[str, int] = field(default_factory=dict)  # worker id -> leading blocks


@dataclass(frozen=True)
class Route:
    """The chosen pair; one worker in both places (`local`) prefills and decodes the request
    itself, with no transfer (an aggregated worker)."""

    prefill: str
    decode: str

    @property
    def local(self) -> bool:
        return self.prefill == self.decode


class Assignment:
    """One routed request in flight; end each phase exactly once (extra calls are no-ops)."""

    def __init__(self, tracker: InFlightTracker, route: Route, prefill_blocks: int) -> None:
        self.route = route
        self._tracker = tracker
        self._prefill_blocks = prefill_blocks
        self._prefilling = True
        self._active = True

    def prefill_done(self) -> None:
        """The prefill worker returned (first token, or failure)."""
        if self._prefilling:
            self._prefilling = False
            # a local route's one worker keeps the request until `finish`
            self._tracker.release(self.route.prefill, self._prefill_blocks,
                                  requests=0 if self.route.local else 1)

    def finish(self) -> None:
        """The request ended, however (call it in `finally`)."""
        self.prefill_done()
        if self._active:
            self._active = False
            self._tracker.release(self.route.decode)


class InFlightTracker:
    """Counts the router's own assignments per worker, so that a burst of requests sees the
    load it is creating before any worker reports it."""

    def __init__(self) -> None:
        self._requests: Counter[str] = Counter()
        self._prefill_blocks: Counter[str] = Counter()

    def assign(self, route: Route, prefill_blocks: int) -> Assignment:
        """Records a routed request; `prefill_blocks` is what P must compute."""
        self._requests[route.decode] += 1
        if not route.local:
            self._requests[route.prefill] += 1
        self._prefill_blocks[route.prefill] += prefill_blocks
        return Assignment(self, route, prefill_blocks)

    def release(self, worker_id: str, prefill_blocks: int = 0, requests: int = 1) -> None:
        """One assignment to `worker_id` ended (use `Assignment`, which calls it once)."""
        self._requests[worker_id] -= requests
        self._prefill_blocks[worker_id] -= prefill_blocks

    def in_flight(self, worker_id: str) -> int:
        return self._requests[worker_id]

    def apply(self, loads: Sequence[WorkerLoad]) -> list[WorkerLoad]:
        """`loads` with the router's in-flight counts filled in (the same object where they
        are what it holds: every request asks, for every worker)."""
        requests, blocks = self._requests, self._prefill_blocks
        out = []
        for w in loads:
            in_flight, prompt_blocks = requests.get(w.worker_id, 0), blocks.get(w.worker_id, 0)
            out.append(w if in_flight == w.in_flight and prompt_blocks ==
                       w.in_flight_prompt_blocks else dataclasses.replace(
                           w, in_flight=in_flight, in_flight_prompt_blocks=prompt_blocks))
        return out
