"""The C++ prefill attention kernels (`engine.kernels.cpu_ops.prefill_attention_cpu` and
`paged_prefill_attention_cpu`), built here with the machine's compiler as a worker builds them:
against float64 causal attention of each sequence on its own (fresh prompts) and token by token
over paged caches with shuffled blocks, garbage in unowned slots and padded block tables
(prompts over a cached prefix, chunks, decodes mixed in), against the torch path the engine
runs without them, on strided views of a fused projection, and with every bad argument
named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import cpu_ops
from engine.kernels.attention import prefill_attention
from tests.engine.kernels.test_cpu_paths import _in_layer_group
from tests.engine.kernels.test_paged_attention import assert_close, make_batch


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    """The kernels must build on a machine with a C++ compiler: a failure here is a failure."""
    assert cpu_ops.available(), "the C++ CPU kernels did not build (see the log)"


def cu_seqlens(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int],
              scale: float) -> torch.Tensor:
    """float64 causal attention, one sequence at a time, K/V heads repeated; `[T, Hq, D]`."""
    group = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lens:
        rows = slice(start, start + n)
        qs = q[rows].double().transpose(0, 1)  # [Hq, n, D]
        ks = k[rows].double().transpose(0, 1).repeat_interleave(group, 0)  # [Hq, n, D]
        vs = v[rows].double().transpose(0, 1).repeat_interleave(group, 0)  # [Hq, n, D]
        if n:
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
                        .transpose(0, 1))  # [n, Hq, D]
        start += n
    return torch.cat(outs)


def random_qkv(lens: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lens)
    q = torch.randn(tokens, hq, d, generator=gen).to(dtype)  # [T, Hq, D]
    k = torch.randn(tokens, hkv, d, generator=gen).to(dtype)  # [T, Hkv, D]
    v = torch.randn(tokens, hkv, d, generator=gen).to(dtype)  # [T, Hkv, D]
    return q, k, v


# (prompt lengths, Hq, Hkv, D, dtype): lengths around the 16-key blocks and 32-row tiles, one
# token, an empty sequence; GQA, MHA, MQA; every compiled head size class
CASES = {
    "smollm2-shape-bf16": ([5, 17, 40, 1, 100], 9, 3, 64, torch.bfloat16),
    "mha-fp32-d16": ([31, 32, 33], 4, 4, 16, torch.float32),
    "gqa-fp16-d32": ([70, 16], 8, 2, 32, torch.float16),
    "mqa-fp32-d128": ([300], 8, 1, 128, torch.float32),
    "d48-and-an-empty-prompt": ([45, 0, 12], 6, 2, 48, torch.float32),
    "qwen2-shape-d64-g7": ([65], 14, 2, 64, torch.float32),
    "d80-d96-class": ([20, 3], 2, 1, 80, torch.float32),
    "llama-8b-class-bf16-d128": ([50, 33], 8, 2, 128, torch.bfloat16),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_matches_causal_attention_of_each_prompt(
        case: tuple[list[int], int, int, int, torch.dtype]) -> None:
    lens, hq, hkv, d, dtype = case
    q, k, v = random_qkv(lens, hq, hkv, d, dtype)
    out = cpu_ops.prefill_attention_cpu(q, k, v, cu_seqlens(lens), d ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    ref = reference(q, k, v, lens, d ** -0.5)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)
    else:
        # float32 inside and one rounding of the output (an ulp of it); with AVX512-BF16 the
        # probabilities are also rounded to bf16 for the weighted sum, as torch's SDPA rounds
        # them, which moves an output by at most 2^-9 of the largest |v| it averages
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        rounded_probs = 2.0 ** -9 * float(v.abs().max()) if dtype == torch.bfloat16 else 1e-3
        assert ((out.double() - ref).abs() <= ulp * ref.abs() + rounded_probs).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_agrees_with_the_torch_path(dtype: torch.dtype) -> None:
    """What the engine ran before the kernel (`prefill_attention`: causal SDPA tiles)."""
    lens = [512, 512]
    q, k, v = random_qkv(lens, 9, 3, 64, dtype, seed=1)
    got = cpu_ops.prefill_attention_cpu(q, k, v, cu_seqlens(lens), 0.125)
    expected = prefill_attention(q, k, v, lens, 0.125)
    tol = 2e-6 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


def test_reads_strided_views_of_a_fused_projection() -> None:
    """q, k, v sliced out of one QKV projection (token rows strided) are read in place."""
    lens = [20, 37]
    q, k, v = random_qkv(lens, 4, 2, 32, torch.float32, seed=2)
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], 1)  # [T, (Hq + 2 Hkv) * D]
    views = (qkv[:, :128].view(-1, 4, 32), qkv[:, 128:192].view(-1, 2, 32),
             qkv[:, 192:].view(-1, 2, 32))
    assert not views[0].is_contiguous()
    torch.testing.assert_close(
        cpu_ops.prefill_attention_cpu(*views, cu_seqlens(lens), 0.2),
        cpu_ops.prefill_attention_cpu(q, k, v, cu_seqlens(lens), 0.2))


def test_prefill_supported_head_sizes() -> None:
    assert [d for d in range(1, 200) if cpu_ops.prefill_supported(d)] == list(range(16, 129, 16))


@pytest.mark.parametrize("bad,message", [
    ("head size", "head_dim 24 is not a multiple of 16 up to 128"),
    ("dtypes", "q, k and v must have one dtype"),
    ("heads", "Hq must be a multiple of Hkv"),
    ("int64 offsets", r"cu_seqlens must be int32 \[S \+ 1\]"),
    ("short offsets", "cu_seqlens must run from 0 to T = 12"),
    ("decreasing", r"cu_seqlens must not decrease \(at 1\)"),
])
def test_bad_arguments_are_named(bad: str, message: str) -> None:
    q, k, v = random_qkv([5, 7], 4, 2, 16, torch.float32)
    offsets = cu_seqlens([5, 7])
    if bad == "head size":
        q, k, v = random_qkv([5, 7], 4, 2, 24, torch.float32)
    elif bad == "dtypes":
        k = k.bfloat16()
    elif bad == "heads":
        q = torch.randn(12, 3, 16)
    elif bad == "int64 offsets":
        offsets = offsets.long()
    elif bad == "short offsets":
        offsets = torch.tensor([0, 5, 11], dtype=torch.int32)
    else:
        offsets = torch.tensor([0, 13, 12], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=message):
        cpu_ops.prefill_attention_cpu(q, k, v, offsets, 0.25)


# (q_lens, seq_lens, Hq, Hkv, D, block_size, dtype): prompts over cached prefixes, a whole
# prompt, decodes (q_len 1) mixed with prompts, a chunk ending mid-block
PAGED_CASES = {
    "prefix-hits-bf16": ([40, 17], [72, 17], 9, 3, 64, 16, torch.bfloat16),
    "mixed-decodes-fp32": ([1, 33, 1, 5], [20, 50, 1, 5], 4, 2, 32, 4, torch.float32),
    "chunk-mid-block-fp16": ([24], [61], 8, 8, 16, 16, torch.float16),
    "mqa-long-prefix-fp32": ([70], [300], 8, 1, 128, 16, torch.float32),
}


@pytest.mark.parametrize("case", PAGED_CASES.values(), ids=list(PAGED_CASES))
def test_paged_matches_attention_token_by_token(
        case: tuple[list[int], list[int], int, int, int, int, torch.dtype]) -> None:
    q_lens, seq_lens, hq, hkv, d, bs, dtype = case
    b = make_batch(q_lens, seq_lens, hq, hkv, d, bs, dtype)
    out = cpu_ops.paged_prefill_attention_cpu(b.q, b.kv_layer, b.block_tables,
                                              b.query_start_loc, b.seq_lens, b.scale)
    assert_close(out, b)


def test_paged_reads_a_layer_of_a_layer_group_cache() -> None:
    """A layer whose blocks are other layers apart (NaN in between) is read through strides."""
    b = make_batch([9, 30], [25, 30], 8, 4, 64, 4, torch.float32)
    expected = cpu_ops.paged_prefill_attention_cpu(b.q, b.kv_layer, b.block_tables,
                                                   b.query_start_loc, b.seq_lens, b.scale)
    grouped = _in_layer_group(b.kv_layer, 3, 1)
    assert not grouped.is_contiguous()
    torch.testing.assert_close(cpu_ops.paged_prefill_attention_cpu(
        b.q, grouped, b.block_tables, b.query_start_loc, b.seq_lens, b.scale), expected)


@pytest.mark.parametrize("bad,message", [
    ("query longer than its sequence", r"seq_lens\[0\] = 5 outside 9\.\.20"),
    ("block id out of range", r"block_tables\[1, 0\] = 999 outside 0\.\."),
    ("dtype", "q must have the cache's dtype"),
    ("head size", "head_dim 24 is not a multiple of 16 up to 128"),
])
def test_paged_bad_arguments_are_named(bad: str, message: str) -> None:
    d = 24 if bad == "head size" else 16
    b = make_batch([9, 4], [12, 9], 4, 2, d, 4, torch.float32)
    lens, tables, q = b.seq_lens, b.block_tables, b.q
    if bad == "query longer than its sequence":
        lens = torch.tensor([5, 9], dtype=torch.int32)
    elif bad == "block id out of range":
        tables = tables.clone()
        tables[1, 0] = 999
    elif bad == "dtype":
        q = q.bfloat16()
    with pytest.raises(RuntimeError, match=message):
        cpu_ops.paged_prefill_attention_cpu(q, b.kv_layer, tables, b.query_start_loc, lens,
                                            b.scale)
