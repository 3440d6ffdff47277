"""Dense K/V of a steady decode batch, kept from step to step (the CPU engine's decode path).

`paged_decode_torch` gathers every sequence's K/V out of the paged cache on every step: at
batch 128 with ~170 tokens that is ~5.5 ms per layer on one AVX2 core, more than the attention
itself (~3 ms). When consecutive forward passes decode the same requests (a steady batch),
all but one token per sequence are what the previous step gathered. So the mirror keeps the
gathered K/V `[2, S, Hkv, W, D]` of each layer, with `HEADROOM` spare positions, and a steady
step only writes its new token into it (~0.07 ms).

When it holds anything: from the second consecutive decode step of the same requests (the
first one gathers as usual; the second gathers with headroom; later ones append) until any
other forward pass — a prefill or mixed step, a changed batch, a longer sequence than the
headroom — which drops it. So what it holds always equals what the cache holds (values
rounded to the cache dtype, stored in the compute dtype). A batch whose mirror would exceed
`max_bytes` (`EngineConfig.decode_mirror_bytes`, 1 GiB by default, 0: off) just gathers.
The paged cache stays the source of truth: the mirror is a copy, and only the CPU path has
one (the Triton kernels read the paged cache directly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kernels.attention import DecodePlan, decode_sdpa, gather_decode_kv, plan_decode

HEADROOM = 64  # positions gathered past the longest sequence: steps until the next gather
DEFAULT_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class MirrorStep:
    """What one steady decode step does to the mirror; the same for every layer."""

    gather: DecodePlan | None  # gather everything (with headroom), else append the new token
    positions: torch.Tensor  # [S] int64: each sequence's new token's position
    mask: torch.Tensor | None  # [S, 1, 1, L] additive float32; None: all of length L
    length: int  # L, the longest sequence


class DecodeMirror:
    """Per-layer dense K/V of the running decode batch; owned by one model, one thread."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buffers: dict[int, torch.Tensor] = {}  # layer -> flat buffer, kept and grown
        self._request_ids: tuple[str, ...] = ()  # the previous decode step's batch
        self._seq_lens: list[int] = []
        self._block_tables: torch.Tensor | None = None  # [S, nb] int32 of the previous step
        self._width = 0  # W of the held K/V; 0: holds nothing
        self.gathers = 0  # full gathers into the mirror (for tests and stats)

    def forget(self) -> None:
        """Called for every forward pass that is not a mirrored decode step."""
        self._request_ids, self._seq_lens, self._width = (), [], 0
        self._block_tables = None

    def release(self) -> None:
        """Frees the buffers (e.g. after a one-off huge batch)."""
        self.forget()
        self._buffers.clear()

    def begin(self, request_ids: Sequence[str], seq_lens: list[int], layer0: torch.Tensor,
              block_tables: torch.Tensor, num_layers: int,
              dtype: torch.dtype) -> MirrorStep | None:
        """Plans a decode-only step; None: gather as usual (not steady yet, or too big).

        layer0: any layer of the cache `[N, 2, bs, Hkv, D]` (all share strides); dtype: the
        compute dtype the mirror holds.
        """
        ids = tuple(request_ids)
        steady = (bool(ids) and ids == self._request_ids
                  and all(n == p + 1 for n, p in zip(seq_lens, self._seq_lens, strict=True))
                  and self._same_blocks(block_tables, layer0.shape[2]))
        self._request_ids, self._seq_lens, self._block_tables = ids, seq_lens, block_tables
        if not steady:
            self._width = 0
            return None
        length = max(seq_lens)
        lens = torch.tensor(seq_lens, device=block_tables.device)  # [S]
        positions = lens - 1  # [S]
        if self._width >= length:
            return MirrorStep(None, positions, _padding_mask(lens, length), length)
        width = length + HEADROOM
        num_kv_heads, head_dim = layer0.shape[3], layer0.shape[4]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if num_layers * 2 * len(ids) * num_kv_heads * width * head_dim * itemsize > self.max_bytes:
            self._width = 0
            return None
        self._width = width
        self.gathers += 1
        plan = plan_decode(layer0, block_tables, lens.to(torch.int32), length, width)
        return MirrorStep(plan, positions, plan.mask, length)

    def _same_blocks(self, block_tables: torch.Tensor, block_size: int) -> bool:
        """Every block the previous step read is still where it was in the block tables."""
        prev = self._block_tables
        if prev is None or prev.shape[0] != block_tables.shape[0]:
            return False
        width = min(prev.shape[1], block_tables.shape[1])
        lens = torch.tensor(self._seq_lens, device=prev.device)  # [S]
        used = torch.arange(width, device=prev.device)[None, :] * block_size < lens[:, None]
        same = (prev[:, :width] == block_tables[:, :width]) | ~used  # [S, width]
        return bool(same.all())

    def attend(self, step: MirrorStep, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, kv_layer: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of q `[S, Hq, D]` for `layer`; k, v `[S, Hkv, D]` are the new tokens' K/V
        as the cache holds them (already stored there), in q's dtype."""
        num_seqs = q.shape[0]
        num_kv_heads, head_dim = kv_layer.shape[3], kv_layer.shape[4]
        shape = (2, num_seqs, num_kv_heads, self._width, head_dim)
        numel = 2 * num_seqs * num_kv_heads * self._width * head_dim
        buffer = self._buffers.get(layer)
        if buffer is None or buffer.numel() < numel or buffer.dtype != q.dtype:
            buffer = torch.empty(numel, dtype=q.dtype, device=q.device)
            self._buffers[layer] = buffer
        kv = buffer[:numel].view(shape)  # [2, S, Hkv, W, D]
        if step.gather is not None:
            gather_decode_kv(kv_layer, step.gather, num_seqs, q.dtype, out=kv)
        else:
            seqs = torch.arange(num_seqs, device=q.device)  # [S]
            kv[0, seqs, :, step.positions] = k  # [S, Hkv, D]
            kv[1, seqs, :, step.positions] = v  # [S, Hkv, D]
        return decode_sdpa(q, kv, step.mask, step.length, scale)  # [S, Hq, D]


def _padding_mask(seq_lens: torch.Tensor, length: int) -> torch.Tensor | None:
    """`[S, 1, 1, L]` additive mask of positions past each sequence; None if none are."""
    if bool((seq_lens == length).all()):
        return None
    pos = torch.arange(length, device=seq_lens.device)  # [L]
    mask = torch.zeros(seq_lens.shape[0], length, device=seq_lens.device)  # [S, L]
    return mask.masked_fill_(pos[None, :] >= seq_lens[:, None], float("-inf"))[:, None, None]
