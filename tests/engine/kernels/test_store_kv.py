"""store_kv (torch and Triton paths): every slot written, nothing else touched."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine.kernels import store_kv, store_kv_torch, store_kv_triton
from tests.support.device import device_under_test

DEVICE = str(device_under_test())  # TANDEM_TEST_DEVICE; CPU: the Triton interpreter
StoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
BACKENDS: dict[str, tuple[StoreFn, str]] = {"torch": (store_kv_torch, "cpu"),
                                            "triton": (store_kv_triton, DEVICE)}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(("num_kv_heads", "head_dim", "block_size", "dtype"), [
    (4, 16, 4, torch.float32), (2, 32, 16, torch.bfloat16), (1, 64, 4, torch.float16),
    (3, 24, 8, torch.float32),  # non-power-of-2 heads and head_dim: padded tiles in Triton
])
def test_writes_exactly_the_mapped_slots(backend: str, num_kv_heads: int, head_dim: int,
                                         block_size: int, dtype: torch.dtype) -> None:
    fn, device = BACKENDS[backend]
    gen = torch.Generator().manual_seed(0)
    num_blocks, num_tokens = 6, 11
    cache = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim,
                        generator=gen).to(dtype)  # [N, 2, bs, Hkv, D]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]  # [T], scattered
    # key/value as slices of a fused [T, 3, Hkv, D] projection: strided token dim.
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, generator=gen).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]  # [T, Hkv, D]
    expected = cache.clone()
    for t, slot in enumerate(slots.tolist()):
        expected[slot // block_size, 0, slot % block_size] = key[t]
        expected[slot // block_size, 1, slot % block_size] = value[t]
    cache_dev = cache.to(device)
    fn(key.to(device), value.to(device), cache_dev, slots.to(device))
    assert torch.equal(cache_dev.cpu(), expected)


def test_torch_path_on_a_non_contiguous_cache() -> None:
    full = torch.zeros(4, 2, 4, 2, 32)  # [N, 2, bs, Hkv, 2*D]
    cache = full[..., :16]  # [N, 2, bs, Hkv, D], strided
    key, value = torch.ones(3, 2, 16), torch.full((3, 2, 16), 2.0)  # [T, Hkv, D]
    store_kv_torch(key, value, cache, torch.tensor([0, 5, 15]))
    assert cache[0, 0, 0].eq(1).all() and cache[1, 1, 1].eq(2).all() and cache[3, 0, 3].eq(1).all()
    assert full.sum() == 3 * 2 * 16 * 3  # nothing else, and not the hidden half
    assert full[..., 16:].eq(0).all()


def test_dispatch_uses_torch_for_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_ATTENTION_BACKEND", raising=False)
    cache = torch.zeros(2, 2, 4, 1, 16)
    store_kv(torch.ones(1, 1, 16), torch.ones(1, 1, 16), cache, torch.tensor([6]))
    assert cache[1, :, 2].eq(1).all() and cache.sum() == 32


def test_rejects_bad_arguments() -> None:
    cache = torch.zeros(2, 2, 4, 2, 16)
    key = torch.zeros(3, 2, 16)
    slots = torch.tensor([0, 1, 2])
    for args in ((key.half(), key, cache, slots), (key, key, cache, slots.int()),
                 (key[:, :1], key[:, :1], cache, slots), (key, key, cache, slots[:2])):
        for fn, _ in BACKENDS.values():
            with pytest.raises(ValueError):
                fn(*args)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_large_block_ids_do_not_overflow_int32(backend: str) -> None:
    """Slots in blocks past 65,536 with 32,768 elements per block: offsets beyond 2**31."""
    fn, device = BACKENDS[backend]
    bs, hkv, d = 16, 8, 128
    num_blocks = 65_536 + 8
    cache = torch.empty(num_blocks, 2, bs, hkv, d, dtype=torch.bfloat16, device=device)
    slots = torch.tensor([(num_blocks - 1) * bs + 3, (num_blocks - 5) * bs, 7 * bs + 1])  # [3]
    key = torch.randn(3, hkv, d).to(torch.bfloat16)  # [3, Hkv, D]
    value = torch.randn(3, hkv, d).to(torch.bfloat16)  # [3, Hkv, D]
    fn(key.to(device), value.to(device), cache, slots.to(device))
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(cache[slot // bs, 0, slot % bs].cpu(), key[t])
        assert torch.equal(cache[slot // bs, 1, slot % bs].cpu(), value[t])
