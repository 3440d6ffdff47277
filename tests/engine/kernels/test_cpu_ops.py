"""The C++ CPU kernels (`engine.kernels.cpu_ops`), built here with the machine's compiler as a
worker builds them. Decode attention against float64 attention token by token
(`naive_attention`) on paged caches with shuffled blocks, garbage in every slot a sequence
does not own, and padded block tables; RMSNorm against the torch path (`engine.model.norm`),
which computes HF's bits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.kernels import cpu_ops
from engine.model.norm import rms_norm
from tests.engine.kernels.test_cpu_paths import _in_layer_group
from tests.engine.kernels.test_paged_attention import assert_close, make_batch, naive_attention


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    """The kernels must build on a machine with a C++ compiler: a failure here is a failure."""
    assert cpu_ops.available(), "the C++ CPU kernels did not build (see the log)"


def run(batch: object) -> torch.Tensor:
    b = batch
    return cpu_ops.paged_decode_cpu(b.q, b.kv_layer, b.block_tables,  # type: ignore[attr-defined]
                                       b.seq_lens, b.scale)  # type: ignore[attr-defined]


# (seq_lens, Hq, Hkv, D, block_size, dtype): D 64 and 128 take the compiled-in head sizes,
# others the general loop; few sequences split the work by head, many by sequence (and each
# thread prefetches its next sequence's blocks: longer, shorter or as long as its own)
CASES = {
    "smollm2-shape-bf16": ([5, 17, 9, 135, 1, 64], 9, 3, 64, 16, torch.bfloat16),
    "mha-fp32": ([5, 17, 9], 4, 4, 16, 4, torch.float32),
    "gqa-fp16": ([33, 1, 16, 20], 8, 2, 32, 16, torch.float16),
    "mqa-single-long": ([300], 8, 1, 128, 16, torch.float32),
    "many-seqs-bf16": ([3 + 7 * i for i in range(24)], 8, 2, 64, 4, torch.bfloat16),
    "block-multiple": ([16, 32, 48], 4, 2, 128, 16, torch.float32),
    "many-seqs-falling-fp32": ([170 - 7 * i for i in range(24)] + [16, 16, 1], 9, 3, 64, 16,
                               torch.float32),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_matches_attention_token_by_token(
        case: tuple[list[int], int, int, int, int, torch.dtype]) -> None:
    seq_lens, hq, hkv, d, bs, dtype = case
    batch = make_batch([1] * len(seq_lens), seq_lens, hq, hkv, d, bs, dtype)
    assert_close(run(batch), batch)


def test_float32_queries_over_a_bfloat16_cache() -> None:
    """The bf16-on-AVX2 mode: the cache holds bf16, the model computes in float32."""
    batch = make_batch([1] * 4, [7, 40, 1, 22], 9, 3, 64, 16, torch.bfloat16)
    batch.q = batch.q.float()
    out = run(batch)
    assert out.dtype == torch.float32
    ref = naive_attention(batch.q, batch.kv_layer, batch.block_tables, batch.query_start_loc,
                          batch.seq_lens, batch.scale)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_reads_a_layer_of_a_layer_group_cache() -> None:
    """A layer whose blocks are other layers apart (NaN in between) is read through strides."""
    batch = make_batch([1] * 3, [5, 17, 9], 8, 4, 64, 4, torch.float32)
    expected = run(batch)
    batch.kv_layer = _in_layer_group(batch.kv_layer, 3, 1)
    assert not batch.kv_layer.is_contiguous()
    torch.testing.assert_close(run(batch), expected)


def test_queries_as_a_strided_view_of_the_projection() -> None:
    """q sliced out of a fused QKV projection (rows strided, heads contiguous) is read as is."""
    batch = make_batch([1] * 3, [5, 17, 9], 8, 4, 64, 4, torch.float32)
    qkv = torch.cat([batch.q.flatten(1), torch.zeros(3, 2 * 4 * 64)], 1)  # [S, (Hq+2Hkv)*D]
    strided = qkv[:, :8 * 64].view(3, 8, 64)  # [S, Hq, D]
    assert not strided.is_contiguous()
    torch.testing.assert_close(run(batch), cpu_ops.paged_decode_cpu(
        strided, batch.kv_layer, batch.block_tables, batch.seq_lens, batch.scale))


@pytest.mark.parametrize("bad,message", [
    ("int64 tables", "block_tables and seq_lens must be int32"),
    ("too long", r"seq_lens\[1\] = 1000 outside 0\.\.20"),
    ("bf16 q over fp32", "q must have the cache's dtype or float32"),
    ("heads", "Hq must be a multiple of Hkv"),
])
def test_bad_arguments_are_named(bad: str, message: str) -> None:
    batch = make_batch([1] * 2, [5, 9], 8, 4, 16, 4, torch.float32)
    q, kv, tables, lens = batch.q, batch.kv_layer, batch.block_tables, batch.seq_lens
    if bad == "int64 tables":
        tables = tables.long()
    elif bad == "too long":
        lens = torch.tensor([5, 1000], dtype=torch.int32)
    elif bad == "bf16 q over fp32":
        q = q.bfloat16()
    else:
        q = torch.randn(2, 6, 16)
    with pytest.raises(RuntimeError, match=message):
        cpu_ops.paged_decode_cpu(q, kv, tables, lens, batch.scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 7, 4096])
def test_rms_norm_matches_the_torch_path(dtype: torch.dtype, rows: int) -> None:
    """bf16/fp16: the same rounding as HF (normalized, rounded, then scaled and rounded), so
    the result equals the torch path except where the row's sum, added in another order,
    moves a value across a rounding boundary (rarely; then by up to two units in the last
    place, the second rounding after the weight's product included)."""
    gen = torch.Generator().manual_seed(rows)
    x = (3 * torch.randn(rows, 576, generator=gen)).to(dtype)  # [T, H]
    weight = (1 + 0.1 * torch.randn(576, generator=gen)).to(dtype)  # [H]
    got, expected = cpu_ops.rms_norm_cpu(x, weight, 1e-5), rms_norm(x, weight, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)
    else:
        assert (got == expected).float().mean() > 0.999
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        assert ((got.float() - expected.float()).abs() <= 2 * ulp * expected.float().abs()).all()


def test_rms_norm_reads_strided_rows() -> None:
    """Rows of a wider tensor (a view, H contiguous) are read in place."""
    wide = torch.randn(5, 1000)
    x = wide[:, :576]  # [T, H], rows 1000 apart
    weight = torch.rand(576)
    torch.testing.assert_close(cpu_ops.rms_norm_cpu(x, weight, 1e-6),
                               rms_norm(x.contiguous(), weight, 1e-6), atol=2e-6, rtol=2e-6)


def test_rms_norm_bad_arguments_are_named() -> None:
    with pytest.raises(RuntimeError, match="weight must be \\[H\\]"):
        cpu_ops.rms_norm_cpu(torch.randn(3, 8), torch.ones(9), 1e-6)
    with pytest.raises(RuntimeError, match="weight dtype BFloat16 differs from x's Float"):
        cpu_ops.rms_norm_cpu(torch.randn(3, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6)


def test_the_build_is_named_by_its_sources(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkouts with the same kernels share one build; a changed kernel gets its own."""
    copies = []
    for source in cpu_ops.SOURCES:
        copy = tmp_path / source.name
        copy.write_bytes(source.read_bytes())
        copies.append(copy)
    name = cpu_ops.extension_name()
    monkeypatch.setattr(cpu_ops, "SOURCES", tuple(copies))
    assert cpu_ops.extension_name() == name  # another path, the same content
    copies[0].write_bytes(copies[0].read_bytes() + b"\n// changed\n")
    assert cpu_ops.extension_name() != name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_argmax_equals_torch_argmax(dtype: torch.dtype) -> None:
    """Random logits at a 152k vocab, rows with ties (the first index wins, as in torch), a
    strided view, one-token rows."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 151_936, generator=gen).to(dtype)  # [R, V]
    logits[1] = 0.0  # all equal: index 0
    logits[2, 5] = logits[2, 90_000] = 100.0  # a tie: the first
    logits[3, -1] = 100.0  # the last index
    assert torch.equal(cpu_ops.argmax_cpu(logits), logits.argmax(-1))
    wide = torch.randn(4, 300, generator=gen).to(dtype)
    assert torch.equal(cpu_ops.argmax_cpu(wide[:, :257]), wide[:, :257].argmax(-1))
    assert torch.equal(cpu_ops.argmax_cpu(torch.ones(3, 1, dtype=dtype)), torch.zeros(3).long())


def test_argmax_bad_arguments_are_named() -> None:
    with pytest.raises(RuntimeError, match=r"logits must be \[R, V\], V > 0 and contiguous"):
        cpu_ops.argmax_cpu(torch.randn(3, 8).t())
    with pytest.raises(RuntimeError, match="logits dtype Double is not float32"):
        cpu_ops.argmax_cpu(torch.randn(3, 8, dtype=torch.float64))
