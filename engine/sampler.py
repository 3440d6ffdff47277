"""Turns next-token logits into tokens: greedy, temperature, top-k, top-p, per-request seeds.

A seeded request's draw for output position i comes from a generator seeded with
(seed, i) alone, so its tokens depend neither on the rest of the batch nor on which process
sampled the earlier ones: a prefill worker draws position 0, its decode worker 1, 2, ...,
and a request migrated after n tokens resumes at position n on another pair
(`SamplingParams.seed_offset`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xxhash

from engine.sampling import SamplingParams


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           positions: Sequence[int]) -> list[int]:
    """One token per row. logits: [S, V] float32; params and positions: one per row, the
    position of the row's token in its request's output (0: the first generated token).

    Greedy rows take the argmax; the others are sampled from the temperature-scaled
    distribution cut to the top-k tokens and then to the smallest set whose probability
    reaches top-p. A seeded row draws from `position_generator(seed, position)`; an unseeded
    one from torch's global generator.
    """
    tokens = logits.argmax(dim=-1).tolist()  # [S]
    for row, p in enumerate(params):
        if not p.greedy:
            generator = None if p.seed is None else position_generator(p.seed, positions[row])
            tokens[row] = _sample_row(logits[row], p, generator)
    return tokens


def position_generator(seed: int, position: int) -> torch.Generator:
    """The generator of a seeded request's draw at output `position`: a hash of both, so
    neighbouring seeds and positions give unrelated streams."""
    mixed = xxhash.xxh64_intdigest(position.to_bytes(8, "little"), seed=seed)
    return torch.Generator().manual_seed(mixed)


def _sample_row(logits: torch.Tensor, p: SamplingParams,
                generator: torch.Generator | None) -> int:
    scaled = logits / p.temperature  # [V]
    if 0 < p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [V]
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)  # [V]
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p  # [V]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)  # [V]
    return int(torch.multinomial(probs, 1, generator=generator).item())
