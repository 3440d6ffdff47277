"""The Mooncake trace: parsing, prompts whose equal hash ids are equal blocks, arrival times,
and the shipped sample trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.cli import main
from loadtest.tokens import TokenSpace
from loadtest.trace import TraceEntry, read_trace, synthesize_trace, trace_requests, write_trace

SPACE = TokenSpace(50_000)
SAMPLE = Path(__file__).parents[2] / "loadtest" / "traces" / "sample.jsonl"
LINES = """\
{"timestamp": 1000, "input_length": 40, "output_length": 5, "hash_ids": [7, 8, 9]}
{"timestamp": 1500, "input_length": 35, "output_length": 6, "hash_ids": [7, 8, 11]}

{"timestamp": 3000, "input_length": 70, "output_length": 7, "hash_ids": [7, 12]}
"""


def test_reads_the_mooncake_format(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(LINES)
    entries = read_trace(path)
    assert entries == [TraceEntry(1000, 40, 5, (7, 8, 9)), TraceEntry(1500, 35, 6, (7, 8, 11)),
                       TraceEntry(3000, 70, 7, (7, 12))]
    write_trace(tmp_path / "again.jsonl", entries)
    assert read_trace(tmp_path / "again.jsonl") == entries


@pytest.mark.parametrize("line", ['{"timestamp": 1, "input_length": 4}',
                                  '{"timestamp": 1, "input_length": 0, "output_length": 3}',
                                  "not json"])
def test_a_bad_line_is_named(tmp_path: Path, line: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(LINES + line + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:5"):
        read_trace(path)


def test_equal_hash_ids_give_equal_blocks(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(LINES)
    a, b, c = trace_requests(read_trace(path), SPACE, seed=0, trace_block_size=16,
                             block_size=16)
    assert (a.input_len, b.input_len, c.input_len) == (40, 35, 70)
    assert a.token_ids[:32] == b.token_ids[:32]  # hash ids 7, 8
    assert a.token_ids[32:] != b.token_ids[32:35]  # 9 vs 11
    assert c.token_ids[:16] == a.token_ids[:16]  # 7
    assert c.token_ids[16:32] != a.token_ids[16:32]  # 12 vs 8
    assert len(set(c.token_ids[32:])) > 1  # past its hash ids: tokens of its own
    same = trace_requests(read_trace(path), SPACE, seed=0, trace_block_size=16, block_size=16)
    assert same == [a, b, c]
    other = trace_requests(read_trace(path), SPACE, seed=1, trace_block_size=16, block_size=16)
    assert other[0].token_ids != a.token_ids


def test_arrival_times_from_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(LINES)
    requests = trace_requests(read_trace(path), SPACE, 0, 16, 16)
    assert [r.arrival_s for r in requests] == [0.0, 0.5, 2.0]
    assert [r.max_tokens for r in requests] == [5, 6, 7]


def test_trace_block_size_must_cover_whole_cluster_blocks() -> None:
    with pytest.raises(ValueError, match="trace_block_size"):
        trace_requests([], SPACE, 0, trace_block_size=24, block_size=16)


def test_synthesized_trace_shares_prefixes() -> None:
    entries = synthesize_trace(200, seed=0, rate=5.0, prefixes=3, prefix_blocks=2,
                               max_unique_blocks=2, output_len=(4, 8), trace_block_size=32)
    assert {e.hash_ids[0] for e in entries} <= {0, 2, 4}
    for e in entries:
        assert (len(e.hash_ids) - 1) * 32 < e.input_length <= len(e.hash_ids) * 32
        assert 4 <= e.output_length <= 8
    times = [e.timestamp_ms for e in entries]
    assert times == sorted(times)
    assert len(entries) / (times[-1] / 1000) == pytest.approx(5.0, rel=0.2)


def test_the_sample_trace_is_what_make_trace_writes(tmp_path: Path) -> None:
    assert main(["make-trace", str(tmp_path / "sample.jsonl")]) == 0
    assert (tmp_path / "sample.jsonl").read_text() == SAMPLE.read_text()
    entries = read_trace(SAMPLE)
    assert len(entries) == 60
    assert max(e.input_length + e.output_length for e in entries) < 2048  # the tiny model
