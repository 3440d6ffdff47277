"""Length distributions: the spec forms, their errors, and the moments they draw."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.distributions import LengthDist


def test_parse_forms() -> None:
    assert LengthDist.parse("128") == LengthDist("fixed", 128)
    assert LengthDist.parse("fixed:64") == LengthDist("fixed", 64)
    assert LengthDist.parse("uniform:10,20") == LengthDist("uniform", 10, 20)
    assert LengthDist.parse("lognormal:128,0.5") == LengthDist("lognormal", 128, 0.5)
    assert str(LengthDist.parse("uniform:10,20")) == "uniform:10,20"


@pytest.mark.parametrize("spec", ["uniform:10", "fixed:1,2", "normal:3", "uniform:20,10",
                                  "fixed:0", "lognormal:5,-1", "uniform:a,b"])
def test_parse_errors_name_the_field(spec: str) -> None:
    with pytest.raises(ValueError, match="^length: "):
        LengthDist.parse(spec)


def test_fixed_is_exact() -> None:
    assert set(LengthDist("fixed", 37).sample(np.random.default_rng(0), 100)) == {37}


def test_uniform_moments_and_bounds() -> None:
    values = LengthDist("uniform", 10, 30).sample(np.random.default_rng(0), 20_000)
    assert values.min() == 10 and values.max() == 30  # both ends included
    assert values.mean() == pytest.approx(20, rel=0.01)
    assert values.var() == pytest.approx(((30 - 10 + 1) ** 2 - 1) / 12, rel=0.05)


def test_lognormal_mean_and_sigma() -> None:
    dist = LengthDist("lognormal", 200, 0.5)
    values = dist.sample(np.random.default_rng(0), 50_000)
    assert values.mean() == pytest.approx(200, rel=0.02)
    assert np.log(values).std() == pytest.approx(0.5, rel=0.03)


def test_clipped_to_at_least_one() -> None:
    values = LengthDist("lognormal", 1, 2.0).sample(np.random.default_rng(0), 1000)
    assert values.min() >= 1


def test_same_seed_same_draws() -> None:
    dist = LengthDist("lognormal", 100, 1.0)
    a = dist.sample(np.random.default_rng(7), 50)
    assert (a == dist.sample(np.random.default_rng(7), 50)).all()
    assert (a != dist.sample(np.random.default_rng(8), 50)).any()
