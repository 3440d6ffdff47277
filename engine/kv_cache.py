"""The paged KV cache tensor: its layout, its size, and how it is allocated.

Layout (one allocation for the whole model, so transfer backends register it once): the layers
are cut into G = L / g groups of g adjacent layers, and inside a group the cache is block-major:

    kv_cache: [G, num_blocks, g, 2, block_size, num_kv_heads, head_dim]

`kv_layer(kv_cache, l)` is layer `l`'s view `[N, 2, bs, Hkv, D]`; each block's `[2, bs, Hkv, D]`
in it is one contiguous run of `block_bytes_per_layer` bytes (64 KiB for a Llama-3-8B shape in
bf16 with block size 16), K at `[b, 0]`, V at `[b, 1]`, and consecutive blocks of one layer are
g runs apart. A token in slot `s` lives at block `s // block_size`, offset `s % block_size`.

Why groups. The unit a transfer moves is "these blocks, these layers". In a layer-major cache
(g = 1) each (layer, block) is its own 64 KiB region, and a transfer backend pays a few µs per
region, which is a quarter of the time of a 64 KiB copy. With groups, the g layers of a run of
adjacent block ids are ONE region of `run * g * block_bytes_per_layer` bytes on both sides, so
prefill, sending each group as soon as its last layer is computed, moves g times bigger
regions while its transfer still overlaps the compute of the later groups. g = 1 is the old
layer-major layout, g = L fully block-major (one region per block run, but the whole prompt's
KV leaves only after the last layer). The default, `auto_layer_group`, takes the smallest g
whose block-group reaches `DEFAULT_GROUP_TARGET_BYTES` (see kv_transfer/README.md for the
numbers). g is part of the KV compatibility hash: workers with different g refuse each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.model_config import ModelConfig

log = logging.getLogger(__name__)

# One block of one layer group should be at least this big. On the bench machine a NIXL write of
# scattered blocks reaches ~100% of its single-buffer bandwidth with 512 KiB block-groups (even
# with no two blocks adjacent), ~91-97% with 256 KiB, ~75% with 64 KiB (kv_transfer/README.md).
# Bigger groups gain nothing more and delay when the first bytes leave.
DEFAULT_GROUP_TARGET_BYTES = 512 << 10


def layout_name(layer_group: int) -> str:
    """The layout's name in the KV compatibility hash: groups, blocks, layers in a group, k/v,
    slot, heads, dim — and g."""
    return f"GBgTSHD/g={layer_group}"


def auto_layer_group(num_layers: int, block_bytes_per_layer: int,
                     target_bytes: int = DEFAULT_GROUP_TARGET_BYTES) -> int:
    """The smallest divisor g of `num_layers` with `g * block_bytes_per_layer >= target_bytes`
    (`num_layers` itself when none reaches it)."""
    for g in range(1, num_layers + 1):
        if num_layers % g == 0 and g * block_bytes_per_layer >= target_bytes:
            return g
    return num_layers


@dataclass(frozen=True)
class CacheShape:
    """The shape of one worker's paged KV cache."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    layer_group: int  # g: adjacent layers stored block-major together (1: layer-major)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.layer_group < 1 or self.num_layers % self.layer_group:
            raise ValueError(f"layer_group: must divide num_layers ({self.num_layers}), "
                             f"got {self.layer_group}")

    @classmethod
    def for_model(cls, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                  layer_group: int | None = None) -> CacheShape:
        """The cache of `model`; `layer_group=None` picks g with `auto_layer_group`."""
        per_layer = cls(model.num_layers, num_blocks, block_size, model.num_kv_heads,
                        model.head_dim, dtype, 1).block_bytes_per_layer
        g = layer_group or auto_layer_group(model.num_layers, per_layer)
        return cls(model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim,
                   dtype, g)

    @property
    def num_groups(self) -> int:
        return self.num_layers // self.layer_group

    @property
    def dims(self) -> tuple[int, int, int, int, int, int, int]:
        """[G, N, g, 2, bs, Hkv, D]"""
        return (self.num_groups, self.num_blocks, self.layer_group, 2, self.block_size,
                self.num_kv_heads, self.head_dim)

    @property
    def layout_name(self) -> str:
        return layout_name(self.layer_group)

    @property
    def block_bytes_per_layer(self) -> int:
        """Bytes of K+V for one block of one layer."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    @property
    def block_bytes_per_group(self) -> int:
        """Bytes of one block of one layer group: one contiguous region."""
        return self.block_bytes_per_layer * self.layer_group

    @property
    def total_bytes(self) -> int:
        return self.block_bytes_per_layer * self.num_layers * self.num_blocks


def blocks_for_budget(model: ModelConfig, block_size: int, dtype: torch.dtype,
                      budget_bytes: int) -> int:
    """How many blocks (of all layers) fit in `budget_bytes` (the same for every g)."""
    per_block = CacheShape.for_model(model, 1, block_size, dtype, 1).total_bytes
    return budget_bytes // per_block


def kv_layer(kv_cache: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer `layer` of the whole-model cache `[G, N, g, 2, bs, Hkv, D]`: a view
    `[N, 2, bs, Hkv, D]`.

    Each block's `[2, bs, Hkv, D]` is contiguous; the block dimension is strided when g > 1 (the
    kernels take strides), so callers never assume the view itself is contiguous.
    """
    if kv_cache.dim() != 7:
        raise ValueError(f"kv_cache: expected [G, N, g, 2, bs, Hkv, D], got "
                         f"{tuple(kv_cache.shape)}")
    group = kv_cache.shape[2]
    return kv_cache[layer // group, :, layer % group]  # [N, 2, bs, Hkv, D]


def allocate_kv_cache(shape: CacheShape, device: torch.device | str = "cpu") -> torch.Tensor:
    """Allocates the cache, zero-filled, and logs how many tokens it holds."""
    cache = torch.zeros(shape.dims, dtype=shape.dtype, device=device)  # [G, N, g, 2, bs, Hkv, D]
    log.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%s, %s, %d groups of %d layers)",
        shape.num_blocks, shape.block_size, shape.num_blocks * shape.block_size,
        shape.total_bytes / 2**20, shape.dtype, device, shape.num_groups, shape.layer_group,
    )
    return cache
