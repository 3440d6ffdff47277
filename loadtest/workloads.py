"""Synthetic workloads, each a list of `Request`s made deterministically from a seed.

- `synthetic`: independent prompts, input and output lengths from `LengthDist`s;
- `shared_prefix`: `groups` system prompts of `system_len` tokens, each shared by `users`
  users asking a question of `question_len` tokens (llm-d's prefix benchmark shape), shuffled;
- `multi_turn`: `conversations` of `turns` turns, each turn's prompt the previous prompt, the
  previous answer (synthesized: its ids are drawn, not generated) and a new question; sent
  round by round (every conversation's turn 1, then every turn 2, ...).
"""

from __future__ import annotations

import numpy as np

from loadtest.distributions import LengthDist
from loadtest.request import Request
from loadtest.tokens import TokenSpace


def synthetic(space: TokenSpace, n: int, input_len: LengthDist, output_len: LengthDist,
              seed: int) -> list[Request]:
    """`n` independent prompts."""
    rng = np.random.default_rng(seed)
    inputs = input_len.sample(rng, n)
    outputs = output_len.sample(rng, n)
    return [Request(i, space.draw(rng, int(inputs[i])), int(outputs[i])) for i in range(n)]


def shared_prefix(space: TokenSpace, groups: int, users: int, system_len: int,
                  question_len: LengthDist, output_len: LengthDist, seed: int) -> list[Request]:
    """`groups × users` prompts: group g's system prompt, then one user's question."""
    if groups < 1 or users < 1 or system_len < 1:
        raise ValueError(f"shared prefix: groups, users and system_len must be >= 1, got "
                         f"{groups}, {users}, {system_len}")
    rng = np.random.default_rng(seed)
    systems = [space.draw(rng, system_len) for _ in range(groups)]
    n = groups * users
    questions = question_len.sample(rng, n)
    outputs = output_len.sample(rng, n)
    order = rng.permutation(n)
    requests = []
    for index, k in enumerate(order):
        group = int(k) // users
        prompt = systems[group] + space.draw(rng, int(questions[k]))
        requests.append(Request(index, prompt, int(outputs[k]), group=f"g{group}"))
    return requests


def multi_turn(space: TokenSpace, conversations: int, turns: int, question_len: LengthDist,
               output_len: LengthDist, seed: int) -> list[Request]:
    """`conversations × turns` prompts, each turn extending its conversation's last."""
    if conversations < 1 or turns < 1:
        raise ValueError(f"multi-turn: conversations and turns must be >= 1, got "
                         f"{conversations}, {turns}")
    rng = np.random.default_rng(seed)
    history: list[tuple[int, ...]] = [() for _ in range(conversations)]
    requests: list[Request] = []
    for turn in range(turns):
        questions = question_len.sample(rng, conversations)
        outputs = output_len.sample(rng, conversations)
        for c in range(conversations):
            prompt = history[c] + space.draw(rng, int(questions[c]))
            requests.append(Request(len(requests), prompt, int(outputs[c]), group=f"c{c}",
                                    turn=turn + 1))
            history[c] = prompt + space.draw(rng, int(outputs[c]))  # the answer, synthesized
    return requests
