"""Preemption by recompute in the decode role: a decode engine whose KV cache cannot hold every
running request's growth preempts the newest, recomputes it later, and every request's tokens
stay those of an undisturbed run (greedy: transformers; seeded: a roomy engine). No deadlock:
a request that can never fit is refused naming the field, a stalled engine says so, and no
reservation overtakes a preempted request."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidInput
from engine.sampling import SamplingParams
from tests.engine.hf_reference import hf_greedy
from tests.engine.test_roles import BS, prefill_remotely

NEW = 24


def prompts() -> list[list[int]]:
    return [torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(70 + n)).tolist()
            for n in (14, 9, 18, 11)]


def engine(model_dir: Path, num_blocks: int) -> Engine:
    return Engine(model_dir, EngineConfig(num_blocks=num_blocks, block_size=BS,
                                          max_num_batched_tokens=64))


def decode_all(model_dir: Path, decode_blocks: int,
               sampling: SamplingParams) -> tuple[dict[str, list[int]], Engine]:
    """Prefills every prompt on a roomy P into D's reservations, admits them all, then decodes
    them together on D; returns each request's tokens and D."""
    prefill, decode = engine(model_dir, 128), engine(model_dir, decode_blocks)
    tokens: dict[str, list[int]] = {}
    firsts = {}
    for i, prompt in enumerate(prompts()):
        firsts[f"r{i}"], _copied, _cached = prefill_remotely(prefill, decode, f"r{i}", prompt,
                                                             sampling)
    for rid, first in firsts.items():
        tokens[rid] = decode.admit_prefilled(rid, first).new_token_ids
    while decode.has_unfinished():
        for out in decode.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens, decode


def test_decode_role_preempts_and_recomputes_with_exact_greedy_tokens(tiny_llama: Path) -> None:
    # 15 prompt blocks reserved in 20; growing by 6 blocks each cannot fit
    tokens, decode = decode_all(tiny_llama, 20, SamplingParams(max_tokens=NEW, ignore_eos=True))
    assert decode.stats.preemptions > 0
    for i, prompt in enumerate(prompts()):
        assert tokens[f"r{i}"] == hf_greedy(tiny_llama, prompt, NEW), f"prompt {i}"
    assert decode.block_manager.num_free_blocks == 20
    assert decode.num_requests() == 0


def test_decode_role_preemption_keeps_a_seeded_stream(tiny_llama: Path) -> None:
    sampling = SamplingParams(max_tokens=NEW, temperature=0.9, seed=7, ignore_eos=True)
    roomy, _ = decode_all(tiny_llama, 128, sampling)
    tight, decode = decode_all(tiny_llama, 20, sampling)
    assert decode.stats.preemptions > 0
    assert tight == roomy


def test_no_reservation_overtakes_a_preempted_request(tiny_llama: Path) -> None:
    sampling = SamplingParams(max_tokens=NEW, ignore_eos=True)
    prefill, decode = engine(tiny_llama, 128), engine(tiny_llama, 20)
    # 14 + 5 of 20 blocks; "big" arrived first, so the newer "small" is preempted when both grow
    big, _, _ = prefill_remotely(prefill, decode, "big", list(range(3, 3 + 14 * BS)),
                                 SamplingParams(max_tokens=8, ignore_eos=True))
    small, _, _ = prefill_remotely(prefill, decode, "small", prompts()[2], sampling)
    decode.admit_prefilled("big", big)
    decode.admit_prefilled("small", small)
    tokens = [small]
    while not decode.scheduler.has_preempted_waiting:
        tokens += [t for o in decode.step() if o.request_id == "small" for t in o.new_token_ids]
    assert decode.stats.preemptions == 1
    # even a one-block prompt must wait: the preempted request goes first
    assert decode.reserve("late", [5, 6, 7], sampling) is None
    while decode.has_unfinished():
        tokens += [t for o in decode.step() if o.request_id == "small" for t in o.new_token_ids]
    assert tokens == hf_greedy(tiny_llama, prompts()[2], NEW)
    assert decode.reserve("late", [5, 6, 7], sampling) is not None


def test_blocks_held_by_a_reservation_stall_the_engine_until_released(tiny_llama: Path) -> None:
    sampling = SamplingParams(max_tokens=NEW, ignore_eos=True)
    decode = engine(tiny_llama, 20)
    # a reservation (its KV never comes) holds 14 of 20 blocks; the running request needs 11
    assert decode.reserve("held", list(range(3, 3 + 14 * BS)), sampling) is not None
    decode.add_request("r", prompts()[2], sampling)
    out = []
    while not decode.stalled:
        out += decode.step()
    assert decode.has_unfinished() and decode.stats.preemptions == 1
    assert decode.step() == [] and decode.stalled  # nothing can run: no spinning work
    decode.release("held")
    while decode.has_unfinished():
        out += decode.step()
    assert not decode.stalled
    assert [t for o in out for t in o.new_token_ids] == hf_greedy(tiny_llama, prompts()[2], NEW)
    assert decode.block_manager.num_free_blocks == 20


def test_a_request_that_can_never_fit_is_refused_naming_the_field(tiny_llama: Path) -> None:
    decode = engine(tiny_llama, 20)
    with pytest.raises(InvalidInput, match="max_tokens: .* need more KV blocks"):
        decode.reserve("big", prompts()[0], SamplingParams(max_tokens=70, ignore_eos=True))
    with pytest.raises(InvalidInput, match="max_tokens"):
        decode.add_request("big", prompts()[0], SamplingParams(max_tokens=70, ignore_eos=True))
    assert decode.num_requests() == 0 and decode.block_manager.num_free_blocks == 20
