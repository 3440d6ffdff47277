"""store_kv: writes the K and V of this step's tokens into their slots of the paged cache.

`kv_layer: [num_blocks, 2, block_size, num_kv_heads, head_dim]` (one layer of
`engine.kv_cache`); token `t` goes to slot `slot_mapping[t]`, i.e. block
`slot // block_size`, offset `slot % block_size`, K at index 0 and V at index 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.backend import check_triton_device, select_backend
from engine.kernels.cache_rows import block_stride_rows, slot_rows


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, kv_ptr, slot_mapping_ptr,
    stride_key_t, stride_key_h,  # key: [T, Hkv, D], unit stride on D
    stride_value_t, stride_value_h,  # value: [T, Hkv, D], unit stride on D
    stride_kv_block, stride_kv_kv, stride_kv_slot, stride_kv_head,  # kv: [N, 2, bs, Hkv, D]
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """One program per token: copies its [Hkv, D] K and V tiles into the cache."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)  # int64: slot * strides never wraps
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)  # [Hp]
    dims = tl.arange(0, HEAD_DIM_PAD)  # [Dp]
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]  # [Hp, Dp]

    key_offs = token * stride_key_t + heads[:, None] * stride_key_h + dims[None, :]  # [Hp, Dp]
    value_offs = token * stride_value_t + heads[:, None] * stride_value_h + dims[None, :]
    cache_offs = (block * stride_kv_block + offset * stride_kv_slot
                  + heads[:, None] * stride_kv_head + dims[None, :])  # [Hp, Dp] int64
    key = tl.load(key_ptr + key_offs, mask=mask)  # [Hp, Dp]
    value = tl.load(value_ptr + value_offs, mask=mask)  # [Hp, Dp]
    tl.store(kv_ptr + cache_offs, key, mask=mask)
    tl.store(kv_ptr + stride_kv_kv + cache_offs, value, mask=mask)


def _check_store_kv_args(key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    if kv_layer.dim() != 5 or kv_layer.shape[1] != 2:
        raise ValueError(f"kv_layer must be [N, 2, bs, Hkv, D], got {tuple(kv_layer.shape)}")
    _, _, _, num_kv_heads, head_dim = kv_layer.shape
    num_tokens = slot_mapping.shape[0]
    expected = (num_tokens, num_kv_heads, head_dim)
    if tuple(key.shape) != expected or tuple(value.shape) != expected:
        raise ValueError(f"key and value must be {expected} (from slot_mapping and kv_layer), "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if key.dtype != kv_layer.dtype or value.dtype != kv_layer.dtype:
        raise ValueError(f"key/value dtype {key.dtype}/{value.dtype} != cache {kv_layer.dtype}")
    if slot_mapping.dim() != 1 or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be 1-D int64, got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    devices = {key.device, value.device, kv_layer.device, slot_mapping.device}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def key_rows(slot_mapping: torch.Tensor, block_size: int, block_stride: int) -> torch.Tensor:
    """Rows `[T]` of K in `slot_rows(layer)` (V: `+ block_size`); `block_stride` in slot rows.

    The same for every layer of a step: the CPU model computes it once per forward pass.
    """
    # K of slot s is row block * block_stride + offset
    return slot_mapping // block_size * block_stride + slot_mapping % block_size  # [T]


def store_kv_rows(key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor,
                  k_rows: torch.Tensor) -> None:
    """store_kv given `key_rows(...)`: two index copies into the layer's slot rows."""
    rows = slot_rows(kv_layer)  # [R, Hkv, D]
    rows.index_copy_(0, k_rows, key)
    rows.index_copy_(0, k_rows + kv_layer.shape[2], value)


def store_kv_torch(key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Pure-torch store_kv: two vectorized index copies, no loop over tokens."""
    _check_store_kv_args(key, value, kv_layer, slot_mapping)
    block_size = kv_layer.shape[2]
    stride = block_stride_rows(kv_layer)
    if stride is not None:
        store_kv_rows(key, value, kv_layer, key_rows(slot_mapping, block_size, stride))
    else:
        block = slot_mapping // block_size  # [T]
        offset = slot_mapping % block_size  # [T]
        kv_layer[block, 0, offset] = key  # [T, Hkv, D]
        kv_layer[block, 1, offset] = value  # [T, Hkv, D]


def store_kv_triton(key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Triton store_kv: one program per token; needs unit stride on the head dim."""
    _check_store_kv_args(key, value, kv_layer, slot_mapping)
    check_triton_device(_store_kv_kernel, kv_layer)
    for name, t in (("key", key), ("value", value), ("kv_layer", kv_layer)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs unit stride on head_dim, got strides {t.stride()}")
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, _, block_size, num_kv_heads, head_dim = kv_layer.shape
    _store_kv_kernel[(num_tokens,)](
        key, value, kv_layer, slot_mapping,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Writes `key`/`value` `[T, Hkv, D]` into `kv_layer` at `slot_mapping` `[T]`, in place.

    Triton on CUDA tensors, torch otherwise (see `engine.kernels.backend`).
    """
    if select_backend(kv_layer) == "triton":
        store_kv_triton(key, value, kv_layer, slot_mapping)
    else:
        store_kv_torch(key, value, kv_layer, slot_mapping)
