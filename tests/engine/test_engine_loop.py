"""The engine thread: commands between steps, outputs to asyncio queues, death is loud."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.engine import Engine, RequestOutput
from engine.engine_loop import EngineDead, EngineLoop
from engine.sampling import SamplingParams
from tests.engine.hf_reference import hf_greedy


async def collect(q: asyncio.Queue[RequestOutput | BaseException]) -> list[int]:
    tokens: list[int] = []
    while True:
        item = await asyncio.wait_for(q.get(), timeout=60)
        if isinstance(item, BaseException):
            raise item
        tokens += item.new_token_ids
        if item.finished:
            return tokens


async def test_concurrent_requests_stream_through_the_loop(tiny_llama: Path) -> None:
    loop = EngineLoop(Engine(tiny_llama, EngineConfig(num_blocks=64, block_size=4)))
    loop.start()
    try:
        prompts = {"a": [5, 6, 7, 8, 9, 10], "b": list(range(20, 45))}
        queues = {rid: loop.subscribe(rid) for rid in prompts}
        sampling = SamplingParams(max_tokens=8, ignore_eos=True)
        for rid, prompt in prompts.items():
            await loop.call(partial(Engine.add_request, request_id=rid,
                                    prompt_token_ids=prompt, sampling=sampling))
        with pytest.raises(ValueError, match="^prompt_token_ids"):
            await loop.call(lambda e: e.add_request("bad", [], sampling))
        results = await asyncio.gather(*(collect(q) for q in queues.values()))
        for tokens, prompt in zip(results, prompts.values(), strict=True):
            assert tokens == hf_greedy(tiny_llama, prompt, 8)
        assert await loop.call(lambda e: e.block_manager.num_free_blocks) == 64
    finally:
        loop.stop()


async def test_a_failing_step_fails_every_request_and_later_calls(tiny_llama: Path) -> None:
    def explode(layer: int, batch: object) -> None:
        raise RuntimeError("device lost")

    loop = EngineLoop(Engine(tiny_llama, EngineConfig(num_blocks=64, block_size=4)),
                      on_layer_done=explode)
    loop.start()
    try:
        q = loop.subscribe("a")
        await loop.call(lambda e: e.add_request("a", [5, 6, 7], SamplingParams()))
        with pytest.raises(EngineDead, match="device lost"):
            await collect(q)
        assert isinstance(loop.fatal, RuntimeError)
        with pytest.raises(EngineDead):
            await loop.call(lambda e: e.num_requests())
    finally:
        loop.stop()
