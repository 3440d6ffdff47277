"""Turns next-token logits into tokens: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.sampling import SamplingParams


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row. logits: [S, V] float32; params and generators: one per row.

    Greedy rows take the argmax; the others are sampled from the temperature-scaled
    distribution cut to the top-k tokens and then to the smallest set whose probability
    reaches top-p. A row with its own generator (a seeded request) draws only from it, so its
    tokens do not depend on the rest of the batch.
    """
    tokens = logits.argmax(dim=-1).tolist()  # [S]
    for row, p in enumerate(params):
        if not p.greedy:
            tokens[row] = _sample_row(logits[row], p, generators[row])
    return tokens


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
