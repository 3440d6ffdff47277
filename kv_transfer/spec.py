"""The KV compatibility descriptor two workers compare before any byte moves.

Two workers may exchange KV blocks only if every field below agrees: a block written by one must
mean exactly the same thing in the other's cache. `num_blocks` is deliberately absent (prefill and
decode pools differ in size); the transfer layer checks block ids against the peer's count instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import torch

from engine.kv_cache import LAYOUT_NAME, CacheShape

SPEC_FIELDS = ("model_name", "dtype", "num_layers", "num_kv_heads", "head_dim", "block_size",
               "layout")


@dataclass(frozen=True)
class KVLayoutSpec:
    """What a peer's paged KV cache must match, field by field (see engine/kv_cache.py)."""

    model_name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    layout: str = LAYOUT_NAME

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype: {self.dtype!r} is not a torch dtype name")

    @classmethod
    def from_cache_shape(cls, shape: CacheShape, model_name: str) -> KVLayoutSpec:
        """The spec of a cache allocated by `engine.kv_cache.allocate_kv_cache(shape)`."""
        return cls(
            model_name=model_name,
            dtype=str(shape.dtype).removeprefix("torch."),
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            block_size=shape.block_size,
        )

    @cached_property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype)
        assert isinstance(dtype, torch.dtype)
        return dtype

    @cached_property
    def block_bytes(self) -> int:
        """Bytes of K+V of one block in one layer: one contiguous run in the cache."""
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    @cached_property
    def compat_hash(self) -> str:
        """sha256 over the canonical JSON of all fields (stable across processes and hosts)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differing_fields(self, other: dict[str, Any]) -> list[str]:
        """Names of the fields whose value in `other` (a peer's `to_dict()`) differs from ours."""
        mine = self.to_dict()
        return [name for name in SPEC_FIELDS if other.get(name) != mine[name]]

    def check_tensor(self, kv_cache: torch.Tensor) -> int:
        """Checks that `kv_cache` has this layout and returns its number of blocks."""
        if kv_cache.dim() != 6:
            raise ValueError(f"kv_cache: expected 6 dims [L, N, 2, bs, Hkv, D], got "
                             f"{tuple(kv_cache.shape)}")
        layers, num_blocks, two, block_size, heads, head_dim = kv_cache.shape
        want = (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)
        if (layers, two, block_size, heads, head_dim) != want:
            raise ValueError(f"kv_cache: shape {tuple(kv_cache.shape)} does not match spec "
                             f"[{self.num_layers}, N, 2, {self.block_size}, "
                             f"{self.num_kv_heads}, {self.head_dim}]")
        if kv_cache.dtype != self.torch_dtype:
            raise ValueError(f"kv_cache: dtype {kv_cache.dtype} does not match spec {self.dtype}")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache: must be one contiguous allocation")
        return int(num_blocks)
