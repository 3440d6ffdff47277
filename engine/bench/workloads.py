"""The benchmark's workloads: fixed random prompts, and what each one counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DECODE_BATCHES = (1, 8, 32, 128)
PROMPT_LEN, NEW_TOKENS = 128, 64
PREFILL_PROMPTS, PREFILL_LEN = 32, 512


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    new_tokens: int
    count_prompt: bool  # count prompt tokens (prefill) instead of generated tokens

    def counted_tokens(self, outputs: list[list[int]]) -> int:
        if self.count_prompt:
            return sum(len(p) for p in self.prompts)
        assert all(len(o) == self.new_tokens for o in outputs), "a request stopped early"
        return sum(len(o) for o in outputs)


def _prompts(count: int, length: int, seed: int, vocab: int = 1024) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=gen).tolist()


def decode_workload(batch: int) -> Workload:
    return Workload(f"decode batch {batch}", _prompts(batch, PROMPT_LEN, batch), NEW_TOKENS,
                    count_prompt=False)


def prefill_workload() -> Workload:
    return Workload(f"prefill {PREFILL_PROMPTS}x{PREFILL_LEN}",
                    _prompts(PREFILL_PROMPTS, PREFILL_LEN, 99), 1, count_prompt=True)
