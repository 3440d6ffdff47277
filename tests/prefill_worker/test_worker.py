"""The prefill worker's push: one write per completed layer group of each step, the last one
marked `last`, with a real engine and stand-in agents that copy what each write names between
two caches or report it done when told (the real transfers are tested in tests/kv_transfer
and tests/e2e); and its first token not held by another request's step.

Its links to decode workers, with real engines and real NIXL agents in one process: a link the
agent lost is made again by the next request; an unreachable peer fails requests with
`TransferFailed` and is not dialed again until its backoff ends. (Stalled processes:
tests/e2e/test_failures.py.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.addresses import free_port
from cluster.errors import TransferFailed
from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop
from engine.kv_cache import allocate_kv_cache, kv_layer
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.tiny_model import make_tiny_model
from kv_transfer import KVLayoutSpec, create_agent
from kv_transfer.agent import BaseAgent
from kv_transfer.base import EventKind, KVTransferAgent, TransferConfig, TransferEvent
from prefill_worker.worker import PrefillWorker, PushPlan
from tests.engine.hf_reference import hf_greedy

pytestmark = pytest.mark.timeout(120)

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


# ---- links to decode workers ----------------------------------------------------------------

PROMPT = list(range(20, 57))  # 37 tokens: 10 blocks of 4
SAMPLING = SamplingParams(max_tokens=1, ignore_eos=True)


@dataclass
class Pair:
    worker: PrefillWorker
    decode: Engine  # the receiving side, driven by the test
    receiver: KVTransferAgent


def make_agent(engine: Engine) -> BaseAgent:
    agent = create_agent(KVLayoutSpec.from_cache_shape(engine.cache_shape, "tiny"),
                         TransferConfig(token="test"))
    agent.register_cache(engine.runner.kv_cache)
    assert isinstance(agent, BaseAgent)
    return agent


@pytest.fixture
async def pair(tiny_llama: Path) -> AsyncIterator[Pair]:
    config = EngineConfig(num_blocks=32, block_size=4, max_num_batched_tokens=16)
    decode, prefill = Engine(tiny_llama, config), Engine(tiny_llama, config)
    receiver, sender = make_agent(decode), make_agent(prefill)
    aio = asyncio.get_running_loop()
    holder: list[PrefillWorker] = []

    def poll(_engine: Engine) -> None:
        events = sender.poll()
        if events and holder:
            aio.call_soon_threadsafe(holder[0].on_transfer_events, events)

    loop = EngineLoop(prefill, on_layer_done=lambda layer, batch: holder[0].on_layer_done(
        layer, batch), on_idle=poll)
    loop.start()
    holder.append(PrefillWorker(loop, sender, "prefill-test", transfer_timeout_s=10.0))
    try:
        yield Pair(holder[0], decode, receiver)
    finally:
        loop.stop()
        sender.close()
        receiver.close()


async def push(pair: Pair, request_id: str) -> int:
    """One request P → D: reserve on D, prefill on P while D's agent is polled (one-sided
    writes still need the target's progress here), wait for D to see the KV complete;
    returns P's first token."""
    allocation = pair.decode.reserve(request_id, PROMPT, SAMPLING)
    assert allocation is not None
    pair.receiver.expect(request_id, 10.0)

    async def received() -> EventKind:
        while True:
            done = [e for e in pair.receiver.poll() if e.request_id == request_id]
            if done:
                return done[0].kind
            await asyncio.sleep(0.001)

    arrival = asyncio.create_task(received())
    try:
        result = await pair.worker.prefill(request_id, PROMPT, SAMPLING,
                                           pair.receiver.metadata(), allocation.block_ids, 0)
        assert await asyncio.wait_for(arrival, 10) is EventKind.REQUEST_COMPLETE
        return result.first_token
    finally:
        arrival.cancel()
        pair.receiver.release(request_id)
        pair.decode.release(request_id)


async def test_a_lost_link_is_made_again_by_the_next_request(pair: Pair,
                                                             tiny_llama: Path) -> None:
    first = hf_greedy(tiny_llama, PROMPT, 1)[0]
    assert await push(pair, "r1") == first
    sender = pair.worker.agent
    assert sender.stats.peers_connected == 1 and not pair.worker.plans
    # the agent loses the link (what a stalled peer's missed heartbeats lead to)
    name = await pair.worker.loop.call(lambda e: sender.connect(pair.receiver.metadata()))
    await pair.worker.loop.call(lambda e: sender.disconnect(name))
    assert await push(pair, "r2") == first  # before: "no live connection" forever
    assert sender.stats.peers_connected == 2
    assert await push(pair, "r3") == first  # the new link is reused
    assert sender.stats.peers_connected == 2
    assert pair.worker.stats.requests == 3 and pair.worker.stats.transfer_failures == 0


async def test_an_unreachable_peer_fails_fast_and_backs_off(pair: Pair) -> None:
    worker = pair.worker
    nobody = f"127.0.0.1:{free_port()}"  # no agent listens there
    allocation = pair.decode.reserve("r1", PROMPT, SAMPLING)
    assert allocation is not None

    async def attempt() -> str:
        with pytest.raises(TransferFailed) as failed:
            await worker.prefill("r1", PROMPT, SAMPLING, nobody, allocation.block_ids, 0)
        return str(failed.value)

    handshakes = lambda: sum(worker.agent.stats.failures.values())  # noqa: E731
    first = await attempt()
    assert "cannot reach decode peer" in first and handshakes() == 1
    second = await attempt()  # within the backoff: refused without dialing
    assert "next try in" in second and handshakes() == 1
    assert worker.stats.connect_failures == 2 and worker.stats.requests == 0
    assert await worker.loop.call(lambda e: e.num_requests()) == 0  # nothing was queued
    await asyncio.sleep(worker.agent.config.heartbeat_interval_s + 0.1)  # the first backoff
    await attempt()  # dialed again, failed again: the backoff doubles
    assert handshakes() == 2
    backoff = worker._backoff[nobody]
    assert backoff.failures == 2
    assert backoff.retry_at - time.monotonic() > worker.agent.config.heartbeat_interval_s
    # the real peer is unaffected
    pair.decode.release("r1")
    assert await push(pair, "r2") >= 0
