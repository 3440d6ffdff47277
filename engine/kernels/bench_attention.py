"""CPU timing of paged_attention_torch against SDPA on contiguous K/V (its lower bound).

    python3 -m engine.kernels.bench_attention [--threads N]

Decode: S sequences of 128..192 tokens; prefill: 32 fresh prompts of 512 tokens. Hq=8, Hkv=4,
D=32, block size 16. Prints the minimum and median wall time per call in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.kernels.attention import paged_attention_torch

HQ, HKV, D, BS = 8, 4, 32, 16


def _time(fn: Callable[[], object], budget_s: float = 0.5) -> tuple[float, float]:
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e6, statistics.median(times) * 1e6


def _case(q_lens: list[int], seq_lens: list[int], dtype: torch.dtype) -> tuple[str, ...]:
    gen = torch.Generator().manual_seed(0)
    num_seqs = len(seq_lens)
    needed = [-(-n // BS) for n in seq_lens]
    num_blocks = sum(needed) + 64
    kv = torch.randn(num_blocks, 2, BS, HKV, D, generator=gen).to(dtype)  # [N, 2, bs, Hkv, D]
    ids = torch.randperm(num_blocks, generator=gen).to(torch.int32)  # scattered blocks
    tables = torch.zeros(num_seqs, max(needed), dtype=torch.int32)  # [S, max_blocks]
    used = 0
    for s, n in enumerate(needed):
        tables[s, :n] = ids[used:used + n]
        used += n
    q = torch.randn(sum(q_lens), HQ, D, generator=gen).to(dtype)  # [T, Hq, D]
    qsl = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)  # [S + 1]
    lens = torch.tensor(seq_lens, dtype=torch.int32)  # [S]
    scale = D**-0.5

    def paged() -> object:
        return paged_attention_torch(q, kv, tables, qsl, lens, scale, max(q_lens), max(seq_lens))

    # Lower bound: the same attention on K/V already contiguous in SDPA's layout.
    max_len = max(seq_lens)
    k = torch.randn(num_seqs, HKV, max_len, D, generator=gen).to(dtype)  # [S, Hkv, L, D]
    v = torch.randn(num_seqs, HKV, max_len, D, generator=gen).to(dtype)  # [S, Hkv, L, D]
    if max(q_lens) == 1:
        qd = q.view(num_seqs, HKV, HQ // HKV, D)  # [S, Hkv, G, D]
        mask = (torch.arange(max_len)[None, :] < lens[:, None])[:, None, None, :]  # [S,1,1,L]

        def dense() -> object:
            return F.scaled_dot_product_attention(qd, k, v, attn_mask=mask, scale=scale)
    else:
        qp = q.view(num_seqs, max(q_lens), HQ, D).transpose(1, 2)  # [S, Hq, q_len, D]

        def dense() -> object:
            return F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=True)

    p_min, p_med = _time(paged)
    d_min, d_med = _time(dense)
    return (f"{p_min:9.0f}", f"{p_med:9.0f}", f"{d_min:9.0f}", f"{d_med:9.0f}",
            f"{p_min / d_min:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, Hq={HQ} Hkv={HKV} D={D} bs={BS}")
    print(f"{'case':<22}{'dtype':<10}{'paged min':>10}{'med':>10}{'dense min':>10}{'med':>10}"
          f"{'ratio':>7}")
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for num_seqs in (1, 8, 32, 128):
            seq_lens = torch.randint(128, 193, (num_seqs,), generator=gen).tolist()
            row = _case([1] * num_seqs, seq_lens, dtype)
            print(f"{f'decode S={num_seqs}':<22}{str(dtype)[6:]:<10}" + " ".join(row))
        row = _case([512] * 32, [512] * 32, dtype)
        print(f"{'prefill 32x512':<22}{str(dtype)[6:]:<10}" + " ".join(row))


if __name__ == "__main__":
    main()
