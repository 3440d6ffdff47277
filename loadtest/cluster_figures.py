"""The cluster's own figures over a run: its counters before and after, and the difference.

Two sources, either or both: the router's `GetClusterStatus` (router counters: requests,
retries, outcomes, pair breaks; each live worker's counters: prefix hit and computed prefill
tokens, KV blocks sent, transfers, fallback prefills, lease expiries; the router's local
prefills by reason), and a Prometheus `/metrics`
page (the router's: `tandem_router_prefix_hit_blocks` and `_query_blocks`, retries by reason).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cluster.tls import client_ssl_context

WORKER_SUMS = {  # figure → (roles, worker counter); an aggregated worker is a decode worker
    # that prefills its own requests: it counts on both sides
    "kv_blocks_sent": (("prefill",), "kv_blocks_sent"),
    "prefill_tokens_computed": (("prefill", "aggregated"), "prefill_tokens_computed"),
    "prefill_prefix_hit_tokens": (("prefill", "aggregated"), "prefix_hit_tokens"),
    "prefill_transfer_failures": (("prefill",), "transfer_failures"),
    "transfers_completed": (("decode",), "transfers_completed"),
    "transfers_failed": (("decode",), "transfers_failed"),
    # prefills a decode worker did itself because a transfer failed (its `local_prefills`);
    # those the router chose (aggregated, short prompt) are the router's `local_prefills/*`
    "fallback_prefills": (("decode", "aggregated"), "local_prefills"),
    "lease_expiries": (("decode", "aggregated"), "lease_expiries"),
    "decode_cached_prompt_tokens": (("decode", "aggregated"), "cached_prompt_tokens"),
}
ROUTER_COUNTERS = ("requests", "retries", "pair_breaks", "rejected", "degraded_lookups")


async def scrape(url: str, timeout_s: float = 5.0, ca: str | None = None) -> dict[str, float]:
    """A `/metrics` page as {sample name with its labels: value}; an https one is checked
    against `ca` (None: the system's CAs)."""
    async with httpx.AsyncClient(timeout=timeout_s, verify=client_ssl_context(ca)) as client:
        response = await client.get(url)
        response.raise_for_status()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def _delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _worker_deltas(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Per worker, the counters' growth; a worker that appeared during the run starts at 0."""
    old = before.get("workers", {})
    return {wid: {"role": w["role"],
                  "counters": _delta(w["counters"], old.get(wid, {}).get("counters", {}))}
            for wid, w in after.get("workers", {}).items()}


def figures(status_before: Mapping[str, Any] | None, status_after: Mapping[str, Any] | None,
            metrics_before: Mapping[str, float] | None = None,
            metrics_after: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The run's figures: named totals, and the raw differences they came from."""
    out: dict[str, Any] = {}
    if status_before is not None and status_after is not None:
        router = _delta(status_after.get("router", {}), status_before.get("router", {}))
        workers = _worker_deltas(status_before, status_after)
        out["policy"] = status_after.get("policy")
        for name in ROUTER_COUNTERS:
            out[name] = router.get(name, 0.0)
        out["outcomes"] = {k.removeprefix("outcome/"): v for k, v in router.items()
                           if k.startswith("outcome/") and v}
        for name, (roles, counter) in WORKER_SUMS.items():
            out[name] = sum(w["counters"].get(counter, 0.0) for w in workers.values()
                            if w["role"] in roles)
        # requests the router sent to prefill on their decode (or aggregated) worker, by reason
        out["local_prefills"] = sum(v for k, v in router.items()
                                    if k.startswith("local_prefills/"))
        seen = out["prefill_prefix_hit_tokens"] + out["prefill_tokens_computed"]
        out["prefill_cached_ratio"] = out["prefill_prefix_hit_tokens"] / seen if seen else None
        out["router_counters"] = router
        out["workers"] = workers
    if metrics_before is not None and metrics_after is not None:
        metrics = _delta(metrics_after, metrics_before)
        hits = metrics.get("tandem_router_prefix_hit_blocks_total")
        queries = metrics.get("tandem_router_prefix_query_blocks_total")
        out["prefix_hit_ratio"] = hits / queries if hits is not None and queries else None
        out["metrics"] = {k: v for k, v in metrics.items()
                          if k.startswith("tandem_") and not k.endswith("_created") and v}
    return out
