"""A request's state inside the engine: its tokens, blocks, progress and finish reason."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.block_hash import BlockHash, hash_block, hash_prompt_blocks
from engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # a stop or end-of-sequence token
    LENGTH = "length"  # max_tokens or the model's context
    CANCELLED = "cancelled"  # released from outside (a cancel, a lease, a shutdown)


@dataclass
class Request:
    """One generation request as the scheduler and model runner see it.

    `token_ids` is the prompt followed by the tokens generated so far; the KV of the first
    `num_computed_tokens` of them is in the cache. After a preemption `num_computed_tokens`
    drops to 0 and the request is recomputed (its prefix blocks are usually still cached).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival: int  # monotonically increasing admission order
    cache_salt: bytes = b""
    token_ids: list[int] = field(init=False)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    hold_blocks: bool = False  # prefill role: keep the blocks after finishing until released
    block_hashes: list[BlockHash] = field(default_factory=list)
    _hash_seed: int = 0
    _block_size: int = 16

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    def init_hashes(self, block_size: int, seed: int) -> None:
        """Hashes the prompt's full blocks once; output blocks are hashed as they fill."""
        self._block_size, self._hash_seed = block_size, seed
        self.block_hashes = hash_prompt_blocks(self.token_ids, block_size, self.cache_salt, seed)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
        if len(self.token_ids) % self._block_size == 0:
            start = len(self.token_ids) - self._block_size
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes.append(hash_block(parent, self.token_ids[start:], self.cache_salt,
                                                self._hash_seed))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def output_position(self) -> int:
        """The position of the next sampled token in the whole request's output: tokens
        generated before this prompt ended (`seed_offset`) come first (`engine.sampler`)."""
        return self.sampling.seed_offset + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
