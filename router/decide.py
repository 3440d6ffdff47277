"""One routing decision: prefix lookup (only for policies that use it), then the policy.

Shared by the router's request path and `python -m router.bench`, so the bench measures the
code that routes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from engine.block_hash import BlockHash
from router.load import Route, RouteRequest, WorkerLoad
from router.policies import LeastLoaded, Policy
from router.prefix import IndexMode, PrefixLookup

PREFIX_POLICIES = {"kv_aware"}  # the policies that read prefix hits


@dataclass(frozen=True)
class Decision:
    route: Route
    hits: dict[str, int]  # leading cached blocks per worker ({} when not looked up)
    policy: str  # the policy that decided (least_loaded when the index is degraded)
    mode: IndexMode


class Decider:
    def __init__(self, policy: Policy, lookup: PrefixLookup) -> None:
        self.policy = policy
        self.lookup = lookup
        self.fallback = LeastLoaded()

    async def decide(self, hashes: Sequence[BlockHash], prefill: Sequence[WorkerLoad],
                     decode: Sequence[WorkerLoad],
                     incompatible: Collection[tuple[str, str]] = ()) -> Decision:
        policy, hits = self.policy, {}
        if self.policy.name in PREFIX_POLICIES:
            found = await self.lookup.lookup(hashes, [w.worker_id for w in (*prefill, *decode)])
            if found is None:  # degraded: route by load alone
                policy = self.fallback
            else:
                hits = found
        route = policy.choose(RouteRequest(max(len(hashes), 1), hits), prefill, decode,
                              incompatible)
        return Decision(route, hits, policy.name, self.lookup.mode)
