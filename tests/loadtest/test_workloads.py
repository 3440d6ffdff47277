"""Workloads: deterministic per seed, the lengths asked, the sharing structure exact."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from loadtest import workloads
from loadtest.distributions import LengthDist
from loadtest.request import Request
from loadtest.tokens import TokenSpace

SPACE = TokenSpace(50_000)  # large: two random ids collide with probability 2e-5
FIXED = LengthDist("fixed", 8)


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_synthetic_is_deterministic_per_seed() -> None:
    dist = LengthDist("uniform", 4, 64)
    a = workloads.synthetic(SPACE, 50, dist, dist, seed=3)
    assert a == workloads.synthetic(SPACE, 50, dist, dist, seed=3)
    assert a != workloads.synthetic(SPACE, 50, dist, dist, seed=4)


def test_synthetic_lengths_follow_their_distributions() -> None:
    requests = workloads.synthetic(SPACE, 4000, LengthDist("lognormal", 100, 0.4),
                                   LengthDist("uniform", 10, 20), seed=0)
    assert np.mean([r.input_len for r in requests]) == pytest.approx(100, rel=0.03)
    outputs = [r.max_tokens for r in requests]
    assert min(outputs) == 10 and max(outputs) == 20
    assert np.mean(outputs) == pytest.approx(15, rel=0.02)
    assert [r.index for r in requests] == list(range(4000))


def test_token_ids_avoid_excluded_ids() -> None:
    space = TokenSpace(10, frozenset({0, 1, 2}))
    requests = workloads.synthetic(space, 20, LengthDist("fixed", 50), FIXED, seed=0)
    assert {t for r in requests for t in r.token_ids} == set(range(3, 10))


def test_shared_prefix_structure_is_exact() -> None:
    groups, users, system = 3, 5, 40
    requests = workloads.shared_prefix(SPACE, groups, users, system,
                                       LengthDist("uniform", 5, 15), FIXED, seed=1)
    assert len(requests) == groups * users
    by_group: dict[str, list[Request]] = {}
    for r in requests:
        by_group.setdefault(r.group, []).append(r)
    assert sorted(by_group) == ["g0", "g1", "g2"]
    assert all(len(members) == users for members in by_group.values())
    for members in by_group.values():
        for a in members:
            assert 5 + system <= a.input_len <= 15 + system
            for b in members:
                if a is not b:  # the system prompt exactly, then the questions differ
                    assert common_prefix(a.token_ids, b.token_ids) == system
    firsts = [members[0].token_ids for members in by_group.values()]
    assert all(common_prefix(a, b) == 0 for a in firsts for b in firsts if a is not b)
    assert [r.group for r in requests] != sorted(r.group for r in requests)  # shuffled


def test_shared_prefix_is_deterministic_per_seed() -> None:
    def make(seed: int) -> list[Request]:
        return workloads.shared_prefix(SPACE, 2, 3, 16, FIXED, FIXED, seed)

    assert make(5) == make(5)
    assert make(5) != make(6)


def test_multi_turn_extends_the_previous_turn() -> None:
    conversations, turns = 3, 4
    question, output = LengthDist("uniform", 3, 9), LengthDist("uniform", 2, 6)
    requests = workloads.multi_turn(SPACE, conversations, turns, question, output, seed=2)
    assert len(requests) == conversations * turns
    assert [r.turn for r in requests] == [t for t in range(1, turns + 1)
                                          for _ in range(conversations)]
    for c in range(conversations):
        convo = [r for r in requests if r.group == f"c{c}"]
        for before, after in itertools.pairwise(convo):
            assert after.token_ids[:before.input_len] == before.token_ids
            # previous prompt + the previous answer (its output length) + a new question
            grown = after.input_len - before.input_len - before.max_tokens
            assert 3 <= grown <= 9
    assert requests == workloads.multi_turn(SPACE, conversations, turns, question, output, 2)


def test_workload_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="shared prefix"):
        workloads.shared_prefix(SPACE, 0, 1, 1, FIXED, FIXED, 0)
    with pytest.raises(ValueError, match="multi-turn"):
        workloads.multi_turn(SPACE, 1, 0, FIXED, FIXED, 0)


def test_token_space_from_a_tokenizer_excludes_its_special_tokens(tiny_llama: Path) -> None:
    space = TokenSpace.from_tokenizer_dir(tiny_llama)
    assert space.vocab_size == 512
    assert {0, 1, 2} <= space.excluded  # pad, bos, eos
    assert not set(space.draw(np.random.default_rng(0), 2000)) & space.excluded
    assert isinstance(space.decode((100, 200, 300)), str)


def test_token_space_without_tokenizer_cannot_make_text(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        SPACE.decode((1, 2))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        TokenSpace.from_tokenizer_dir(tmp_path)
