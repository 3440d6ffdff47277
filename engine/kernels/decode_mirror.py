"""Dense K/V of the running decode batch, kept from step to step (the CPU engine's decode path).

`paged_decode_torch` gathers every sequence's K/V out of the paged cache on every step: at
batch 128 with ~170 tokens that is ~5.5 ms per layer on one AVX2 core, more than the attention
itself (~3 ms). But between two consecutive decode steps a running sequence changes by one
token. So the mirror keeps each running request's gathered K/V in a slot of a dense buffer
`[2, slots, Hkv, W, D]` per layer (W: the longest sequence plus `HEADROOM` positions), and a
decode step only

- appends the new token of each request it already holds (~0.07 ms for 128 of them),
- gathers the requests it does not hold (new arrivals, or any whose blocks or length are not
  exactly what it holds), into free slots,
- moves a few slots down when requests leave, so the batch's slots stay `0..S-1`,

then attends over the first S slots (queries permuted into slot order and back).

What it holds always equals what the cache holds (values rounded to the cache dtype, stored in
the compute dtype): a request is kept only if it was in the previous forward pass, which was a
decode step, with one token fewer and the same blocks under the positions held. Any other
forward pass (a prefill or mixed step) drops everything, and a longer sequence than the
buffer's width, or more requests than its slots, starts it over. A batch whose buffer would
exceed `max_bytes` (`EngineConfig.decode_mirror_bytes`, 1 GiB by default, 0: off) just gathers.
The paged cache stays the source of truth and only the CPU path has a mirror (the Triton
kernels read the paged cache directly). Request ids must not be reused by a new request in the
decode step right after the old one's last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kernels.attention import DecodePlan, decode_sdpa, gather_decode_kv, plan_decode

HEADROOM = 64  # positions past the longest sequence: steps until the buffer is rebuilt wider
SLOT_ROUND = 32  # slots are allocated in multiples of this
DEFAULT_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class MirrorStep:
    """What one decode step does to the mirror; the same for every layer."""

    moves: tuple[torch.Tensor, torch.Tensor] | None  # [M] source and destination slots
    fresh_slots: torch.Tensor | None  # [F] slots of the requests gathered this step
    fresh_plan: DecodePlan | None  # their gather (width: their longest sequence)
    kept_rows: torch.Tensor | None  # [K] batch rows of the requests held; None: all, in order
    append_rows: torch.Tensor | None  # [2 * K * Hkv] rows of the buffer as [-1, D] where their
    # new tokens' K then V go; None: no request held
    row_of_slot: torch.Tensor | None  # [S] batch row in each slot; None: slot s is row s
    slot_of_row: torch.Tensor | None  # [S] its inverse
    mask: torch.Tensor | None  # [S, 1, 1, L] additive float32 in slot order; None: no padding
    length: int  # L, the longest sequence


class DecodeMirror:
    """Per-layer dense K/V of the running decode batch; owned by one model, one thread."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buffers: dict[int, torch.Tensor] = {}  # layer -> flat buffer, kept and grown
        self._slot_of: dict[str, int] = {}  # request id -> slot, for the previous step's batch
        self._held: list[int] = []  # per slot: positions held (its sequence length)
        self._tables: list[list[int]] = []  # per slot: its block table row
        self._width = 0  # W; 0: holds nothing
        self._slots = 0  # slots allocated
        self.gathered_rows = 0  # sequences gathered into the mirror (for tests and stats)
        self.appended_rows = 0  # sequences that only appended their token

    def forget(self) -> None:
        """Called for every forward pass that is not a decode step on the torch path."""
        self._slot_of, self._held, self._tables, self._width = {}, [], [], 0

    def begin(self, request_ids: Sequence[str], seq_lens: list[int], layer0: torch.Tensor,
              block_tables: torch.Tensor, num_layers: int,
              dtype: torch.dtype) -> MirrorStep | None:
        """Plans a decode step; None: too big for the budget (gather as usual).

        layer0: any layer of the cache `[N, 2, bs, Hkv, D]` (all share strides); dtype: the
        compute dtype the mirror holds; request_ids: the batch's, unique.
        """
        num_seqs, length = len(request_ids), max(seq_lens)
        block_size, num_kv_heads, head_dim = layer0.shape[2], layer0.shape[3], layer0.shape[4]
        tables: list[list[int]] = block_tables.tolist()
        if length > self._width or num_seqs > self._slots:  # start over, bigger
            slots = max(self._slots, -(-num_seqs // SLOT_ROUND) * SLOT_ROUND)
            width = length + HEADROOM
            itemsize = torch.empty((), dtype=dtype).element_size()
            self.forget()
            if num_layers * 2 * slots * num_kv_heads * width * head_dim * itemsize > self.max_bytes:
                return None
            self._slots, self._width = slots, width
        kept: dict[int, int] = {}  # batch row -> its slot
        for row, (rid, n) in enumerate(zip(request_ids, seq_lens, strict=True)):
            slot = self._slot_of.get(rid)
            if slot is not None and n == self._held[slot] + 1:
                used = -(-self._held[slot] // block_size)
                if tables[row][:used] == self._tables[slot][:used]:
                    kept[row] = slot
        # Slots 0..S-1 for the batch: kept requests below S stay, the others move down into
        # free slots, and fresh ones take the free slots left.
        taken = {slot for slot in kept.values() if slot < num_seqs}
        free = iter(sorted(set(range(num_seqs)) - taken))
        slot_of_row: list[int] = [0] * num_seqs
        moves: list[tuple[int, int]] = []
        for row, slot in kept.items():
            if slot >= num_seqs:
                dest = next(free)
                moves.append((slot, dest))
                slot = dest
            slot_of_row[row] = slot
        fresh_rows = [row for row in range(num_seqs) if row not in kept]
        for row in fresh_rows:
            slot_of_row[row] = next(free)
        self._slot_of = {rid: slot_of_row[row] for row, rid in enumerate(request_ids)}
        self._held, self._tables = [0] * num_seqs, [[] for _ in range(num_seqs)]
        for row, slot in enumerate(slot_of_row):
            self._held[slot], self._tables[slot] = seq_lens[row], tables[row]
        self.gathered_rows += len(fresh_rows)
        self.appended_rows += len(kept)
        return self._plan(layer0, block_tables, seq_lens, slot_of_row, kept, fresh_rows, moves)

    def _plan(self, layer0: torch.Tensor, block_tables: torch.Tensor, seq_lens: list[int],
              slot_of_row: list[int], kept: dict[int, int], fresh_rows: list[int],
              moves: list[tuple[int, int]]) -> MirrorStep:
        device = block_tables.device
        num_seqs, length = len(seq_lens), max(seq_lens)

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        fresh_slots = fresh_plan = None
        if fresh_rows:
            rows = index(fresh_rows)  # [F]
            lens = index([seq_lens[r] for r in fresh_rows]).to(torch.int32)  # [F]
            longest = int(lens.max())
            fresh_plan = plan_decode(layer0, block_tables[rows], lens, longest, longest)
            fresh_slots = index([slot_of_row[r] for r in fresh_rows])
        kept_rows = append_rows = None
        if kept:
            if list(kept) != list(range(num_seqs)):
                kept_rows = index(list(kept))  # [K]
            slots = index([slot_of_row[r] for r in kept])  # [K]
            positions = index([seq_lens[r] - 1 for r in kept])  # [K]
            num_kv_heads, width = layer0.shape[3], self._width
            heads = torch.arange(num_kv_heads, device=device)  # [Hkv]
            k_rows = (slots[:, None] * num_kv_heads + heads[None, :]) * width + positions[:, None]
            v_offset = self._slots * num_kv_heads * width
            append_rows = torch.stack((k_rows, k_rows + v_offset)).view(-1)  # [2 * K * Hkv]
        row_of_slot = slot_index = None
        if slot_of_row != list(range(num_seqs)):
            order = [0] * num_seqs
            for row, slot in enumerate(slot_of_row):
                order[slot] = row
            row_of_slot, slot_index = index(order), index(slot_of_row)
        lens_by_slot = torch.tensor(self._held[:num_seqs], device=device)  # [S]
        mask = None
        if bool((lens_by_slot < length).any()):
            pos = torch.arange(length, device=device)  # [L]
            mask = torch.zeros(num_seqs, length, device=device)  # [S, L]
            mask = mask.masked_fill_(pos[None, :] >= lens_by_slot[:, None],
                                     float("-inf"))[:, None, None]  # [S, 1, 1, L]
        move_index = None
        if moves:
            move_index = (index([m[0] for m in moves]), index([m[1] for m in moves]))
        return MirrorStep(move_index, fresh_slots, fresh_plan, kept_rows, append_rows,
                          row_of_slot, slot_index, mask, length)

    def attend(self, step: MirrorStep, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, kv_layer: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of q `[S, Hq, D]` for `layer`; k, v `[S, Hkv, D]` are the new tokens' K/V
        as the cache holds them (already stored there), in q's dtype."""
        num_kv_heads, head_dim = kv_layer.shape[3], kv_layer.shape[4]
        shape = (2, self._slots, num_kv_heads, self._width, head_dim)
        numel = 2 * self._slots * num_kv_heads * self._width * head_dim
        buffer = self._buffers.get(layer)
        if buffer is None or buffer.numel() < numel or buffer.dtype != q.dtype:
            # zeroed: a slot's positions past its sequence are masked, but still read, and
            # garbage there (NaN or inf bit patterns) would poison the softmax
            buffer = torch.zeros(numel, dtype=q.dtype, device=q.device)
            self._buffers[layer] = buffer
        kv = buffer[:numel].view(shape)  # [2, slots, Hkv, W, D]
        if step.moves is not None:
            source, dest = step.moves
            kv[:, dest] = kv[:, source]  # [2, M, Hkv, W, D]
        if step.fresh_plan is not None and step.fresh_slots is not None:
            fresh = step.fresh_slots.shape[0]
            gathered = gather_decode_kv(kv_layer, step.fresh_plan, fresh, q.dtype)
            kv[:, step.fresh_slots, :, :step.fresh_plan.width] = gathered  # [2, F, Hkv, Wf, D]
        if step.append_rows is not None:
            new = torch.stack((k, v))  # [2, S, Hkv, D]
            if step.kept_rows is not None:
                new = new[:, step.kept_rows]  # [2, K, Hkv, D]
            kv.view(-1, head_dim).index_copy_(0, step.append_rows, new.view(-1, head_dim))
        num_seqs = q.shape[0]
        if step.row_of_slot is None or step.slot_of_row is None:
            return decode_sdpa(q, kv[:, :num_seqs], step.mask, step.length, scale)
        out = decode_sdpa(q[step.row_of_slot], kv[:, :num_seqs], step.mask, step.length,
                          scale)  # [S, Hq, D] in slot order
        return out[step.slot_of_row]  # [S, Hq, D] in batch order
