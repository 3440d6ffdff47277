"""paged_attention: varlen causal attention of a batch of sequences over the paged KV cache.

Sequence `s` owns the queries `q[query_start_loc[s]:query_start_loc[s + 1]]` (`q_len` of them),
which are the LAST `q_len` of its `seq_lens[s]` tokens; the K/V of all `seq_lens[s]` tokens are
already in `kv_layer` (store_kv ran first), in the blocks `block_tables[s, :ceil(seq_len / bs)]`.
Query `i` sits at position `seq_len - q_len + i` and attends keys `0..` that position; query
head `h` reads kv head `h // (Hq // Hkv)`. Decode is `q_len == 1`, a fresh prompt
`q_len == seq_len`, a prompt with a cached prefix `q_len < seq_len`.

Two implementations with one contract: `paged_attention_triton` (CUDA, or the Triton
interpreter) and `paged_attention_torch` (the CPU engine's production path, built on
`scaled_dot_product_attention`); `paged_attention` picks one (see `engine.kernels.backend`).
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.kernels.backend import check_triton_device, is_interpreted, select_backend
from engine.kernels.cache_rows import block_stride_rows, slot_rows

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E): the kernel uses the cheaper exp2


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, kv_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    qk_scale,  # softmax scale * LOG2E
    stride_q_t, stride_q_h,  # q: [T, Hq, D], unit stride on D
    stride_out_t, stride_out_h,  # out: [T, Hq, D], unit stride on D
    stride_kv_block, stride_kv_kv, stride_kv_slot, stride_kv_head,  # kv: [N, 2, bs, Hkv, D]
    stride_bt_seq,  # block_tables: [S, max_blocks], unit stride on blocks
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per (sequence, block of BLOCK_Q queries, kv head).

    Its BLOCK_Q * GROUP_PAD rows are (query, query head of this kv head) pairs, so every query
    head sharing a kv head reads each K/V tile once. The loop walks the sequence's keys in tiles
    of BLOCK_N tokens, looking each token's block up in the block table (so the cache block size
    need not match the tile), with an online softmax in float32. UPCAST feeds tl.dot float32
    operands: Triton 3.9's interpreter multiplies the raw bits of bfloat16 operands.
    """
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # keys before the first query

    rows = tl.arange(0, BLOCK_M)  # [M]
    query = q_block * BLOCK_Q + rows // GROUP_PAD  # [M] query index within the sequence
    group = rows % GROUP_PAD  # [M]
    head = kv_head * GROUP + group  # [M] query head
    row_ok = (query < q_len) & (group < GROUP)  # [M]
    dims = tl.arange(0, HEAD_DIM_PAD)  # [Dp]
    dim_ok = dims < HEAD_DIM  # [Dp]

    token = (q_start + query).to(tl.int64)  # [M] row of q/out
    q_offs = token[:, None] * stride_q_t + head[:, None] * stride_q_h + dims[None, :]  # [M, Dp]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [M, Dp]
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = context_len + query  # [M] absolute position of each row's query

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running max, finite: no inf - inf
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)  # [M, Dp]

    # Causal: this program's last query sits at context_len + (q_block + 1) * BLOCK_Q - 1.
    kv_end = tl.minimum(seq_len, context_len + (q_block + 1) * BLOCK_Q)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for start in range(0, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [N] key positions
        pos_ok = pos < kv_end  # [N]; padding block-table entries are never loaded
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=pos_ok, other=0)  # [N]
        # int64 before the multiply: block * stride_kv_block overflows int32 on big caches.
        kv_offs = (block.to(tl.int64) * stride_kv_block + (pos % BLOCK_SIZE) * stride_kv_slot
                   + kv_head * stride_kv_head)  # [N]
        kv_mask = pos_ok[:, None] & dim_ok[None, :]  # [N, Dp]
        k = tl.load(kv_ptr + kv_offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(kv_ptr + stride_kv_kv + kv_offs[:, None] + dims[None, :], mask=kv_mask,
                    other=0.0)  # [N, Dp]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N] fp32
        allowed = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])  # [M, N]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [M]
        alpha = tl.exp2(m_i - m_new)  # [M]
        p = tl.exp2(s - m_new[:, None])  # [M, N]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past q_len or GROUP attended nothing
    out = acc / l_i[:, None]  # [M, Dp]
    out_offs = token[:, None] * stride_out_t + head[:, None] * stride_out_h + dims[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def _check_paged_attention_args(q: torch.Tensor, kv_layer: torch.Tensor,
                                block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                                seq_lens: torch.Tensor, upcast_ok: bool = False) -> None:
    """Shape, dtype and device checks shared by both paths (host-side only: no device sync).

    `upcast_ok`: float32 queries over a lower-precision cache are allowed (the torch path
    upcasts the K/V it reads: the CPU engine computes bf16 models in float32).
    """
    if kv_layer.dim() != 5 or kv_layer.shape[1] != 2:
        raise ValueError(f"kv_layer must be [N, 2, bs, Hkv, D], got {tuple(kv_layer.shape)}")
    num_kv_heads, head_dim = kv_layer.shape[3], kv_layer.shape[4]
    if q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads != 0:
        raise ValueError(f"q must be [T, Hq, {head_dim}] with Hq a multiple of {num_kv_heads}, "
                         f"got {tuple(q.shape)}")
    if q.dtype != kv_layer.dtype and not (upcast_ok and q.dtype == torch.float32):
        raise ValueError(f"q dtype {q.dtype} != cache dtype {kv_layer.dtype}")
    num_seqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks], "
                         f"got {tuple(block_tables.shape)}")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be [{num_seqs + 1}], "
                         f"got {tuple(query_start_loc.shape)}")
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc),
                    ("seq_lens", seq_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    devices = {q.device, kv_layer.device, block_tables.device, query_start_loc.device,
               seq_lens.device}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def paged_attention_triton(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_query_len: int, max_seq_len: int) -> torch.Tensor:
    """Triton paged attention; `max_query_len` only sizes the grid (an upper bound is fine)."""
    _check_paged_attention_args(q, kv_layer, block_tables, query_start_loc, seq_lens)
    check_triton_device(_paged_attention_kernel, q)
    for name, t in (("q", q), ("kv_layer", kv_layer), ("block_tables", block_tables)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs unit stride on its last dim, got {t.stride()}")
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_layer.shape
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [T, Hq, D]
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # >= 16 rows and >= 16 keys per tile: tl.dot's minimum on GPUs. Decode has 1 query per
    # sequence, so its rows are mostly the query heads of one kv head.
    rows = 16 if max_query_len == 1 else 64
    block_q = max(1, rows // group_pad)
    grid = (num_seqs, triton.cdiv(max(max_query_len, 1), block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        out, q, kv_layer, block_tables, query_start_loc, seq_lens,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=group_pad,
        BLOCK_Q=block_q, BLOCK_N=32, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=is_interpreted(_paged_attention_kernel),
    )
    return out


# ---------------------------------------------------------------------------------------------
# Torch path. The gathered K/V of a call are several MiB; allocating them fresh page-faults on
# every call (~5 us per 4 KiB page on our VMs, more than the attention itself), so they go to a
# per-thread workspace that grows to the largest call seen and is kept.


class _Workspace(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


_workspace = _Workspace()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device,
             name: str = "kv") -> torch.Tensor:
    """A 1-D scratch tensor of `numel` elements, valid until this thread's next call."""
    key = (name, dtype, device)
    buffer = _workspace.buffers.get(key)
    # a buffer made under inference mode cannot be written outside it (tests call the kernels
    # both ways in one process)
    stale = buffer is not None and buffer.is_inference() and not torch.is_inference_mode_enabled()
    if buffer is None or buffer.numel() < numel or stale:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        _workspace.buffers[key] = buffer
    return buffer[:numel]


def release_workspace() -> None:
    """Frees this thread's torch-path scratch memory (e.g. after a one-off huge batch)."""
    _workspace.buffers.clear()


def _upcast(kv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`kv` in `dtype` (a copy into scratch memory when the cache is lower precision)."""
    if kv.dtype == dtype:
        return kv
    out = _scratch(kv.numel(), dtype, kv.device, "upcast").view(kv.shape)
    return out.copy_(kv)


def _gather_kv(kv_layer: torch.Tensor, block_ids: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of `block_ids` `[n]` in `dtype`, each `[n, bs, Hkv, D]`, in scratch memory."""
    _, _, block_size, num_kv_heads, head_dim = kv_layer.shape
    n = block_ids.shape[0]
    stride = block_stride_rows(kv_layer)
    if stride is None or stride % block_size:  # not the engine's layout; correct, just slower
        blocks = kv_layer[block_ids.long()].to(dtype)  # [n, 2, bs, Hkv, D]
        return blocks[:, 0].contiguous(), blocks[:, 1].contiguous()
    width = block_size * num_kv_heads * head_dim
    step = stride // block_size  # the block stride in half blocks (K or V of one block)
    halves = kv_layer.as_strided(((kv_layer.shape[0] - 1) * step + 2, width),
                                 (width, 1))  # [R, bs*Hkv*D]: half-block rows
    rows = torch.cat((block_ids * step, block_ids * step + 1))  # [2n]: all K halves, then V
    out = _scratch(2 * n * width, kv_layer.dtype, kv_layer.device)
    torch.index_select(halves, 0, rows, out=out.view(2 * n, width))  # [2n, bs*Hkv*D]
    kv = _upcast(out.view(2, n, block_size, num_kv_heads, head_dim), dtype)  # [2, n, bs, Hkv, D]
    return kv[0], kv[1]


def _attend_one(q: torch.Tensor, kv_layer: torch.Tensor, block_row: torch.Tensor,
                seq_len: int, scale: float) -> torch.Tensor:
    """One sequence: q `[q_len, Hq, D]` are its last q_len tokens; returns `[q_len, Hq, D]`."""
    q_len, _, head_dim = q.shape
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    num_blocks = -(-seq_len // block_size)
    k, v = _gather_kv(kv_layer, block_row[:num_blocks], q.dtype)  # [nb, bs, Hkv, D] each
    k = k.view(1, num_blocks * block_size, num_kv_heads, head_dim)[:, :seq_len]  # [1, L, Hkv, D]
    v = v.view(1, num_blocks * block_size, num_kv_heads, head_dim)[:, :seq_len]  # [1, L, Hkv, D]
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [1, Hkv, L, D]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, D]
    if q_len == seq_len:  # fresh prompt: top-left causal is the right mask, and skips tiles
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale,
                                             enable_gqa=True)  # [1, Hq, q_len, D]
    else:
        query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)  # [q_len]
        key_pos = torch.arange(seq_len, device=q.device)  # [L]
        mask = key_pos[None, :] <= query_pos[:, None]  # [q_len, L]
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=True)  # [1, Hq, q_len, D]
    return out[0].transpose(0, 1)  # [q_len, Hq, D]


class DecodePlan(NamedTuple):
    """Where a decode batch's K/V sit in a layer of the cache: the same for every layer.

    The gather reads rows of `head_dim` elements straight into `[2, S, Hkv, L, D]` (K then V,
    head-major), the layout SDPA runs fastest on: gathering whole blocks and transposing the
    view costs as much again inside SDPA at batch 128 (measured on AVX2: 1.6 + 3.7 ms per
    layer against 2.9 + 1.4 ms).
    """

    rows: torch.Tensor  # [2 * S * Hkv * W] int64 rows of the layer's slot rows viewed as [-1, D]
    mask: torch.Tensor | None  # [S, 1, 1, L] additive float32 (0 / -inf); None: no padding
    max_seq_len: int  # L
    width: int  # W >= L positions gathered per sequence


def plan_decode(kv_layer: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                max_seq_len: int, width: int | None = None) -> DecodePlan:
    """The gather rows and padding mask of a decode batch (any layer of the engine's cache).

    `width` (default `max_seq_len`) positions per sequence are gathered: positions past a
    sequence's length read a harmless row (block 0's) and are masked. The mask covers only
    `max_seq_len` positions.
    """
    _, _, block_size, num_kv_heads, _ = kv_layer.shape
    stride = block_stride_rows(kv_layer)
    if stride is None:
        raise ValueError(f"kv_layer blocks are not contiguous (strides {kv_layer.stride()})")
    device = block_tables.device
    pos = torch.arange(width or max_seq_len, device=device)  # [W]
    valid = pos[None, :] < seq_lens[:, None]  # [S, W]
    table = block_tables[:, (pos // block_size).clamp_(max=block_tables.shape[1] - 1)]  # [S, W]
    slot_row = torch.where(valid, table.long() * stride + pos % block_size, 0)  # [S, W]
    heads = torch.arange(num_kv_heads, device=device)  # [Hkv]
    k_rows = slot_row[:, None, :] * num_kv_heads + heads[None, :, None]  # [S, Hkv, W]
    rows = torch.stack((k_rows, k_rows + block_size * num_kv_heads)).view(-1)  # [2*S*Hkv*W]
    valid = valid[:, :max_seq_len]  # [S, L]
    mask = None
    if not bool(valid.all()):
        mask = torch.zeros(valid.shape, dtype=torch.float32, device=device)  # [S, L]
        mask = mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]  # [S, 1, 1, L]
    return DecodePlan(rows, mask, max_seq_len, width or max_seq_len)


def gather_decode_kv(kv_layer: torch.Tensor, plan: DecodePlan, num_seqs: int,
                     dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """K and V of a decode batch, `[2, S, Hkv, W, D]` in `dtype`: into `out` or scratch memory."""
    num_kv_heads, head_dim = kv_layer.shape[3], kv_layer.shape[4]
    shape = (2, num_seqs, num_kv_heads, plan.width, head_dim)
    rows = slot_rows(kv_layer).view(-1, head_dim)  # [R * Hkv, D]
    if out is not None and kv_layer.dtype == dtype:
        torch.index_select(rows, 0, plan.rows, out=out.view(-1, head_dim))  # [2*S*Hkv*W, D]
        return out.view(shape)
    gathered = _scratch(plan.rows.shape[0] * head_dim, kv_layer.dtype, kv_layer.device)
    torch.index_select(rows, 0, plan.rows, out=gathered.view(-1, head_dim))  # [2*S*Hkv*W, D]
    if out is not None:
        return out.view(shape).copy_(gathered.view(shape))
    return _upcast(gathered.view(shape), dtype)


def decode_sdpa(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None, length: int,
                scale: float) -> torch.Tensor:
    """One query per sequence, q `[S, Hq, D]`, over the first `length` positions of kv
    `[2, S, Hkv, W, D]` (`mask`: `[S, 1, 1, length]` additive); returns `[S, Hq, D]`."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv.shape[2]
    # The query heads of one kv head become its query rows: no GQA expansion.
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [S, Hkv, G, D]
    mask = None if mask is None else mask.to(q.dtype)
    attn = F.scaled_dot_product_attention(qg, kv[0, :, :, :length], kv[1, :, :, :length],
                                          attn_mask=mask, scale=scale)  # [S, Hkv, G, D]
    return attn.reshape(num_seqs, num_heads, head_dim)


def paged_decode_torch(q: torch.Tensor, kv_layer: torch.Tensor, plan: DecodePlan,
                       scale: float) -> torch.Tensor:
    """One query per sequence, q `[S, Hq, D]`, over K/V gathered by `plan`; `[S, Hq, D]`."""
    kv = gather_decode_kv(kv_layer, plan, q.shape[0], q.dtype)  # [2, S, Hkv, W, D]
    return decode_sdpa(q, kv, plan.mask, plan.max_seq_len, scale)


def _attend_decode(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float, max_seq_len: int) -> torch.Tensor:
    """One query per sequence: q `[S, Hq, D]`; all sequences in one (masked) SDPA."""
    if block_stride_rows(kv_layer) is not None:
        plan = plan_decode(kv_layer, block_tables, seq_lens, max_seq_len)
        return paged_decode_torch(q, kv_layer, plan, scale)
    # Not the engine's layout (a strided view): block gather and a strided SDPA.
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    num_blocks = -(-max_seq_len // block_size)
    max_len = num_blocks * block_size
    table = block_tables[:, :num_blocks]  # [S, nb]
    first_pos = torch.arange(0, max_len, block_size, dtype=torch.int32, device=q.device)  # [nb]
    # Entries past a sequence's own block count are padding (maybe invalid ids): read block 0.
    table = torch.where(first_pos[None, :] < seq_lens[:, None], table, 0)  # [S, nb]
    k, v = _gather_kv(kv_layer, table.reshape(-1), q.dtype)  # [S*nb, bs, Hkv, D] each
    k = k.view(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2)  # [S, Hkv, L, D]
    v = v.view(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2)  # [S, Hkv, L, D]
    key_pos = torch.arange(max_len, dtype=torch.int32, device=q.device)  # [L]
    mask = (key_pos[None, :] < seq_lens[:, None])[:, None, None, :]  # [S, 1, 1, L]
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [S, Hkv, G, D]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [S, Hkv, G, D]
    return out.reshape(num_seqs, num_heads, head_dim)


# Causal prompts longer than this run in query tiles of this many rows (`causal_attention`).
CAUSAL_TILE = 128


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Causal SDPA of q `[B, Hq, L, D]` over k, v `[B, Hkv, L, D]`; returns `[B, Hq, L, D]`.

    torch's CPU flash attention splits keys into tiles of 512, so at L <= 512 a causal call
    computes every score and masks half of them away. Query tiles of `CAUSAL_TILE` rows, each
    over the keys up to its last row (masked bottom-right), skip most of that: measured on AVX2
    at 16 x 8 heads x 512 x 32, one thread, 75 ms in one call against 55 ms in 4 tiles. With
    grouped KV heads the query heads of a KV head are stacked into one call's rows (`[B, Hkv,
    G * rows, D]`, the mask repeated per head): the kernel reads each K/V tile once for the G
    heads and runs larger matmuls (SmolLM2-135M's 9/3 heads, bf16: 8 x 512 prompts 42.5 -> 37.0
    ms a layer, 32 x 128 18.9 -> 15.9 ms).
    """
    batch, num_heads, length, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_heads == num_kv_heads and length <= 2 * CAUSAL_TILE:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              scale=scale)  # [B, Hq, L, D]
    group = num_heads // num_kv_heads
    tile = length if length <= 2 * CAUSAL_TILE else CAUSAL_TILE
    # token-major underneath, as SDPA's own output is: the caller's [T, Hq, D] view is free
    out = torch.empty(batch, length, num_heads, head_dim, dtype=q.dtype,
                      device=q.device).transpose(1, 2)  # [B, Hq, L, D]
    stacked = q.view(batch, num_kv_heads, group, length, head_dim)  # [B, Hkv, G, L, D]
    positions = torch.arange(length, device=q.device)  # [L]
    for lo in range(0, length, tile):
        hi = min(lo + tile, length)
        mask = positions[None, :hi] <= positions[lo:hi, None]  # [hi - lo, hi]: key <= query
        rows = stacked[:, :, :, lo:hi].reshape(batch, num_kv_heads, group * (hi - lo),
                                               head_dim)  # [B, Hkv, G * (hi - lo), D]
        attended = F.scaled_dot_product_attention(
            rows, k[:, :, :hi], v[:, :, :hi], attn_mask=mask.repeat(group, 1),
            scale=scale)  # [B, Hkv, G * (hi - lo), D]
        out[:, :, lo:hi] = attended.view(batch, num_heads, hi - lo, head_dim)
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                      scale: float) -> torch.Tensor:
    """Causal attention of fresh prompts over their own K/V (no cache read); `[T, Hq, D]`.

    q `[T, Hq, D]`, k and v `[T, Hkv, D]`: sequence s owns the next `seq_lens[s]` rows. Prompts
    of one length run as one batched attention (the benchmark's case, and a chunked prefill's);
    others one each.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    length = seq_lens[0]
    if all(n == length for n in seq_lens):
        num_seqs = len(seq_lens)
        qh = q.view(num_seqs, length, num_heads, head_dim).transpose(1, 2)  # [S, Hq, L, D]
        kh = k.view(num_seqs, length, num_kv_heads, head_dim).transpose(1, 2)  # [S, Hkv, L, D]
        vh = v.view(num_seqs, length, num_kv_heads, head_dim).transpose(1, 2)  # [S, Hkv, L, D]
        out = causal_attention(qh, kh, vh, scale)  # [S, Hq, L, D]
        return out.transpose(1, 2).reshape(num_tokens, num_heads, head_dim)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D]
    start = 0
    for n in seq_lens:
        rows = slice(start, start + n)
        out[rows] = causal_attention(
            q[rows].transpose(0, 1)[None], k[rows].transpose(0, 1)[None],
            v[rows].transpose(0, 1)[None], scale)[0].transpose(0, 1)  # [n, Hq, D]
        start += n
    return out


def paged_attention_torch(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                          query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                          max_query_len: int, max_seq_len: int) -> torch.Tensor:
    """Pure-torch paged attention (the CPU engine's path).

    All-decode batches are one SDPA over K/V gathered through the block tables; other
    batches run their decode sequences that way and each longer sequence as its own SDPA
    (no padding of a 500-token prompt against 1-token decodes). `max_query_len` and
    `max_seq_len` must be the exact maxima. On CUDA tensors the mixed case syncs (`tolist`).
    q may be float32 over a bfloat16/float16 cache: K/V are upcast after the gather.
    """
    _check_paged_attention_args(q, kv_layer, block_tables, query_start_loc, seq_lens,
                                upcast_ok=True)
    num_seqs = seq_lens.shape[0]
    if max_query_len == 1:
        return _attend_decode(q, kv_layer, block_tables, seq_lens, scale, max_seq_len)
    if num_seqs == 1:
        return _attend_one(q, kv_layer, block_tables[0], max_seq_len, scale)

    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [T, Hq, D]
    starts: list[int] = query_start_loc.tolist()
    lens: list[int] = seq_lens.tolist()
    q_lens = [starts[s + 1] - starts[s] for s in range(num_seqs)]
    decodes = [s for s in range(num_seqs) if q_lens[s] == 1]
    if decodes:  # one batched SDPA for all of them
        seqs = torch.tensor(decodes, device=q.device)  # [Sd]
        rows = torch.tensor([starts[s] for s in decodes], device=q.device)  # [Sd]
        out[rows] = _attend_decode(q[rows], kv_layer, block_tables[seqs], seq_lens[seqs], scale,
                                   max(lens[s] for s in decodes))  # [Sd, Hq, D]
    for s in range(num_seqs):
        if q_lens[s] > 1:
            out[starts[s]:starts[s + 1]] = _attend_one(
                q[starts[s]:starts[s + 1]], kv_layer, block_tables[s], lens[s], scale)
    return out


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                    max_query_len: int, max_seq_len: int) -> torch.Tensor:
    """Causal attention of `q` `[T, Hq, D]` over the paged cache; returns `[T, Hq, D]`.

    Args:
        q: queries of all sequences, concatenated.
        kv_layer: `[N, 2, bs, Hkv, D]`, one layer of the cache, same dtype as `q`.
        block_tables: `[S, max_blocks]` int32; entries past a sequence's block count are
            padding and never read.
        query_start_loc: `[S + 1]` int32 offsets of each sequence's queries in `q`.
        seq_lens: `[S]` int32 tokens per sequence, queries included.
        scale: softmax scale, usually `head_dim ** -0.5`.
        max_query_len: host-side `max(q_len)`, so no device sync is needed.
        max_seq_len: host-side `max(seq_lens)`.

    Softmax runs in float32; the output has `q`'s dtype. Triton on CUDA tensors, torch
    otherwise (see `engine.kernels.backend`).
    """
    fn = paged_attention_triton if select_backend(q) == "triton" else paged_attention_torch
    return fn(q, kv_layer, block_tables, query_start_loc, seq_lens, scale, max_query_len,
              max_seq_len)
