"""Sampling parameters of one request, validated with errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop.

    temperature 0 means greedy. top_k 0 means no top-k cut. A seed makes a sampled request
    reproducible regardless of what else is in the batch: its draw for output position i
    depends only on (seed, i) (`engine.sampler`). `seed_offset` is the output position of
    the first token sampled here: a request whose prompt ends with n tokens it generated
    before (migrated to another worker, or recomputed there) passes n and continues the
    same random stream.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed_offset: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be in [0, 2**63), got {self.seed}")
        if not 0 <= self.seed_offset < 2**32:
            raise ValueError(f"seed_offset: must be in [0, 2**32), got {self.seed_offset}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Stop token ids must exist in the vocabulary."""
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids: {bad} outside the vocabulary [0, {vocab_size})")
