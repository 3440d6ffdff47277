"""The per-pair breaker, with a hand-driven clock."""

from __future__ import annotations

import pytest

from router.pair_health import PairHealth

PAIR = ("p0", "d0")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_pair_breaks_after_threshold_failures_in_a_row_and_heals_on_success() -> None:
    clock = Clock()
    health = PairHealth(threshold=2, backoff_s=2.0, clock=clock)
    assert health.failed(PAIR, "peer_lost") is False
    assert health.broken() == {}
    health.succeeded(PAIR)  # a success in between resets the count
    assert health.failed(PAIR, "peer_lost") is False
    assert health.failed(PAIR, "timeout") is True
    assert list(health.broken()) == [PAIR] and "timeout" in health.broken()[PAIR]
    assert health.breaks == 1
    clock.now += 2.01  # backoff over: one more try is allowed
    assert health.broken() == {}
    health.succeeded(PAIR)
    assert health.broken() == {}


def test_the_backoff_doubles_while_the_pair_keeps_failing_up_to_a_cap() -> None:
    clock = Clock()
    health = PairHealth(threshold=1, backoff_s=1.0, max_backoff_s=3.0, clock=clock)
    waits = []
    for _ in range(4):
        assert health.failed(PAIR, "x")
        start = clock.now
        while health.broken():
            clock.now += 0.25
        waits.append(clock.now - start)
    assert waits == [1.0, 2.0, 3.0, 3.0]


def test_forgetting_a_worker_drops_its_pairs() -> None:
    health = PairHealth(threshold=1)
    health.failed(("p0", "d0"), "x")
    health.failed(("p1", "d1"), "x")
    health.forget("d0")
    assert list(health.broken()) == [("p1", "d1")]


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threshold"):
        PairHealth(threshold=0)
