"""The cost model's fit recovers known constants from exact points, and drops a term that
would come out negative."""

from __future__ import annotations

import pytest

from engine.sim.cost_model import SimCostModel
from engine.sim.fit import fit

TRUE = SimCostModel(sim_step_s=0.004, sim_prefill_token_s=0.0002, sim_decode_seq_s=0.0006,
                    sim_decode_context_token_s=0.000001)
SHAPES = [(32, 0, 0), (128, 0, 0), (512, 0, 0), (0, 1, 64), (0, 8, 2048), (0, 32, 4096),
          (0, 32, 16384), (0, 4, 256)]


def test_exact_points_give_back_the_constants() -> None:
    model, error = fit([(p, TRUE.step_seconds(*p)) for p in SHAPES])
    for name in ("sim_step_s", "sim_prefill_token_s", "sim_decode_seq_s",
                 "sim_decode_context_token_s"):
        assert getattr(model, name) == pytest.approx(getattr(TRUE, name), rel=1e-6)
    assert error < 1e-6


def test_a_negative_term_is_dropped() -> None:
    """Steps that do not grow with context: its term is 0, not a negative cost."""
    shrinking = [(p, TRUE.step_seconds(*p) - 0.000002 * p[2]) for p in SHAPES]
    model, _ = fit(shrinking)
    assert model.sim_decode_context_token_s == 0.0
    assert min(model.sim_step_s, model.sim_prefill_token_s, model.sim_decode_seq_s) >= 0
