"""Sampler: greedy, temperature, top-k, top-p and seeded generators."""

from __future__ import annotations

import torch

from engine.sampler import sample
from engine.sampling import SamplingParams

LOGITS = torch.tensor([[0.0, 3.0, 1.0, 2.9, -5.0]])


def draws(params: SamplingParams, n: int = 300) -> set[int]:
    gen = torch.Generator().manual_seed(0)
    return {sample(LOGITS, [params], [gen])[0] for _ in range(n)}


def test_greedy_takes_argmax_per_row() -> None:
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    assert sample(logits, [SamplingParams()] * 2, [None, None]) == [1, 0]


def test_top_k_keeps_only_k_tokens() -> None:
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {1, 3}


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    # p(1) ≈ 0.46, p(3) ≈ 0.42: 0.5 needs both, 0.3 only the first
    assert draws(SamplingParams(temperature=1.0, top_p=0.5)) == {1, 3}
    assert draws(SamplingParams(temperature=1.0, top_p=0.3)) == {1}


def test_high_temperature_reaches_every_token() -> None:
    assert draws(SamplingParams(temperature=50.0), n=2000) == {0, 1, 2, 3, 4}


def test_same_seed_same_tokens() -> None:
    params = SamplingParams(temperature=1.0, seed=7)
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        runs.append([sample(LOGITS, [params], [gen])[0] for _ in range(50)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1
