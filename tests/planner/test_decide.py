"""planner.decide and planner.figures: decisions on recorded load figures, no I/O (scale-up
and scale-down with hysteresis, cooldown, bounds, the replica budget, TTFT)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.roles import Role
from planner.config import PlannerConfig
from planner.decide import Plan, PlannerState, decide
from planner.figures import LoadFigures, RoleFigures, figures_from_status, utilization
from tandem_proto.tandem.v1 import common_pb2, router_pb2

P, D = Role.PREFILL, Role.DECODE
CONFIG = PlannerConfig(router="router:50051", min_prefill=1, max_prefill=3, min_decode=1,
                       max_decode=3, high_water=0.8, low_water=0.3, up_after=2, down_after=3,
                       cooldown_s=60.0, prefill_queue_blocks_target=10.0)


def figures(prefill: float, decode: float, workers: int = 1,
            ttft_s: float | None = None) -> LoadFigures:
    """Prefill at `prefill` × the queue target, decode at `decode` of its KV blocks."""
    return LoadFigures({
        P: RoleFigures(workers=workers, queued_prompt_blocks=round(prefill * 10 * workers)),
        D: RoleFigures(workers=workers, kv_blocks_used=round(decode * 100 * workers),
                       kv_blocks_total=100 * workers, max_running=64 * workers)}, ttft_s)


def replay(readings: list[tuple[LoadFigures, dict[Role, int]]],
           config: PlannerConfig = CONFIG, every_s: float = 15.0) -> list[Plan]:
    """Decides on each reading in turn (`every_s` apart), applying each change."""
    state, plans = PlannerState(), []
    for i, (reading, replicas) in enumerate(readings):
        plan = decide(config, state, reading, dict(replicas), now_s=i * every_s)
        state = plan.state
        plans.append(plan)
    return plans


def targets(plan: Plan) -> dict[Role, int]:
    return {d.role: d.target for d in plan.changes()}


def test_figures_from_a_recorded_cluster_status() -> None:
    def worker(role: common_pb2.WorkerRole, **load: int) -> common_pb2.WorkerStatus:
        return common_pb2.WorkerStatus(role=role, load=common_pb2.WorkerLoad(**load))

    status = router_pb2.GetClusterStatusResponse(workers=[
        worker(common_pb2.WORKER_ROLE_PREFILL, queued_prompt_blocks=30, running=2),
        worker(common_pb2.WORKER_ROLE_PREFILL, queued_prompt_blocks=10),
        worker(common_pb2.WORKER_ROLE_DECODE, running=40, waiting=8, max_running=64,
               kv_blocks_used=500, kv_blocks_total=1000)])
    f = figures_from_status(status, ttft_s=0.4)
    assert f.role(P) == RoleFigures(workers=2, running=2, queued_prompt_blocks=40)
    assert f.role(D).workers == 1 and f.ttft_s == 0.4
    assert utilization(P, f, CONFIG) == pytest.approx(40 / (2 * 10))
    assert utilization(D, f, CONFIG) == pytest.approx(48 / 64)  # batch over KV (0.5)
    with_ttft = replace(CONFIG, router_metrics_url="http://r/metrics", ttft_target_s=0.1)
    assert utilization(P, f, with_ttft) == pytest.approx(4.0)  # TTFT 4× its target
    assert utilization(P, LoadFigures({}), CONFIG) is None  # no live worker: no reading


def test_scale_up_after_n_readings_above_the_high_water_mark() -> None:
    hot = figures(prefill=1.5, decode=0.5)
    plans = replay([(hot, {P: 1, D: 1}), (hot, {P: 1, D: 1})])
    assert plans[0].changes() == []  # one reading is not a trend
    assert targets(plans[1]) == {P: 2}
    assert "above 0.8 for 2 readings" in plans[1].changes()[0].reason


def test_a_reading_between_the_marks_resets_the_streak() -> None:
    hot, middling = figures(prefill=1.5, decode=0.5), figures(prefill=0.5, decode=0.5)
    plans = replay([(hot, {P: 1, D: 1}), (middling, {P: 1, D: 1}), (hot, {P: 1, D: 1}),
                    (middling, {P: 1, D: 1})])
    assert all(plan.changes() == [] for plan in plans)  # flapping load: no flapping replicas


def test_cooldown_then_up_to_the_bound() -> None:
    hot = figures(prefill=1.5, decode=0.5)
    replicas = {P: 1, D: 1}
    state, changes = PlannerState(), []
    for t in range(0, 300, 15):
        plan = decide(CONFIG, state, hot, dict(replicas), now_s=float(t))
        state = plan.state
        for d in plan.changes():
            replicas[d.role] = d.target
            changes.append((t, d.role, d.target))
    # 2 readings to go up, then 60 s of cooldown (the readings still count), then the bound
    assert changes == [(15, P, 2), (75, P, 3)]


def test_scale_down_after_m_readings_below_the_low_water_mark_not_below_min() -> None:
    idle = figures(prefill=0.1, decode=0.1)
    plans = replay([(idle, {P: 2, D: 1})] * 3)
    assert [targets(p) for p in plans] == [{}, {}, {P: 1}]  # decode is at its minimum
    assert "below 0.3 for 3 readings" in plans[2].changes()[0].reason


def test_out_of_bounds_is_corrected_at_once_even_in_cooldown() -> None:
    fine = figures(prefill=0.5, decode=0.5)
    [plan] = replay([(fine, {P: 7, D: 0})])
    assert targets(plan) == {P: 3, D: 1}
    state = replace(plan.state, roles={r: replace(s, last_change_s=0.0)
                                       for r, s in plan.state.roles.items()})
    again = decide(CONFIG, state, fine, {P: 5, D: 1}, now_s=1.0)
    assert targets(again) == {P: 3}


def test_no_reading_keeps_the_streaks() -> None:
    hot, starting = figures(prefill=1.5, decode=0.5), figures(prefill=0, decode=0, workers=0)
    plans = replay([(hot, {P: 1, D: 1}), (starting, {P: 1, D: 1}), (hot, {P: 1, D: 1})])
    assert plans[1].utilization == {P: None, D: None}
    assert targets(plans[2]) == {P: 2}


def test_at_the_budget_a_hot_role_takes_a_replica_from_a_cold_one() -> None:
    budget = replace(CONFIG, max_total_replicas=4)
    prefill_hot_decode_cold = figures(prefill=1.5, decode=0.1)
    plans = replay([(prefill_hot_decode_cold, {P: 2, D: 2})] * 2, budget)
    assert targets(plans[1]) == {P: 3, D: 1}
    reasons = {d.role: d.reason for d in plans[1].decisions}
    assert "rebalanced from decode" in reasons[P]
    assert "rebalanced to prefill" in reasons[D]


def test_at_the_budget_with_both_roles_hot_nothing_moves() -> None:
    budget = replace(CONFIG, max_total_replicas=4)
    both_hot = figures(prefill=1.5, decode=0.95)
    plans = replay([(both_hot, {P: 2, D: 2})] * 2, budget)
    assert plans[1].changes() == []
    assert all("held at the budget of 4 replicas" in d.reason for d in plans[1].decisions)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="max_decode"):
        replace(CONFIG, min_decode=3, max_decode=2)
    with pytest.raises(ValueError, match="low_water"):
        replace(CONFIG, low_water=0.9)
    with pytest.raises(ValueError, match="ttft_target_s: needs router_metrics_url"):
        replace(CONFIG, ttft_target_s=1.0)
    with pytest.raises(ValueError, match="max_total_replicas"):
        replace(CONFIG, max_total_replicas=1)
