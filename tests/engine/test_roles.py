"""Prefill and decode roles of the engine, wired together in one process.

The "transfer" here is a tensor copy of each layer's blocks made from the prefill engine's
layer callback; the real UCX transfer is tested in tests/kv_transfer and end to end.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_cache import kv_layer
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledBatch
from tests.engine.hf_reference import hf_greedy

BS = 4


def engines(model_dir: Path) -> tuple[Engine, Engine]:
    config = EngineConfig(num_blocks=64, block_size=BS, max_num_batched_tokens=16)
    return Engine(model_dir, config), Engine(model_dir, config)


def prefill_remotely(prefill: Engine, decode: Engine, rid: str, prompt: list[int],
                     sampling: SamplingParams) -> tuple[int, int, int]:
    """Reserves on D, prefills on P with every layer's blocks copied into D's reservation,
    releases P; returns (the first token, blocks copied, D's cached prompt tokens). The
    request is then ready for `decode.admit_prefilled`."""
    reservation = decode.reserve(rid, prompt, sampling)
    assert reservation is not None
    d_blocks, d_cached_blocks = reservation.block_ids, reservation.num_cached_tokens // BS
    prefill.add_prefill_request(rid, prompt, sampling)
    copied: set[int] = set()

    def push(layer: int, batch: ScheduledBatch) -> None:
        for request, num_new in zip(batch.requests, batch.num_new_tokens, strict=True):
            first = max(request.num_computed_tokens // BS, d_cached_blocks)
            last = -(-(request.num_computed_tokens + num_new) // BS)
            p_blocks = prefill.block_manager.block_ids(request.request_id)
            for i in range(first, last):
                kv_layer(decode.runner.kv_cache, layer)[d_blocks[i]] = kv_layer(
                    prefill.runner.kv_cache, layer)[p_blocks[i]]
                copied.add(i)

    first_token = None
    while first_token is None:
        for out in prefill.step(push):
            first_token = out.new_token_ids[0]
    # P's own prefix hits were never computed this time: copy those blocks too
    p_blocks = prefill.block_manager.block_ids(rid)
    for i in range(d_cached_blocks, len(d_blocks)):
        if i not in copied:
            # [G, N, g, ...]: block i of every layer group
            decode.runner.kv_cache[:, d_blocks[i]] = prefill.runner.kv_cache[:, p_blocks[i]]
            copied.add(i)
    assert prefill.release(rid)
    return first_token, len(copied), reservation.num_cached_tokens


def disaggregated(prefill: Engine, decode: Engine, rid: str, prompt: list[int],
                  new_tokens: int) -> tuple[list[int], int, int]:
    """Runs one request P → D; returns (tokens, blocks copied, D's cached prompt tokens)."""
    sampling = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    first_token, copied, cached = prefill_remotely(prefill, decode, rid, prompt, sampling)
    tokens = decode.admit_prefilled(rid, first_token).new_token_ids
    while decode.has_unfinished():
        tokens += [t for o in decode.step() for t in o.new_token_ids]
    return tokens, copied, cached


def test_prefill_then_decode_matches_transformers(tiny_llama: Path) -> None:
    prefill, decode = engines(tiny_llama)
    free_p, free_d = prefill.block_manager.num_free_blocks, decode.block_manager.num_free_blocks
    prompt = torch.randint(3, 500, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    tokens, copied, cached = disaggregated(prefill, decode, "a", prompt, 10)
    assert tokens == hf_greedy(tiny_llama, prompt, 10)
    assert copied == 10 and cached == 0
    # the same prefix again: D already holds 9 full blocks, so only the tail moves
    second = prompt[:36] + [11, 12, 13]
    tokens, copied, cached = disaggregated(prefill, decode, "b", second, 10)
    assert tokens == hf_greedy(tiny_llama, second, 10)
    assert cached == 36 and copied == 1
    assert prefill.stats.prefill_tokens_computed == 37 + 3
    assert prefill.block_manager.num_free_blocks == free_p
    assert decode.block_manager.num_free_blocks == free_d


def test_release_of_a_reservation_frees_it(tiny_llama: Path) -> None:
    _prefill, decode = engines(tiny_llama)
    free = decode.block_manager.num_free_blocks
    assert decode.reserve("r", list(range(3, 40))) is not None
    assert decode.block_manager.num_free_blocks == free - 10
    assert decode.release("r") and not decode.release("r")
    assert decode.block_manager.num_free_blocks == free
    assert decode.num_requests() == 0


def test_reserve_returns_none_when_full(tiny_llama: Path) -> None:
    _prefill, decode = engines(tiny_llama)
    assert decode.reserve("big", list(range(3, 3 + 60 * BS))) is not None
    assert decode.reserve("more", list(range(3, 3 + 10 * BS))) is None
    assert decode.num_requests() == 1
    decode.release("big")
    assert decode.block_manager.num_free_blocks == 64


def test_queued_prompt_blocks_count_prefill_work_not_yet_computed(tiny_llama: Path) -> None:
    """What a prefill worker reports as `queued_prompt_blocks`: the blocks (a partial last one
    counted) of every accepted prompt's part not computed yet, chunk by chunk."""
    prefill, decode = engines(tiny_llama)  # 16-token chunks, 4-token blocks
    sampling = SamplingParams(max_tokens=1, ignore_eos=True)
    assert prefill.num_queued_prompt_blocks() == 0
    prefill.add_prefill_request("a", list(range(10, 40)), sampling)  # 30 tokens: 8 blocks
    prefill.add_prefill_request("b", list(range(50, 55)), sampling)  # 5 tokens: 2 blocks
    assert prefill.num_queued_prompt_blocks() == 10
    seen = []
    while prefill.has_unfinished():
        prefill.step()
        seen.append(prefill.num_queued_prompt_blocks())
    # a: 16 tokens (14 left: 4 blocks), then 14 with b's first 2 (b: 3 left, 1 block), then b
    assert seen == [4 + 2, 1, 0]
    prefill.release("a")
    prefill.release("b")
    assert prefill.num_queued_prompt_blocks() == 0
    # the decode role computes no prompt: its reservations are not prefill work
    assert decode.reserve("r", list(range(10, 40)), sampling) is not None
    assert decode.num_queued_prompt_blocks() == 0
