"""The runner's bounds and loops, against an in-process target that streams on a timer.

The target here is the `Target` protocol implemented in a few lines (no server): what is under
test is the runner's scheduling, not a transport. The real router is in test_e2e.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from loadtest.arrivals import Load
from loadtest.records import CANCELLED, ERROR, OK
from loadtest.request import Request
from loadtest.runner import Bounds, run_point
from loadtest.targets.base import Finished, TargetError, Tokens


class TimedTarget:
    """Streams `max_tokens` tokens, one every `step_s`; fails requests whose index is in
    `fail`; counts how many streams run at once."""

    name = "timed"

    def __init__(self, step_s: float, fail: frozenset[int] = frozenset()) -> None:
        self.step_s = step_s
        self.fail = fail
        self.running = 0
        self.most_running = 0
        self.status_calls = 0

    async def __aenter__(self) -> TimedTarget:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def stream(self, request: Request,
                     request_id: str) -> AsyncIterator[Tokens | Finished]:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if request.index in self.fail:
                raise TargetError("RESOURCE_EXHAUSTED", "full")
            for _ in range(request.max_tokens):
                await asyncio.sleep(self.step_s)
                yield Tokens(1)
            yield Finished("length", request.input_len, 0, request.max_tokens)
        finally:
            self.running -= 1

    async def cluster_status(self) -> dict[str, Any] | None:
        self.status_calls += 1
        return {"router": {"requests": float(self.status_calls)}, "workers": {}}


def requests(n: int, max_tokens: int) -> list[Request]:
    return [Request(i, (1, 2, 3), max_tokens) for i in range(n)]


async def test_closed_loop_never_exceeds_its_concurrency() -> None:
    target = TimedTarget(0.005)
    result = await run_point(target, requests(12, 4), Load(concurrency=3), Bounds(10, 100),
                             seed=0, id_prefix="t", progress=False, settle_s=0)
    assert target.most_running == 3
    assert [r.outcome for r in result.records] == [OK] * 12
    assert all(r.output_tokens == 4 and len(r.itl) == 3 for r in result.records)
    for r in result.records:  # in flight at each send: at most 3, counting this one
        assert sum(o.send_s <= r.send_s < (o.end_s or 0) for o in result.records) <= 3


async def test_the_request_bound_is_kept() -> None:
    result = await run_point(TimedTarget(0.001), requests(50, 1), Load(rate=1000.0),
                             Bounds(10, 7), seed=0, id_prefix="t", progress=False, settle_s=0)
    assert len(result.records) == 7
    assert [r.request_id for r in result.records] == [f"t-{i}" for i in range(7)]


async def test_the_time_bound_cancels_and_records_what_is_in_flight() -> None:
    started = time.perf_counter()
    result = await run_point(TimedTarget(1.0), requests(20, 10), Load(rate=40.0),
                             Bounds(0.3, 100), seed=0, id_prefix="t", progress=False,
                             settle_s=0)
    assert time.perf_counter() - started < 1.0
    assert result.records and all(r.outcome == CANCELLED for r in result.records)
    assert all(r.send_s < 0.3 for r in result.records)  # none sent after the bound
    assert len(result.records) < 20
    assert 0.3 <= result.duration_s < 0.6


async def test_closed_loop_time_bound() -> None:
    result = await run_point(TimedTarget(0.05), requests(1000, 2), Load(concurrency=2),
                             Bounds(0.35, 1000), seed=0, id_prefix="t", progress=False,
                             settle_s=0)
    assert len(result.records) < 20
    assert all(r.send_s < 0.35 for r in result.records)
    assert {r.outcome for r in result.records} <= {OK, CANCELLED}


async def test_open_loop_sends_at_the_arrival_times() -> None:
    trace = [Request(i, (1,), 1, arrival_s=0.2 * i) for i in range(4)]
    result = await run_point(TimedTarget(0.001), trace, Load(arrival="trace", speedup=2.0),
                             Bounds(5, 10), seed=0, id_prefix="t", progress=False, settle_s=0)
    for record in result.records:
        assert record.scheduled_s == pytest.approx(0.1 * record.index)
        assert 0 <= record.send_s - record.scheduled_s < 0.05


async def test_errors_are_recorded_with_their_code_and_cluster_read() -> None:
    target = TimedTarget(0.001, fail=frozenset({1}))
    result = await run_point(target, requests(3, 2), Load(concurrency=1), Bounds(5, 10),
                             seed=0, id_prefix="t", progress=False, settle_s=0)
    failed = result.records[1]
    assert (failed.outcome, failed.error_code, failed.error) == (ERROR, "RESOURCE_EXHAUSTED",
                                                                 "full")
    assert failed.ttft is None and failed.e2e is None
    assert target.status_calls == 2
    assert result.cluster["requests"] == 1.0  # the router counter's growth over the run


async def test_an_unreachable_metrics_page_leaves_the_run_going() -> None:
    result = await run_point(TimedTarget(0.001), requests(2, 1), Load(concurrency=1),
                             Bounds(5, 10), seed=0, id_prefix="t", progress=False, settle_s=0,
                             metrics_url="http://127.0.0.1:9/metrics")
    assert [r.outcome for r in result.records] == [OK, OK]
    assert "prefix_hit_ratio" not in result.cluster and result.cluster["requests"] == 1.0
