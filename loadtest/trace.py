"""Replay of a trace in the Mooncake format, and the synthesis of one.

A Mooncake trace is JSONL, one request a line: `timestamp` (ms from the trace's start),
`input_length` and `output_length` (tokens) and `hash_ids`: one id per `trace_block_size`
tokens of the prompt (512 in Mooncake's published traces), equal ids meaning equal content.
Prompts are rebuilt so that equal hash ids give equal token blocks: block `h` is drawn from a
generator seeded with (seed, h), whatever request it is in. `trace_block_size` must be a multiple
of the cluster's block size, so that shared hash blocks are shared KV blocks too. Tokens past
`len(hash_ids) × trace_block_size` (a trace may round) are unique to their request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.request import Request
from loadtest.tokens import TokenSpace

MOONCAKE_BLOCK_SIZE = 512  # tokens per hash id in Mooncake's published traces


@dataclass(frozen=True)
class TraceEntry:
    """One line of a Mooncake trace."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps({"timestamp": self.timestamp_ms, "input_length": self.input_length,
                           "output_length": self.output_length, "hash_ids": list(self.hash_ids)})


def read_trace(path: str | Path) -> list[TraceEntry]:
    """Parses a Mooncake JSONL trace; blank lines are skipped, a bad line names its number."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            entry = TraceEntry(float(raw["timestamp"]), int(raw["input_length"]),
                               int(raw["output_length"]),
                               tuple(int(h) for h in raw.get("hash_ids", ())))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"trace: {path}:{number}: {e!r}") from None
        if entry.input_length < 1 or entry.output_length < 1:
            raise ValueError(f"trace: {path}:{number}: input_length and output_length must "
                             "be >= 1")
        entries.append(entry)
    return entries


def write_trace(path: str | Path, entries: list[TraceEntry]) -> None:
    Path(path).write_text("".join(e.to_json() + "\n" for e in entries))


def trace_requests(entries: list[TraceEntry], space: TokenSpace, seed: int,
                   trace_block_size: int = MOONCAKE_BLOCK_SIZE,
                   block_size: int = 16) -> list[Request]:
    """The trace's requests; `arrival_s` is the timestamp from the trace's first, in s."""
    if trace_block_size % block_size:
        raise ValueError(f"trace_block_size: must be a multiple of the cluster's block size "
                         f"{block_size}, got {trace_block_size}")
    blocks: dict[int, tuple[int, ...]] = {}

    def block(h: int) -> tuple[int, ...]:
        if h not in blocks:
            blocks[h] = space.draw(np.random.default_rng([seed, h]), trace_block_size)
        return blocks[h]

    start = min((e.timestamp_ms for e in entries), default=0.0)
    tail_rng = np.random.default_rng([seed, 1 << 62])  # tokens no hash id covers
    requests = []
    for index, entry in enumerate(entries):
        prompt: tuple[int, ...] = sum((block(h) for h in entry.hash_ids), ())
        if len(prompt) < entry.input_length:
            prompt += space.draw(tail_rng, entry.input_length - len(prompt))
        requests.append(Request(index, prompt[:entry.input_length], entry.output_length,
                                group=f"h{entry.hash_ids[0]}" if entry.hash_ids else "",
                                arrival_s=(entry.timestamp_ms - start) / 1000))
    return requests


def synthesize_trace(n: int, seed: int, rate: float, prefixes: int, prefix_blocks: int,
                     max_unique_blocks: int, output_len: tuple[int, int],
                     trace_block_size: int = MOONCAKE_BLOCK_SIZE) -> list[TraceEntry]:
    """A Mooncake-format trace: Poisson arrivals at `rate`/s; each request one of `prefixes`
    shared prefixes (its first 1..`prefix_blocks` blocks) then 1..`max_unique_blocks` blocks of
    its own, the last one partial. Used to make loadtest/traces/sample.jsonl."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, size=n)) * 1000
    next_id = prefixes * prefix_blocks
    entries = []
    for i in range(n):
        p = int(rng.integers(prefixes))
        shared = list(range(p * prefix_blocks, p * prefix_blocks
                            + int(rng.integers(1, prefix_blocks, endpoint=True))))
        unique = int(rng.integers(1, max_unique_blocks, endpoint=True))
        hash_ids = (*shared, *range(next_id, next_id + unique))
        next_id += unique
        partial = int(rng.integers(1, trace_block_size, endpoint=True))
        entries.append(TraceEntry(
            round(float(times[i]), 1), (len(hash_ids) - 1) * trace_block_size + partial,
            int(rng.integers(output_len[0], output_len[1], endpoint=True)), hash_ids))
    return entries
