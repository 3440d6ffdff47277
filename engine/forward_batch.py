"""What one forward pass of the model runs on: flattened tokens and their paged-cache places."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Tokens of S sequences flattened into T rows, plus the metadata the kernels need.

    Sequence s contributes rows `query_start_loc[s]:query_start_loc[s+1]`: the last
    q_len_s of its `seq_lens[s]` tokens. Their K/V go to `slot_mapping` (block * block_size +
    offset) and attention reads the sequence's blocks through `block_tables[s]`.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [S, max_blocks] int32
    query_start_loc: torch.Tensor  # [S+1] int32
    seq_lens: torch.Tensor  # [S] int32
    max_query_len: int
    max_seq_len: int
    logits_indices: torch.Tensor  # [S'] int64: rows whose next-token logits are wanted
    request_ids: tuple[str, ...] = ()  # the S sequences' requests (empty: unknown)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
