"""The paged KV cache tensor: its layout, its size, and how it is allocated.

Layout (one allocation for the whole model, so transfer backends register it once):

    kv_cache: [num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]

`kv_cache[l, b]` — K and V of block `b` in layer `l` — is one contiguous run of
`2 * block_size * num_kv_heads * head_dim` elements (64 KiB for a Llama-3-8B shape in bf16
with block size 16). Layer-major order makes everything one layer needs (for the attention
kernels, and for a layer-by-layer KV push) a single strided region, and runs of adjacent block
ids are adjacent in memory, so a transfer can coalesce them into one descriptor.
`kv_cache[l, b, 0]` is K, `kv_cache[l, b, 1]` is V, each [block_size, num_kv_heads, head_dim].
A token in slot `s` lives at block `s // block_size`, offset `s % block_size`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.model_config import ModelConfig

log = logging.getLogger(__name__)

LAYOUT_NAME = "LBTSHD"  # layers, blocks, k/v, slot, heads, dim: part of the KV compatibility hash


@dataclass(frozen=True)
class CacheShape:
    """The shape of one worker's paged KV cache."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def dims(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_layers, self.num_blocks, 2, self.block_size, self.num_kv_heads,
                self.head_dim)

    @property
    def block_bytes_per_layer(self) -> int:
        """Bytes of K+V for one block of one layer (the unit a transfer moves)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    @property
    def total_bytes(self) -> int:
        return self.block_bytes_per_layer * self.num_layers * self.num_blocks


def blocks_for_budget(model: ModelConfig, block_size: int, dtype: torch.dtype,
                      budget_bytes: int) -> int:
    """How many blocks (of all layers) fit in `budget_bytes`."""
    per_block = CacheShape(model.num_layers, 1, block_size, model.num_kv_heads,
                           model.head_dim, dtype).total_bytes
    return budget_bytes // per_block


def kv_layer(kv_cache: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer `layer` of the whole-model cache: a view `[N, 2, bs, Hkv, D]`.

    Each block's `[2, bs, Hkv, D]` is contiguous; the block dimension may be strided (the
    kernels take strides), so callers never assume the view itself is contiguous.
    """
    if kv_cache.dim() == 7:  # [G, N, g, 2, bs, Hkv, D]: groups of g layers, block-major inside
        group = kv_cache.shape[2]
        return kv_cache[layer // group, :, layer % group]
    return kv_cache[layer]  # [L, N, 2, bs, Hkv, D]


def allocate_kv_cache(shape: CacheShape, device: torch.device | str = "cpu") -> torch.Tensor:
    """Allocates the cache, zero-filled, and logs how many tokens it holds."""
    cache = torch.zeros(shape.dims, dtype=shape.dtype, device=device)  # [L, N, 2, bs, Hkv, D]
    log.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%s, %s)",
        shape.num_blocks, shape.block_size, shape.num_blocks * shape.block_size,
        shape.total_bytes / 2**20, shape.dtype, device,
    )
    return cache
