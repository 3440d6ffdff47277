"""Sampler: greedy, temperature, top-k, top-p, and seeded draws that depend only on
(seed, output position)."""

from __future__ import annotations

import torch

from engine.sampler import sample
from engine.sampling import SamplingParams

LOGITS = torch.tensor([[0.0, 3.0, 1.0, 2.9, -5.0]])


def draws(params: SamplingParams, n: int = 300) -> set[int]:
    torch.manual_seed(0)  # unseeded rows draw from the global generator
    return {sample(LOGITS, [params], [0])[0] for _ in range(n)}


def test_greedy_takes_argmax_per_row() -> None:
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    assert sample(logits, [SamplingParams()] * 2, [0, 5]) == [1, 0]


def test_top_k_keeps_only_k_tokens() -> None:
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {1, 3}


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    # p(1) ≈ 0.46, p(3) ≈ 0.42: 0.5 needs both, 0.3 only the first
    assert draws(SamplingParams(temperature=1.0, top_p=0.5)) == {1, 3}
    assert draws(SamplingParams(temperature=1.0, top_p=0.3)) == {1}


def test_high_temperature_reaches_every_token() -> None:
    assert draws(SamplingParams(temperature=50.0), n=2000) == {0, 1, 2, 3, 4}


def seeded_run(seed: int, positions: range) -> list[int]:
    params = SamplingParams(temperature=1.0, seed=seed)
    return [sample(LOGITS, [params], [i])[0] for i in positions]


def test_a_seeded_draw_depends_only_on_seed_and_position() -> None:
    run = seeded_run(7, range(60))
    assert run == seeded_run(7, range(60)) and len(set(run)) > 1
    # resumed at position 25 (a migrated request, seed_offset 25): the same tail
    torch.manual_seed(123)  # the global generator plays no part
    assert seeded_run(7, range(25, 60)) == run[25:]
    # in any batch, at any row
    rows = sample(LOGITS.repeat(3, 1), [SamplingParams(temperature=1.0), *[
        SamplingParams(temperature=1.0, seed=7)] * 2], [0, 30, 31])
    assert rows[1:] == run[30:32]
    assert seeded_run(8, range(60)) != run
