"""loadtest.cluster_figures: the cluster's figures from two statuses, aggregated workers too."""

from __future__ import annotations

from typing import Any

from loadtest.cluster_figures import figures
from loadtest.targets.tandem_grpc import ROLES
from tandem_proto.tandem.v1 import common_pb2


def status(scale: float) -> dict[str, Any]:
    """A status as TandemTarget.cluster_status writes it, its counters multiplied by `scale`."""
    return {
        "policy": "kv_aware",
        "router": {"requests": 10 * scale, "local_prefills/aggregated": 6 * scale,
                   "local_prefills/short_prompt": 1 * scale},
        "workers": {
            "p": {"role": "prefill", "counters": {"kv_blocks_sent": 4 * scale,
                                                  "prefill_tokens_computed": 100 * scale,
                                                  "prefix_hit_tokens": 50 * scale}},
            "d": {"role": "decode", "counters": {"transfers_completed": 3 * scale,
                                                 "local_prefills": 1 * scale}},
            "a": {"role": "aggregated", "counters": {"prefill_tokens_computed": 200 * scale,
                                                     "prefix_hit_tokens": 50 * scale,
                                                     "local_prefills": 0.0}},
        },
    }


def test_aggregated_workers_count_and_local_prefills_are_the_routers() -> None:
    out = figures(status(1.0), status(2.0))
    assert out["requests"] == 10
    assert out["local_prefills"] == 7  # the router's, every reason
    assert out["fallback_prefills"] == 1  # the decode worker's own, after a failed transfer
    assert out["kv_blocks_sent"] == 4 and out["transfers_completed"] == 3
    assert out["prefill_tokens_computed"] == 300  # prefill + aggregated workers
    assert out["prefill_cached_ratio"] == 100 / 400


def test_every_worker_role_has_a_name() -> None:
    assert ROLES[common_pb2.WORKER_ROLE_AGGREGATED] == "aggregated"
    assert set(ROLES.values()) == {"prefill", "decode", "aggregated"}
