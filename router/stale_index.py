"""Routing on a stale prefix index, counted: the index predicted that a worker held N leading
blocks of the prompt, and the worker's own reply (Reserve on the decode side, Prefill on the
prefill side) says it held fewer.

The prediction is capped as the workers cap what they reuse: the last prompt token is always
computed, so at most `(prompt tokens - 1) // block_size` blocks can come from a cache. A worker
that holds more than predicted (it cached the prefix after the last sync) is not stale.
"""

from __future__ import annotations


def reusable_blocks(predicted: int, prompt_tokens: int, block_size: int) -> int:
    """The blocks a worker predicted to hold `predicted` leading blocks can reuse."""
    return max(min(predicted, (prompt_tokens - 1) // block_size), 0)


def is_stale(predicted: int, reported: int, prompt_tokens: int, block_size: int) -> bool:
    """Whether a worker's `reported` cached blocks fall short of the index's `predicted`."""
    return reported < reusable_blocks(predicted, prompt_tokens, block_size)
