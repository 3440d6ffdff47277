"""What the engine's step loop asks of whatever computes a step: the model, or the simulation.

`Engine.step` schedules a batch, hands it to its runner, and books the tokens it returns. The
model (`engine.model_runner.ModelRunner`) runs the forward pass and samples from the logits;
the simulated engine (`engine.sim.runner.SimRunner`) sleeps as its cost model says and draws
tokens from a hash of the context. Both own the KV cache tensor the transfer agent registers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

from engine.block_manager import BlockManager
from engine.scheduler import ScheduledBatch


class StepTokens(NamedTuple):
    """A step's sampled tokens: `rows[i]` is the index in the batch of the request that
    sampled `tokens[i]` (requests still mid-prompt sample nothing)."""

    rows: list[int]
    tokens: list[int]


class StepRunner(Protocol):
    """Computes one scheduled batch."""

    kv_cache: torch.Tensor  # [G, N, g, 2, bs, Hkv, D] (engine.kv_cache)

    def run(self, batch: ScheduledBatch, block_manager: BlockManager,
            on_layer_done: Callable[[int], None] | None) -> StepTokens:
        """Computes the batch's new tokens into the KV cache, calling `on_layer_done(layer)`
        once each layer's K/V of the step is in the cache, and samples the next token of every
        request whose known tokens are all computed."""
        ...


def sampling_rows(batch: ScheduledBatch) -> list[int]:
    """Indices of the batch's requests that sample a token this step: those whose last known
    token is computed by it (its logits give the next)."""
    return [i for i, (request, num_new) in enumerate(zip(batch.requests, batch.num_new_tokens,
                                                         strict=True))
            if request.num_computed_tokens + num_new == request.num_tokens]
