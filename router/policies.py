"""Routing policies: pick a (prefill, decode) pair for one request.

Aggregated workers are candidates in both lists and pair only with themselves (the route is
local: no transfer); prefill and decode workers pair only with each other. A mixed cluster is
one pool of routes — every compatible (P, D) pair and every aggregated worker alone — scored
alike, so the policy weighs an aggregated worker's whole load against a pair's.

Pure and synchronous (no I/O, no protobuf): a policy sees the candidates' `WorkerLoad`s (the
router has already filled in its own in-flight counts, `router.load.InFlightTracker`), the
request's prefix hits, and the pairs known to be incompatible (transfer handshake mismatch),
which are never chosen. Empty pools, or no compatible pair, raise `NoWorker`.

Every policy breaks ties the same way: fewer in-flight assignments first, then round robin
(a rotating offset), so equal workers share requests evenly instead of herding onto the first.

`kv_aware` (the default) scores each compatible pair by, lowest wins,

    prefill_cost(P) = (max(prompt_blocks - cached_on_P, 0) + α · queued_blocks(P)) / prompt_blocks
    decode_cost(D)  = β · kv_usage(D) + γ · requests(D) / capacity(D)
                      - δ · cached_on_D / prompt_blocks
    cost(P, D)      = prefill_cost(P) + decode_cost(D)

The prefill term is Dynamo's (blocks P must compute now plus the prompt blocks queued before
it, which delay this request just as much), divided by the prompt length so that it is in the
same unit-free scale as the decode terms (a prompt's worth of work = 1). The decode terms are
llm-d's KV-usage and queue scorers, plus a smaller bonus for blocks D already holds (they are
neither sent nor allocated, but the transfer is cheap next to the prefill). `queued_blocks` and
`requests` take the larger of the worker's report and the router's in-flight count: reports lag,
the router's count does not.

Cache affinity alone herds (every request with a popular prefix onto one worker, the trap seen
in Dynamo's and SGLang's trackers), so before scoring, each role's candidates are limited to
workers whose load is within `max(min_load · max_ratio, min_load + max_lead)` requests of the
least-loaded one (SGLang's imbalance test, applied per request and per worker rather than as one
fleet-wide switch). A worker can lead the pool by at most that much, whatever its cache holds.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from cluster.errors import NoWorker
from cluster.roles import Role
from router.load import Route, RouteRequest, WorkerLoad

Pairs = Collection[tuple[str, str]]

_DEFAULT_CAPACITY = 64  # requests per decode worker when it reports no max_running


class Policy(Protocol):
    """Chooses a (prefill, decode) pair."""

    name: ClassVar[str]

    def choose(self, request: RouteRequest, prefill: Sequence[WorkerLoad],
               decode: Sequence[WorkerLoad], incompatible: Pairs = ()) -> Route:
        """The pair for `request`; raises NoWorker when there is none."""
        ...


@dataclass
class _Scored:
    worker: WorkerLoad
    cost: float
    rank: tuple[float, int, int]  # (cost, in-flight, round-robin position): lower is better


class _Rotation:
    """Round-robin positions: the candidate at the rotating offset comes first."""

    def __init__(self) -> None:
        self._offset = 0

    def positions(self, workers: Sequence[WorkerLoad]) -> dict[str, int]:
        ids = sorted(w.worker_id for w in workers)  # input order must not matter
        start = self._offset % len(ids)
        self._offset += 1
        return {worker_id: (i - start) % len(ids) for i, worker_id in enumerate(ids)}


def _score(workers: Sequence[WorkerLoad], costs: Sequence[float], rotation: _Rotation,
           use_in_flight: bool = True) -> list[_Scored]:
    position = rotation.positions(workers)
    scored = [_Scored(w, c, (round(c, 9), w.in_flight if use_in_flight else 0,
                             position[w.worker_id]))
              for w, c in zip(workers, costs, strict=True)]
    return sorted(scored, key=lambda s: s.rank)


def _partners(p: _Scored, decode: list[_Scored], at: dict[str, int],
              banned: set[tuple[str, str]]) -> Iterator[tuple[int, _Scored]]:
    """The decode candidates `p` may pair with, best first: an aggregated worker only itself,
    a prefill worker every decode worker whose pair is not banned."""
    worker_id = p.worker.worker_id
    if p.worker.role is Role.AGGREGATED:
        if worker_id in at:
            yield at[worker_id], decode[at[worker_id]]
        return
    for j, d in enumerate(decode):
        if d.worker.role is not Role.AGGREGATED and (worker_id, d.worker.worker_id) not in banned:
            yield j, d


def _best_pair(prefill: list[_Scored], decode: list[_Scored], incompatible: Pairs) -> Route:
    """The compatible pair of least total cost, ties broken by the roles' own ranks."""
    banned = set(incompatible)
    at = {d.worker.worker_id: j for j, d in enumerate(decode)
          if d.worker.role is Role.AGGREGATED}
    best: tuple[tuple[float, int, int], Route] | None = None
    for i, p in enumerate(prefill):  # sorted best-first: the first compatible D is P's best
        for j, d in _partners(p, decode, at, banned):
            key = (round(p.cost + d.cost, 9), p.rank[1] + d.rank[1], i + j)
            if best is None or key < best[0]:
                best = (key, Route(p.worker.worker_id, d.worker.worker_id))
            break
    if best is None:
        raise NoWorker("no compatible (prefill, decode) pair: every pair failed its handshake")
    return best[1]


def _check_pools(prefill: Sequence[WorkerLoad], decode: Sequence[WorkerLoad]) -> None:
    if not prefill:
        raise NoWorker("no live prefill worker")
    if not decode:
        raise NoWorker("no live decode worker")


class RoundRobin:
    """Each role in turn, ignoring load and cache (a baseline)."""

    name: ClassVar[str] = "round_robin"

    def __init__(self) -> None:
        self._prefill, self._decode = _Rotation(), _Rotation()

    def choose(self, request: RouteRequest, prefill: Sequence[WorkerLoad],
               decode: Sequence[WorkerLoad], incompatible: Pairs = ()) -> Route:
        _check_pools(prefill, decode)
        return _best_pair(_score(prefill, [0.0] * len(prefill), self._prefill, False),
                          _score(decode, [0.0] * len(decode), self._decode, False), incompatible)


class LeastLoaded:
    """Fewest requests (reported or in flight, whichever is larger) in each role."""

    name: ClassVar[str] = "least_loaded"

    def __init__(self) -> None:
        self._prefill, self._decode = _Rotation(), _Rotation()

    def choose(self, request: RouteRequest, prefill: Sequence[WorkerLoad],
               decode: Sequence[WorkerLoad], incompatible: Pairs = ()) -> Route:
        _check_pools(prefill, decode)
        return _best_pair(_score(prefill, [w.requests for w in prefill], self._prefill),
                          _score(decode, [w.requests for w in decode], self._decode),
                          incompatible)


def within_share(workers: Sequence[WorkerLoad], max_ratio: float, max_lead: int,
                 ) -> list[WorkerLoad]:
    """Workers whose load is within max(min · max_ratio, min + max_lead) of the least loaded."""
    least = min(w.requests for w in workers)
    bound = max(least * max_ratio, least + max_lead)
    return [w for w in workers if w.requests <= bound]


class KvAware:
    """Prefix-cache affinity against load (formula in the module doc)."""

    name: ClassVar[str] = "kv_aware"

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                 delta: float = 0.5, max_ratio: float = 1.5, max_lead: int = 4) -> None:
        if min(alpha, beta, gamma, delta) < 0:
            raise ValueError("alpha: weights must be >= 0")
        if max_ratio < 1 or max_lead < 0:
            raise ValueError("max_ratio: must be >= 1 (and max_lead >= 0)")
        self.alpha, self.beta, self.gamma, self.delta = alpha, beta, gamma, delta
        self.max_ratio, self.max_lead = max_ratio, max_lead
        self._prefill, self._decode = _Rotation(), _Rotation()

    def prefill_cost(self, request: RouteRequest, worker: WorkerLoad) -> float:
        blocks = max(request.prompt_blocks, 1)
        cached = request.prefix_hits.get(worker.worker_id, 0)
        todo = max(request.prompt_blocks - cached, 0)
        return (todo + self.alpha * worker.queued_blocks) / blocks

    def decode_cost(self, request: RouteRequest, worker: WorkerLoad) -> float:
        blocks = max(request.prompt_blocks, 1)
        cached = min(request.prefix_hits.get(worker.worker_id, 0), blocks)
        capacity = worker.max_running or _DEFAULT_CAPACITY
        return (self.beta * worker.kv_usage + self.gamma * worker.requests / capacity
                - self.delta * cached / blocks)

    def choose(self, request: RouteRequest, prefill: Sequence[WorkerLoad],
               decode: Sequence[WorkerLoad], incompatible: Pairs = ()) -> Route:
        _check_pools(prefill, decode)
        try:
            return self._choose(request, within_share(prefill, self.max_ratio, self.max_lead),
                                within_share(decode, self.max_ratio, self.max_lead), incompatible)
        except NoWorker:
            # The lightly loaded workers only pair with incompatible peers, or with no one (an
            # aggregated worker cut from one list only): use everyone.
            return self._choose(request, prefill, decode, incompatible)

    def _choose(self, request: RouteRequest, prefill: Sequence[WorkerLoad],
                decode: Sequence[WorkerLoad], incompatible: Pairs) -> Route:
        return _best_pair(
            _score(prefill, [self.prefill_cost(request, w) for w in prefill], self._prefill),
            _score(decode, [self.decode_cost(request, w) for w in decode], self._decode),
            incompatible)


POLICIES: dict[str, Callable[..., Policy]] = {
    RoundRobin.name: RoundRobin,
    LeastLoaded.name: LeastLoaded,
    KvAware.name: KvAware,
}


def make_policy(name: str, **params: float) -> Policy:
    """The policy registered under `name`, built with `params` (e.g. alpha=2.0)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"policy: unknown {name!r}, choose one of {sorted(POLICIES)}") from None
    return factory(**params)
