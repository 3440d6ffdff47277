"""Routing policies, in milliseconds: spreading, affinity, load, herding, compatibility."""

from __future__ import annotations

from collections import Counter

import pytest

from cluster.errors import NoWorker
from cluster.roles import Role
from router.load import InFlightTracker, Route, RouteRequest, WorkerLoad
from router.policies import POLICIES, KvAware, Policy, make_policy, within_share

P, D = Role.PREFILL, Role.DECODE


def prefill(n: int, **load: int) -> list[WorkerLoad]:
    return [WorkerLoad(f"p{i}", P, max_running=16, **load) for i in range(n)]


def decode(n: int, **load: int) -> list[WorkerLoad]:
    return [WorkerLoad(f"d{i}", D, kv_blocks_total=1000, max_running=64, **load)
            for i in range(n)]


ALL = sorted(POLICIES)


@pytest.mark.parametrize("name", ALL)
def test_ties_spread_evenly(name: str) -> None:
    policy = make_policy(name)
    request = RouteRequest(prompt_blocks=8)
    routes = [policy.choose(request, prefill(3), decode(2)) for _ in range(12)]
    assert Counter(r.prefill for r in routes) == {"p0": 4, "p1": 4, "p2": 4}
    assert Counter(r.decode for r in routes) == {"d0": 6, "d1": 6}


@pytest.mark.parametrize("name", ALL)
def test_input_order_does_not_matter(name: str) -> None:
    a, b = make_policy(name), make_policy(name)
    request = RouteRequest(prompt_blocks=4)
    pool = prefill(3)
    assert a.choose(request, pool, decode(2)) == b.choose(request, pool[::-1], decode(2)[::-1])


def test_cache_affinity_wins_when_load_is_balanced() -> None:
    policy = KvAware()
    request = RouteRequest(prompt_blocks=10, prefix_hits={"p1": 8, "d2": 10, "p0": 2})
    for _ in range(5):  # not a lucky round-robin turn
        assert policy.choose(request, prefill(3, running=2), decode(3, running=5)) == \
            Route("p1", "d2")


def test_load_wins_when_the_cached_worker_is_overloaded() -> None:
    policy = KvAware()
    request = RouteRequest(prompt_blocks=10, prefix_hits={"p0": 10, "d0": 10})
    busy_p = [WorkerLoad("p0", P, queued_prompt_blocks=200), *prefill(2)[1:]]
    busy_d = [WorkerLoad("d0", D, running=60, kv_blocks_used=950, kv_blocks_total=1000,
                         max_running=64), *decode(2)[1:]]
    assert policy.choose(request, busy_p, busy_d) == Route("p1", "d1")


def test_router_in_flight_counts_as_load_before_reports() -> None:
    policy = KvAware()
    tracker = InFlightTracker()
    request = RouteRequest(prompt_blocks=4, prefix_hits={"p0": 4, "d0": 4})
    routes = []
    for _ in range(20):  # workers report nothing new: only the router's counts move
        route = policy.choose(request, tracker.apply(prefill(2)), tracker.apply(decode(2)))
        tracker.assign(route, prefill_blocks=4 - request.prefix_hits.get(route.prefill, 0))
        routes.append(route)
    assert routes[0] == Route("p0", "d0")
    assert {r.prefill for r in routes} == {"p0", "p1"}
    assert {r.decode for r in routes} == {"d0", "d1"}


@pytest.mark.parametrize("name", ALL)
def test_no_herding_over_100_assignments(name: str) -> None:
    """Every request shares one hot prefix cached on p0 and d0; nothing finishes."""
    policy = make_policy(name)
    tracker = InFlightTracker()
    request = RouteRequest(prompt_blocks=16, prefix_hits={"p0": 16, "d0": 16})
    routes = []
    for _ in range(100):
        route = policy.choose(request, tracker.apply(prefill(4)), tracker.apply(decode(4)))
        tracker.assign(route, prefill_blocks=0)
        routes.append(route)
    for role in ("prefill", "decode"):
        share = Counter(getattr(r, role) for r in routes)
        assert len(share) == 4, share
        # max(25 · 1.5, 25 + 4): p0 may lead by the bound, no more.
        assert max(share.values()) <= 38, share


def test_kv_aware_finished_requests_free_their_share() -> None:
    policy = KvAware()
    tracker = InFlightTracker()
    request = RouteRequest(prompt_blocks=16, prefix_hits={"p0": 16, "d0": 16})
    for _ in range(100):  # one request at a time: the cache wins every time
        assignment = tracker.assign(
            policy.choose(request, tracker.apply(prefill(4)), tracker.apply(decode(4))), 0)
        assert assignment.route == Route("p0", "d0")
        assignment.prefill_done()
        assignment.finish()
        assignment.finish()  # idempotent
    assert tracker.in_flight("p0") == tracker.in_flight("d0") == 0


@pytest.mark.parametrize("name", ALL)
def test_incompatible_pairs_are_excluded(name: str) -> None:
    policy = make_policy(name)
    request = RouteRequest(prompt_blocks=4, prefix_hits={"p0": 4, "d0": 4})
    banned = {("p0", "d0"), ("p1", "d0")}
    routes = [policy.choose(request, prefill(2), decode(2), banned) for _ in range(10)]
    assert all((r.prefill, r.decode) not in banned for r in routes)
    assert {r.decode for r in routes} == {"d1"}


def test_kv_aware_uses_a_busy_worker_when_the_idle_ones_are_incompatible() -> None:
    pool = [WorkerLoad("p0", P, running=40), WorkerLoad("p1", P)]
    route = KvAware().choose(RouteRequest(prompt_blocks=2), pool, decode(1), {("p1", "d0")})
    assert route == Route("p0", "d0")


@pytest.mark.parametrize("name", ALL)
def test_empty_pools_or_no_compatible_pair_raise_no_worker(name: str) -> None:
    policy: Policy = make_policy(name)
    request = RouteRequest(prompt_blocks=4)
    with pytest.raises(NoWorker, match="prefill"):
        policy.choose(request, [], decode(1))
    with pytest.raises(NoWorker, match="decode"):
        policy.choose(request, prefill(1), [])
    with pytest.raises(NoWorker, match="compatible"):
        policy.choose(request, prefill(1), decode(1), {("p0", "d0")})


def test_load_takes_the_larger_of_report_and_in_flight() -> None:
    worker = WorkerLoad("d0", D, running=3, waiting=1, in_flight=2, kv_blocks_used=5,
                        kv_blocks_total=10)
    assert worker.requests == 4
    assert WorkerLoad("d0", D, running=1, in_flight=6).requests == 6
    assert worker.kv_usage == 0.5
    assert WorkerLoad("d0", D).kv_usage == 0.0


def test_within_share_bounds_the_lead() -> None:
    pool = [WorkerLoad(f"d{i}", D, running=r) for i, r in enumerate([10, 14, 15, 16])]
    assert [w.worker_id for w in within_share(pool, 1.5, 4)] == ["d0", "d1", "d2"]
    assert [w.worker_id for w in within_share(pool, 1.0, 0)] == ["d0"]


def test_kv_aware_costs_follow_the_formula() -> None:
    policy = KvAware(alpha=2.0, beta=1.0, gamma=1.0, delta=0.5)
    request = RouteRequest(prompt_blocks=10, prefix_hits={"p0": 4, "d0": 5})
    p0 = WorkerLoad("p0", P, queued_prompt_blocks=3)
    assert policy.prefill_cost(request, p0) == pytest.approx((6 + 2 * 3) / 10)
    d0 = WorkerLoad("d0", D, running=8, kv_blocks_used=250, kv_blocks_total=1000, max_running=32)
    assert policy.decode_cost(request, d0) == pytest.approx(0.25 + 8 / 32 - 0.5 * 5 / 10)


def test_make_policy_rejects_unknown_names() -> None:
    assert make_policy("kv_aware", alpha=2.0).name == "kv_aware"
    with pytest.raises(ValueError, match="policy: unknown 'random'"):
        make_policy("random")


async def test_the_pool_passes_the_reported_prefill_queue_to_the_policies() -> None:
    """Workers report `queued_prompt_blocks`; the load the policies weigh carries it."""
    from grpc import aio

    from router.clients import ClientTimeouts, PrefillClient
    from router.workers import WorkerHandle
    from tandem_proto.tandem.v1 import common_pb2

    channel = aio.insecure_channel("127.0.0.1:1")  # never dialled
    handle = WorkerHandle("p0", P, "127.0.0.1:1", channel,
                          PrefillClient("p0", channel, ClientTimeouts(1, 1, 1, 1)),
                          status=common_pb2.WorkerStatus(load=common_pb2.WorkerLoad(
                              queued_prompt_blocks=94, running=2)))
    load = handle.load()
    assert load.queued_prompt_blocks == 94 and load.queued_blocks == 94 and load.running == 2


def aggregated(n: int, **load: int) -> list[WorkerLoad]:
    return [WorkerLoad(f"a{i}", Role.AGGREGATED, kv_blocks_total=1000, max_running=64, **load)
            for i in range(n)]


@pytest.mark.parametrize("name", ALL)
def test_an_aggregated_worker_pairs_only_with_itself(name: str) -> None:
    policy = make_policy(name)
    request = RouteRequest(prompt_blocks=8)
    workers = aggregated(4)
    routes = [policy.choose(request, workers, workers) for _ in range(8)]
    assert all(r.local for r in routes)
    assert Counter(r.decode for r in routes) == {"a0": 2, "a1": 2, "a2": 2, "a3": 2}


@pytest.mark.parametrize("name", ALL)
def test_a_mixed_cluster_never_crosses_roles(name: str) -> None:
    policy = make_policy(name)
    request = RouteRequest(prompt_blocks=8, prefix_hits={"a0": 8, "d1": 4})
    both = aggregated(2)
    routes = [policy.choose(request, prefill(2) + both, decode(2) + both) for _ in range(12)]
    for route in routes:
        assert route.local == route.prefill.startswith("a")
        assert route.local or (route.prefill.startswith("p") and route.decode.startswith("d"))
    assert {r.local for r in routes} == ({True} if name == "kv_aware" else {True, False})


def test_kv_aware_weighs_an_aggregated_worker_against_a_pair() -> None:
    """An aggregated worker that holds the prompt wins over an idle pair; a busy one loses."""
    policy = KvAware()
    request = RouteRequest(prompt_blocks=8, prefix_hits={"a0": 8})
    assert policy.choose(request, prefill(1) + aggregated(1), decode(1) + aggregated(1)).local
    busy = aggregated(1, running=60, kv_blocks_used=900, queued_prompt_blocks=40)
    assert not policy.choose(request, prefill(1) + busy, decode(1) + busy).local


def test_a_local_route_counts_one_request_and_its_prompt_blocks() -> None:
    tracker = InFlightTracker()
    assignment = tracker.assign(Route("a0", "a0"), prefill_blocks=5)
    [load] = tracker.apply(aggregated(1))
    assert load.in_flight == 1 and load.in_flight_prompt_blocks == 5
    assignment.prefill_done()
    [load] = tracker.apply(aggregated(1))
    assert load.in_flight == 1 and load.in_flight_prompt_blocks == 0
    assignment.finish()
    assert tracker.in_flight("a0") == 0
