"""Addressing one layer of the paged cache as rows, whatever the block stride.

A layer view `[N, 2, bs, Hkv, D]` always has contiguous blocks (`[2, bs, Hkv, D]` in one run)
but its block dimension may be strided: layer-major caches put block b+1 right after block b,
layer-group caches put the group's other layers in between (`engine.kv_cache`). The torch path
gathers and scatters whole rows, so it only needs the block stride counted in slot rows
(`Hkv * D` elements): `slot_rows(layer)[block * stride + kv * bs + offset]` is one token's
`[Hkv, D]`. Every layer of a cache has the same strides, so rows computed once serve all.
"""

from __future__ import annotations

import torch


def block_stride_rows(kv_layer: torch.Tensor) -> int | None:
    """The block stride in slot rows, or None if the view's blocks are not contiguous runs."""
    _, _, block_size, num_kv_heads, head_dim = kv_layer.shape
    slot = num_kv_heads * head_dim
    inner = (block_size * slot, slot, head_dim, 1)  # strides of a contiguous [2, bs, Hkv, D]
    if tuple(kv_layer.stride()[1:]) != inner or kv_layer.stride(0) % slot:
        return None
    return kv_layer.stride(0) // slot


def slot_rows(kv_layer: torch.Tensor) -> torch.Tensor:
    """`kv_layer` as `[R, Hkv, D]` rows, a view sharing its memory (writes land in the cache).

    Rows between this layer's blocks belong to other layers: index only rows from
    `key_rows` / `plan_decode`.
    """
    num_blocks, _, block_size, num_kv_heads, head_dim = kv_layer.shape
    stride = block_stride_rows(kv_layer)
    if stride is None:
        raise ValueError(f"kv_layer blocks are not contiguous (strides {kv_layer.stride()})")
    num_rows = (num_blocks - 1) * stride + 2 * block_size
    return kv_layer.as_strided((num_rows, num_kv_heads, head_dim),
                               (num_kv_heads * head_dim, head_dim, 1))
