"""Open-loop arrival times: their rate and burstiness; load points and their checks."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.arrivals import Load, arrival_times


def test_poisson_arrivals_at_the_rate() -> None:
    times = arrival_times(Load(rate=50.0), 20_000, seed=0)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_arrivals_keep_the_rate_and_set_the_burstiness(burstiness: float) -> None:
    gaps = np.diff(arrival_times(Load(rate=20.0, arrival="gamma", burstiness=burstiness),
                                 40_000, seed=1))
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.03)
    assert (gaps.std() / gaps.mean()) ** 2 == pytest.approx(1 / burstiness, rel=0.08)


def test_deterministic_per_seed() -> None:
    load = Load(rate=3.0)
    assert (arrival_times(load, 100, 4) == arrival_times(load, 100, 4)).all()
    assert (arrival_times(load, 100, 4) != arrival_times(load, 100, 5)).any()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, "exactly one"), ({"rate": 1.0, "concurrency": 2}, "exactly one"),
    ({"rate": 0.0}, "rate"), ({"concurrency": 0}, "concurrency"),
    ({"rate": 1.0, "arrival": "weibull"}, "arrival"),
    ({"rate": 1.0, "burstiness": 0.0}, "burstiness"),
    ({"arrival": "trace", "speedup": 0.0}, "speedup")])
def test_load_checks(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Load(**kwargs)  # type: ignore[arg-type]


def test_labels() -> None:
    assert Load(rate=2.5).label == "2.5 req/s"
    assert Load(concurrency=4).label == "concurrency 4"
    assert Load(arrival="trace", speedup=4).label == "trace x4"
    assert Load(concurrency=4).closed and not Load(rate=1.0).closed
