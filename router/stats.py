"""The router's own counters, as `GetClusterStatus` reports them (the metrics have their own)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RouterStats:
    requests: int = 0  # requests admitted to routing (validated, not duplicates)
    retries: int = 0  # attempts that failed before the first token
    # requests moved to another pair mid-generation, by reason (MIGRATION_REASONS)
    migrations: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)  # "policy/mode"
    outcomes: Counter[str] = field(default_factory=Counter)  # finish reason or status code
    # requests prefilled on their decode worker, no transfer: "aggregated" (an aggregated
    # worker) or "short_prompt" (conditional disaggregation, local_prefill_max_tokens)
    local_prefills: Counter[str] = field(default_factory=Counter)
    # routes whose "prefill" or "decode" worker held fewer leading prompt blocks than the
    # prefix index predicted (router.stale_index)
    stale_index_routes: Counter[str] = field(default_factory=Counter)
