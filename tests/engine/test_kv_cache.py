"""The cache layout: layer groups, their validation, the default g, and the layer views."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.kv_cache import (
    DEFAULT_GROUP_TARGET_BYTES,
    CacheShape,
    allocate_kv_cache,
    auto_layer_group,
    kv_layer,
)
from engine.model_config import ModelConfig

KIB = 1 << 10


def shape(num_layers: int = 4, layer_group: int = 2) -> CacheShape:
    return CacheShape(num_layers, 5, 4, 2, 8, torch.float32, layer_group)


def test_dims_and_sizes() -> None:
    s = shape(4, 2)
    assert s.dims == (2, 5, 2, 2, 4, 2, 8)  # [G, N, g, 2, bs, Hkv, D]
    assert s.block_bytes_per_layer == 2 * 4 * 2 * 8 * 4
    assert s.block_bytes_per_group == 2 * s.block_bytes_per_layer
    assert s.total_bytes == allocate_kv_cache(s).numel() * 4
    assert s.layout_name == "GBgTSHD/g=2" != shape(4, 1).layout_name


@pytest.mark.parametrize("group", [0, 3, 8])
def test_layer_group_must_divide_num_layers(group: int) -> None:
    with pytest.raises(ValueError, match=r"^layer_group: must divide num_layers \(4\)"):
        shape(4, group)


def test_auto_layer_group_is_the_smallest_divisor_reaching_the_target() -> None:
    assert DEFAULT_GROUP_TARGET_BYTES == 512 * KIB
    assert auto_layer_group(32, 64 * KIB) == 8  # Llama-3-8B shape, bf16, block size 16
    assert auto_layer_group(32, 128 * KIB) == 4
    assert auto_layer_group(32, 1024 * KIB) == 1  # already big enough
    assert auto_layer_group(28, 64 * KIB) == 14  # 8 does not divide 28: the next divisor
    assert auto_layer_group(80, 40 * KIB) == 16  # needs 13 layers: the divisor 16
    assert auto_layer_group(2, 4 * KIB) == 2  # never reached: fully block-major
    assert auto_layer_group(32, 64 * KIB, target_bytes=256 * KIB) == 4


def test_for_model_picks_auto_unless_told(tiny_llama: Path) -> None:
    model = ModelConfig.from_dir(tiny_llama)
    auto = CacheShape.for_model(model, 8, 16, torch.float32)
    assert auto.layer_group == auto_layer_group(model.num_layers, auto.block_bytes_per_layer)
    assert CacheShape.for_model(model, 8, 16, torch.float32, 1).layer_group == 1
    with pytest.raises(ValueError, match="^layer_group"):
        CacheShape.for_model(model, 8, 16, torch.float32, model.num_layers + 1)


def test_kv_layer_views_share_the_cache() -> None:
    s = shape(4, 2)
    cache = allocate_kv_cache(s)  # [G, N, g, 2, bs, Hkv, D]
    for layer in range(4):
        kv_layer(cache, layer)[3, 1] = layer + 1  # V of block 3
    flat = cache.view(2, 5, 2, -1)  # [G, N, g, unit]
    for layer in range(4):
        unit = flat[layer // 2, 3, layer % 2]  # [unit]: K then V
        half = unit.numel() // 2
        assert unit[:half].eq(0).all() and unit[half:].eq(layer + 1).all()
    assert kv_layer(cache, 1).shape == (5, 2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"\[G, N, g, 2, bs, Hkv, D\]"):
        kv_layer(torch.zeros(4, 5, 2, 4, 2, 8), 0)  # the old layer-major cache
