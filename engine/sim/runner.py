"""The simulated engine's step: sleep as the cost model says, then sample from a hash.

No model is built and no weights are read. A step takes `SimCostModel.step_seconds` of wall
time, counted from when the runner got the batch (the Python work of scheduling and booking
is inside the budget, not added to it, so a busy 2-core box running dozens of sim workers
still gives each step its modelled length as long as the cores keep up). Tokens are a pure
function of the context — its length and its last `TAIL_TOKENS` tokens, hashed — so the same
prompt gives the same completion on every worker and in every run, whichever worker computed
the prompt (prefill worker, decode worker or aggregated worker). The model's end-of-sequence
tokens are never drawn unless `sim_eos_probability` asks for them.

The KV cache is a tiny stand-in (`sim_cache_shape`: one layer, one head of 8 float16 values
per token, 512 bytes a block at block size 16) that the transfer agent registers and moves
like the real one; its bytes are never read.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import torch
import xxhash

from engine.block_manager import BlockManager
from engine.kv_cache import CacheShape
from engine.scheduler import ScheduledBatch
from engine.sim.cost_model import SimCostModel
from engine.step_runner import StepTokens, sampling_rows

TAIL_TOKENS = 16  # of the context, hashed with its length into the next token
SIM_KV_HEAD_DIM = 8  # values per token of the stand-in cache's single head
SIM_KV_DTYPE = torch.float16


def sim_cache_shape(num_blocks: int, block_size: int) -> CacheShape:
    """The stand-in KV cache: one layer (one group), one head of `SIM_KV_HEAD_DIM` values."""
    return CacheShape(num_layers=1, num_blocks=num_blocks, block_size=block_size,
                      num_kv_heads=1, head_dim=SIM_KV_HEAD_DIM, dtype=SIM_KV_DTYPE,
                      layer_group=1)


def sim_model_id(model_dir: str | Path) -> str:
    """The simulated model's name in the KV compatibility hash: `sim:` and the hash of the
    model's config.json (no weights needed), so sim workers of one model pair with each other
    and never with real ones."""
    digest = hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()
    return f"sim:{digest[:12]}"


def sim_token(token_ids: Sequence[int], vocab_size: int, eos_token_ids: Collection[int],
              eos_probability: float = 0.0) -> int:
    """The next token after `token_ids`: a hash of its length and last `TAIL_TOKENS` tokens.

    An end-of-sequence token only with `eos_probability` (from the hash's high bits, so it too
    repeats); otherwise the hash's token, moved past any end-of-sequence id."""
    tail = token_ids[-TAIL_TOKENS:]
    digest = xxhash.xxh3_64_intdigest(struct.pack(f"<Q{len(tail)}I", len(token_ids), *tail))
    if eos_probability > 0 and eos_token_ids and (digest >> 40) / 2**24 < eos_probability:
        return min(eos_token_ids)
    token = digest % vocab_size
    for _ in range(vocab_size):
        if token not in eos_token_ids:
            return token
        token = (token + 1) % vocab_size
    raise ValueError("vocab_size: every token is an end-of-sequence token")


class SimRunner:
    """A `StepRunner` with no model (module doc); `sleep` and `clock` are injectable so tests
    check the cost model without waiting."""

    def __init__(self, cost: SimCostModel, shape: CacheShape, vocab_size: int,
                 eos_token_ids: Collection[int],
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.cost = cost
        self.kv_cache = torch.zeros(shape.dims, dtype=shape.dtype)  # [G, N, g, 2, bs, Hkv, D]
        self.num_layers = shape.num_layers
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sleep = sleep
        self.clock = clock
        self.last_step_s = 0.0  # the modelled time of the latest step

    def run(self, batch: ScheduledBatch, block_manager: BlockManager,
            on_layer_done: Callable[[int], None] | None) -> StepTokens:
        started = self.clock()
        prefill_tokens = decode_seqs = context = 0
        for request, num_new in zip(batch.requests, batch.num_new_tokens, strict=True):
            if num_new == 1 and request.num_output_tokens > 0 and \
                    request.num_computed_tokens == request.num_tokens - 1:
                decode_seqs += 1
                context += request.num_tokens
            else:
                prefill_tokens += num_new
        self.last_step_s = self.cost.step_seconds(prefill_tokens, decode_seqs, context)
        # the step's time is spread over the layers: a prefill's writes of a layer group leave
        # when that group would be computed, as with the model
        for layer in range(self.num_layers):
            left = started + self.last_step_s * (layer + 1) / self.num_layers - self.clock()
            if left > 0:
                self.sleep(left)
            if on_layer_done is not None:
                on_layer_done(layer)
        rows = sampling_rows(batch)
        eos_p = self.cost.sim_eos_probability
        return StepTokens(rows, [sim_token(batch.requests[i].token_ids, self.vocab_size,
                                           self.eos_token_ids, eos_p) for i in rows])
