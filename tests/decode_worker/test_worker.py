"""The decode worker's own paths, with a real engine and a real NIXL agent that nobody writes
to: a transfer that never completes (the agent's deadline fails it) makes `decode` prefill
locally and still produce transformers' tokens; a reservation nobody uses expires and frees
its blocks. (The end-to-end paths with a real prefill worker are in tests/e2e.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop
from engine.sampling import SamplingParams
from kv_transfer import KVLayoutSpec, TransferConfig, create_agent
from tests.engine.hf_reference import hf_greedy

pytestmark = pytest.mark.timeout(120)

PROMPT = list(range(20, 57))


@pytest.fixture
async def worker(tiny_llama: Path) -> AsyncIterator[DecodeWorker]:
    engine = Engine(tiny_llama, EngineConfig(num_blocks=32, block_size=4))
    agent = create_agent(KVLayoutSpec.from_cache_shape(engine.cache_shape, "tiny"),
                         TransferConfig(token="test"))
    agent.register_cache(engine.runner.kv_cache)
    aio = asyncio.get_running_loop()
    holder: list[DecodeWorker] = []

    def poll(_engine: Engine) -> None:
        events = agent.poll()
        if events and holder:
            aio.call_soon_threadsafe(holder[0].on_transfer_events, events)

    loop = EngineLoop(engine, on_idle=poll)
    loop.start()
    decode = DecodeWorker(loop, agent, "decode-test", lease_s=30.0, quarantine_s=0.2)
    holder.append(decode)
    decode.start()
    try:
        yield decode
    finally:
        await decode.stop()
        loop.stop()
        agent.close()


async def free_blocks(worker: DecodeWorker) -> int:
    return await worker.loop.call(lambda e: e.block_manager.num_free_blocks)


async def test_failed_transfer_falls_back_to_local_prefill(worker: DecodeWorker,
                                                           tiny_llama: Path) -> None:
    expected = hf_greedy(tiny_llama, PROMPT, 8)
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    reservation = await worker.reserve("r1", PROMPT, sampling, lease_s=1.0)
    assert await free_blocks(worker) == 32 - len(reservation.block_ids)
    tokens = [expected[0]]  # the prefill worker's first token reached the client already
    async for output in worker.decode("r1", expected[0]):
        tokens += output.new_token_ids
    assert tokens == expected
    # the lease and the agent's deadline are the same 1 s: either may notice first
    assert worker.stats.local_prefills == 1 and worker.stats.transfers_completed == 0
    for _ in range(50):
        if await free_blocks(worker) == 32:
            break
        await asyncio.sleep(0.1)
    assert await free_blocks(worker) == 32


async def test_unused_reservation_expires_and_frees_its_blocks(worker: DecodeWorker) -> None:
    await worker.reserve("idle", PROMPT, SamplingParams(), lease_s=0.5)
    assert await free_blocks(worker) < 32
    for _ in range(50):
        if worker.stats.lease_expiries and await free_blocks(worker) == 32:
            break
        await asyncio.sleep(0.1)
    assert worker.stats.lease_expiries == 1
    assert await free_blocks(worker) == 32
    assert "idle" not in worker.reservations


async def test_decode_of_an_unknown_request_is_not_found(worker: DecodeWorker) -> None:
    from cluster.errors import UnknownRequest

    with pytest.raises(UnknownRequest, match="holds no reservation"):
        async for _ in worker.decode("never-reserved", 5):
            pass


async def test_quarantine_release_is_a_kept_task_that_frees_the_blocks(
        worker: DecodeWorker) -> None:
    import gc

    await worker.reserve("q", PROMPT, SamplingParams())
    assert await worker.cancel("q", "router released")  # KV never came: quarantined
    assert await free_blocks(worker) < 32
    assert len(worker.tasks) == 2  # the lease checker and this release
    gc.collect()  # the release task must survive a collection (asyncio holds it weakly)
    for _ in range(50):
        if await free_blocks(worker) == 32:
            break
        await asyncio.sleep(0.05)
    assert await free_blocks(worker) == 32
    assert len(worker.tasks) == 1


async def test_a_failed_quarantine_release_is_logged(worker: DecodeWorker,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    import logging

    await worker.reserve("q", PROMPT, SamplingParams())
    with caplog.at_level(logging.ERROR, logger="cluster.background"):
        assert await worker.cancel("q", "router released")
        worker.loop.fatal = RuntimeError("engine gone")  # the engine dies meanwhile
        try:
            for _ in range(50):
                if len(worker.tasks) == 1:
                    break
                await asyncio.sleep(0.05)
        finally:
            worker.loop.fatal = None
    assert len(worker.tasks) == 1  # the release ended ...
    assert "quarantine release q" in caplog.text and "engine gone" in caplog.text  # ... loudly


async def test_stop_cancels_pending_releases(worker: DecodeWorker) -> None:
    await worker.reserve("q", PROMPT, SamplingParams())
    await worker.cancel("q", "router released")
    assert len(worker.tasks) == 2
    await worker.stop()
    assert len(worker.tasks) == 0 and worker.tasks.closed


async def test_a_request_released_while_waiting_for_its_kv_ends_cancelled(
        worker: DecodeWorker) -> None:
    """No local prefill for a request that was released: its stream ends, cancelled."""
    from engine.request import FinishReason

    await worker.reserve("waiting", PROMPT, SamplingParams(max_tokens=8), lease_s=30.0)
    outputs = []

    async def consume() -> None:
        async for output in worker.decode("waiting", 5):
            outputs.append(output)
    stream = asyncio.create_task(consume())
    await asyncio.sleep(0.2)  # waiting for KV that never comes
    assert await worker.cancel("waiting", "operator")
    await asyncio.wait_for(stream, 5)
    assert [(o.new_token_ids, o.finish_reason) for o in outputs] == [([], FinishReason.CANCELLED)]
    assert worker.stats.local_prefills == 0
    for _ in range(50):  # quarantined (a write could still land), then freed
        if await free_blocks(worker) == 32:
            break
        await asyncio.sleep(0.1)
    assert await free_blocks(worker) == 32


async def test_a_decoding_request_released_ends_its_stream_cancelled(
        worker: DecodeWorker) -> None:
    from engine.request import FinishReason

    sampling = SamplingParams(max_tokens=80, ignore_eos=True)  # fits 32 blocks of 4
    await worker.reserve("long", PROMPT, sampling, lease_s=0.3)  # KV never comes: local prefill
    outputs = []

    async def consume() -> None:
        async for output in worker.decode("long", 5):
            outputs.append(output)
            if len(outputs) == 4:
                assert await worker.cancel("long", "operator")
    await asyncio.wait_for(consume(), 30)
    assert outputs[-1].finished and outputs[-1].finish_reason is FinishReason.CANCELLED
    assert all(not o.finished for o in outputs[:-1])
    assert "long" not in worker.reservations
    for _ in range(50):  # the first reservation's blocks sit out their quarantine
        if await free_blocks(worker) == 32:
            break
        await asyncio.sleep(0.1)
    assert await free_blocks(worker) == 32


async def test_a_caller_cannot_hold_blocks_longer_than_the_workers_lease(
        worker: DecodeWorker) -> None:
    """`Decode/Reserve` with lease_ms 4294967295 once held blocks for 50 days: the worker's
    own lease is the cap; a shorter one is kept."""
    long = await worker.reserve("long", PROMPT, SamplingParams(), lease_s=4294967.295)
    assert long.lease_deadline <= time.monotonic() + worker.lease_s
    short = await worker.reserve("short", PROMPT, SamplingParams(), lease_s=0.5)
    assert short.lease_deadline <= time.monotonic() + 0.5
    assert await worker.cancel("long", "test") and await worker.cancel("short", "test")


async def test_decode_without_a_first_token_prefills_here(worker: DecodeWorker,
                                                          tiny_llama: Path) -> None:
    """The router sent no KV (an aggregated worker, a short prompt): the stream starts with
    the first token, the blocks are freed at once, no transfer is waited for."""
    expected = hf_greedy(tiny_llama, PROMPT, 6)
    reservation = await worker.reserve("r1", PROMPT, SamplingParams(max_tokens=6,
                                                                    ignore_eos=True))
    assert reservation.num_cached_tokens == 0
    tokens: list[int] = []
    async for output in worker.decode("r1", None):
        tokens += output.new_token_ids
    assert tokens == expected
    assert worker.stats.routed_prefills == 1 and worker.stats.local_prefills == 0
    assert await free_blocks(worker) == 32  # finished: no quarantine, nothing could land
    # again: the prompt's full blocks are now cached here, and found again by hash
    again = await worker.reserve("r2", PROMPT, SamplingParams(max_tokens=2, ignore_eos=True))
    assert again.num_cached_tokens == 36
    assert [t async for o in worker.decode("r2", None) for t in o.new_token_ids] == expected[:2]
    assert await free_blocks(worker) == 32
