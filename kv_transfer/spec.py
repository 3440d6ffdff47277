"""The KV compatibility descriptor two workers compare before any byte moves, and where its
(layer, block) units lie in a cache of that layout.

Two workers may exchange KV blocks only if every field below agrees: a block written by one must
mean exactly the same thing in the other's cache. `num_blocks` is deliberately absent (prefill and
decode pools differ in size); the transfer layer checks block ids against the peer's count instead.

Memory. `memory_type` ("DRAM": a CPU cache, "VRAM": a CUDA cache; NIXL's names) is compared like
the layout: a CPU worker and a GPU worker refuse each other, naming the field, rather than pair
and move bytes through paths nobody tested. `device_id` (the CUDA ordinal, 0 for DRAM) travels
with the spec because a peer needs it to describe our memory (NIXL descriptors carry it), but it
is neither compared nor hashed: a worker on cuda:0 and one on cuda:1 are compatible.

Units. The cache `[G, N, g, 2, bs, Hkv, D]` (engine/kv_cache.py) is a flat array of
`G * N * g` units of `block_bytes` each, one per (layer, block): unit
`((l // g) * N + b) * g + l % g`. `unit_ids` lists a write's units in memory order (group by
group, then block by block, then layer by layer) so that a run of blocks adjacent on both sides
and a whole group of layers come out as consecutive unit ids: one region.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from engine.kv_cache import CacheShape, layout_name

SPEC_FIELDS = ("model_name", "dtype", "num_layers", "num_kv_heads", "head_dim", "block_size",
               "layer_group", "layout", "memory_type")
LOCAL_FIELDS = ("device_id",)  # carried in the handshake, not compared, not hashed
MEMORY_TYPES = ("DRAM", "VRAM")


def memory_of(device: torch.device | str) -> tuple[str, int]:
    """(memory type, device id) of a cache on `device`: ("DRAM", 0) or ("VRAM", ordinal)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return "DRAM", 0
    if dev.type == "cuda":
        return "VRAM", dev.index if dev.index is not None else 0
    raise ValueError(f"device: a KV cache on {dev} cannot be transferred (cpu or cuda only)")


@dataclass(frozen=True)
class KVLayoutSpec:
    """What a peer's paged KV cache must match, field by field (see engine/kv_cache.py)."""

    model_name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    layer_group: int = 1  # g: layers stored block-major together (1: layer-major)
    memory_type: str = "DRAM"  # where the cache lives: "DRAM" (CPU) or "VRAM" (CUDA)
    device_id: int = 0  # the CUDA ordinal of a VRAM cache (0 for DRAM); not compared
    layout: str = field(init=False)  # the layout's name with g, from engine/kv_cache.py

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "layer_group"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_layers % self.layer_group:
            raise ValueError(f"layer_group: must divide num_layers ({self.num_layers}), got "
                             f"{self.layer_group}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype: {self.dtype!r} is not a torch dtype name")
        if self.memory_type not in MEMORY_TYPES:
            raise ValueError(f"memory_type: expected one of {MEMORY_TYPES}, got "
                             f"{self.memory_type!r}")
        if self.device_id < 0 or (self.memory_type == "DRAM" and self.device_id):
            raise ValueError(f"device_id: {self.device_id} for {self.memory_type} memory")
        object.__setattr__(self, "layout", layout_name(self.layer_group))

    @classmethod
    def from_cache_shape(cls, shape: CacheShape, model_name: str,
                         device: torch.device | str = "cpu") -> KVLayoutSpec:
        """The spec of a cache allocated by `engine.kv_cache.allocate_kv_cache(shape, device)`."""
        memory_type, device_id = memory_of(device)
        return cls(
            model_name=model_name,
            dtype=str(shape.dtype).removeprefix("torch."),
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            block_size=shape.block_size,
            layer_group=shape.layer_group,
            memory_type=memory_type,
            device_id=device_id,
        )

    @cached_property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype)
        assert isinstance(dtype, torch.dtype)
        return dtype

    @property
    def torch_device(self) -> torch.device:
        """Where a cache of this spec lives: the CPU, or the CUDA device `device_id`."""
        if self.memory_type == "DRAM":
            return torch.device("cpu")
        return torch.device("cuda", self.device_id)

    @cached_property
    def block_bytes(self) -> int:
        """Bytes of K+V of one block in one layer: one contiguous run in the cache."""
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    @cached_property
    def compat_hash(self) -> str:
        """sha256 over the canonical JSON of the compared fields (stable across processes, hosts
        and device ordinals)."""
        compared = {k: v for k, v in self.to_dict().items() if k not in LOCAL_FIELDS}
        blob = json.dumps(compared, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differing_fields(self, other: dict[str, Any]) -> list[str]:
        """Names of the fields whose value in `other` (a peer's `to_dict()`) differs from ours."""
        mine = self.to_dict()
        return [name for name in SPEC_FIELDS if other.get(name) != mine[name]]

    @property
    def num_groups(self) -> int:
        return self.num_layers // self.layer_group

    def dims(self, num_blocks: int) -> tuple[int, int, int, int, int, int, int]:
        """A cache of this layout with `num_blocks` blocks: [G, N, g, 2, bs, Hkv, D]."""
        return (self.num_groups, num_blocks, self.layer_group, 2, self.block_size,
                self.num_kv_heads, self.head_dim)

    def unit_ids(self, layers: range, blocks: np.ndarray, num_blocks: int) -> np.ndarray:
        """The (layer, block) units of `layers` x `blocks` in a cache of `num_blocks` blocks, in
        memory order: group by group, block by block (in `blocks` order), layer by layer.
        `[len(layers) * len(blocks)]` int64."""
        g = self.layer_group
        parts = []
        for group in range(layers.start // g, (layers.stop - 1) // g + 1):
            lo, hi = max(layers.start, group * g), min(layers.stop, (group + 1) * g)
            inner = np.arange(lo - group * g, hi - group * g, dtype=np.int64)  # [nl]
            first = (group * num_blocks + blocks.astype(np.int64)) * g  # [n]
            parts.append((first[:, None] + inner[None, :]).ravel())  # [n * nl]
        return np.concatenate(parts)

    def check_tensor(self, kv_cache: torch.Tensor) -> int:
        """Checks that `kv_cache` has this layout and returns its number of blocks."""
        if kv_cache.dim() != 7:
            raise ValueError(f"kv_cache: expected 7 dims [G, N, g, 2, bs, Hkv, D], got "
                             f"{tuple(kv_cache.shape)}")
        num_blocks = int(kv_cache.shape[1])
        if tuple(kv_cache.shape) != self.dims(num_blocks):
            g = self.layer_group
            raise ValueError(f"kv_cache: shape {tuple(kv_cache.shape)} does not match spec "
                             f"[{self.num_groups}, N, {g}, 2, {self.block_size}, "
                             f"{self.num_kv_heads}, {self.head_dim}] (groups of {g} layers)")
        if kv_cache.dtype != self.torch_dtype:
            raise ValueError(f"kv_cache: dtype {kv_cache.dtype} does not match spec {self.dtype}")
        if memory_of(kv_cache.device) != (self.memory_type, self.device_id):
            raise ValueError(f"kv_cache: on {kv_cache.device}, but the spec says "
                             f"{self.memory_type} device {self.device_id}")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache: must be one contiguous allocation")
        return num_blocks
