"""The prefill worker's push: one write per completed layer group of each step, the last one
marked `last`, with a real engine and stand-in agents that copy what each write names between
two caches or report it done when told (the real transfers are tested in tests/kv_transfer
and tests/e2e); and its first token not held by another request's step."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop
from engine.kv_cache import allocate_kv_cache, kv_layer
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.tiny_model import make_tiny_model
from kv_transfer.base import EventKind, TransferConfig, TransferEvent
from prefill_worker.worker import PrefillWorker, PushPlan

BS = 4


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "llama4", arch="llama", seed=4,
                           num_layers=4)


class CopyingAgent:
    """Records each write and copies its blocks from `source` into `target` right away."""

    def __init__(self, source: torch.Tensor, target: torch.Tensor) -> None:
        self.source, self.target = source, target  # [G, N, g, 2, bs, Hkv, D] each
        self.writes: list[tuple[range, list[int], bool]] = []

    def write(self, peer: str, request_id: str, src_blocks: Sequence[int],
              dst_blocks: Sequence[int], layers: range, *, last: bool,
              trace_context: str = "") -> int:
        for layer in layers:
            kv_layer(self.target, layer)[list(dst_blocks)] = kv_layer(self.source, layer)[
                list(src_blocks)]
        self.writes.append((layers, list(dst_blocks), last))
        return len(self.writes)


@pytest.mark.parametrize(("layer_group", "group"), [(1, 1), (2, 2), (None, 4)])
def test_one_write_per_layer_group_and_chunk(four_layers: Path, layer_group: int | None,
                                             group: int) -> None:
    engine = Engine(four_layers, EngineConfig(num_blocks=32, block_size=BS,
                                              max_num_batched_tokens=16,
                                              kv_layer_group=layer_group))
    assert engine.cache_shape.layer_group == group  # None: auto, all 4 layers (tiny blocks)
    target = allocate_kv_cache(engine.cache_shape)
    agent = CopyingAgent(engine.runner.kv_cache, target)
    worker = PrefillWorker(EngineLoop(engine), agent, "prefill-test")  # type: ignore[arg-type]
    prompt = list(range(40, 77))  # 37 tokens: 10 blocks, 3 chunks of <= 16 tokens
    dst = [int(b) for b in np.random.default_rng(0).permutation(32)[:10]]
    worker.plans["r"] = PushPlan("peer", dst, "", next_block=0)
    engine.add_prefill_request("r", prompt, SamplingParams(max_tokens=1))
    while not engine.step(worker.on_layer_done):
        pass

    groups = [range(lo, lo + group) for lo in range(0, 4, group)]
    chunks = [dst[0:4], dst[4:8], dst[8:10]]  # the blocks each chunk completes
    assert agent.writes == [(layers, blocks, False) for blocks in chunks for layers in groups
                            ][:-1] + [(groups[-1], chunks[-1], True)]
    src = engine.block_manager.block_ids("r")
    assert torch.equal(target[:, dst], engine.runner.kv_cache[:, src])  # every layer arrived
    assert not target[:, dst].eq(0).all()


class LandingAgent:
    """Reports each write done (on the event loop, to `worker`) once `landed` is set."""

    config = TransferConfig(token="test")

    def __init__(self, landed: threading.Event) -> None:
        self.landed = landed
        self.worker: PrefillWorker | None = None
        self.aio = asyncio.get_running_loop()
        self.writes: list[str] = []

    def connect(self, metadata: str) -> str:
        return "peer"

    def write(self, peer: str, request_id: str, src_blocks: Sequence[int],
              dst_blocks: Sequence[int], layers: range, *, last: bool,
              trace_context: str = "") -> int:
        self.writes.append(request_id)
        write_id = len(self.writes)
        done = TransferEvent(EventKind.WRITE_DONE, request_id, peer, write_id=write_id)

        def report() -> None:
            self.landed.wait(30)
            assert self.worker is not None
            self.aio.call_soon_threadsafe(self.worker.on_transfer_events, [done])

        threading.Thread(target=report, daemon=True).start()
        return write_id


async def test_the_first_token_does_not_wait_for_the_next_requests_step(
        four_layers: Path) -> None:
    """Once its writes landed, `prefill` returns while the engine computes another request's
    step; its blocks are freed at the next step boundary."""
    slow_started, let_slow_finish = threading.Event(), threading.Event()
    engine = Engine(four_layers, EngineConfig(num_blocks=32, block_size=BS))
    agent = LandingAgent(landed=slow_started)

    def on_layer_done(layer: int, batch: ScheduledBatch) -> None:
        worker.on_layer_done(layer, batch)
        if batch.requests[0].request_id == "slow":  # a long step of another request
            slow_started.set()
            let_slow_finish.wait(30)

    loop = EngineLoop(engine, on_layer_done=on_layer_done)
    worker = PrefillWorker(loop, agent, "prefill-test")  # type: ignore[arg-type]
    agent.worker = worker
    loop.start()
    try:
        fast = asyncio.create_task(worker.prefill("fast", list(range(40, 50)), SamplingParams(),
                                                  "decode-peer", list(range(3)), 0))
        while "fast" not in agent.writes:  # fast's step posted its write
            await asyncio.sleep(0.01)
        await loop.call(lambda e: e.add_request("slow", list(range(60, 70)),
                                                SamplingParams(max_tokens=1)))
        result = await asyncio.wait_for(fast, 20)  # while slow's step still runs
        assert slow_started.is_set() and not let_slow_finish.is_set()
        assert result.num_computed_tokens == 10
        let_slow_finish.set()
        assert not await loop.call(lambda e: e.block_manager.has_request("fast"))
    finally:
        let_slow_finish.set()
        loop.stop()
