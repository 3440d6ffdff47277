"""The worker runtime's engine-thread hooks: the transfer agent is polled between steps; while
writes are in flight also between a step's layers and every poll interval when idle; and a
sender's announced write wakes an idle receiver (a real engine, a real NIXL agent, a real
peer process)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from cluster.roles import Role
from cluster.worker_config import WorkerConfig
from cluster.worker_runtime import WorkerRuntime
from engine.config import EngineConfig
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledBatch
from kv_transfer.base import EventKind, TransferEvent
from kv_transfer.spec import KVLayoutSpec
from tests.kv_transfer.kvt_peer import TOKEN, Peer

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


async def test_writes_in_flight_are_polled_between_layers_and_soon_when_idle(
        tiny_llama: Path) -> None:
    config = WorkerConfig(role=Role.PREFILL, model=str(tiny_llama), metrics_listen="",
                          transfer_token=TOKEN, engine=EngineConfig(num_blocks=32, block_size=4),
                          transfer_poll_interval_s=1e-6)
    runtime = WorkerRuntime(config)
    receiver = Peer("nixl", spec=KVLayoutSpec.from_cache_shape(runtime.engine.cache_shape,
                                                                runtime.engine.model_id),
                    num_blocks=32)
    timeline: list[Any] = []  # what the engine thread did, in order
    events: list[TransferEvent] = []
    poll = runtime.agent.poll

    def recording_poll() -> list[TransferEvent]:
        timeline.append("poll")
        return poll()

    runtime.agent.poll = recording_poll  # type: ignore[method-assign]
    runtime.on_transfer_events(events.extend)
    write_to: list[str] = []  # the peer to write to on layer 0, once connected

    def on_layer_done(layer: int, batch: ScheduledBatch) -> None:
        timeline.append(("layer", layer))
        if write_to and layer == 0:  # as a prefill worker posts a layer group's write
            runtime.agent.write(write_to[0], batch.requests[0].request_id, [0], [1],
                                range(1), last=True)

    loop = runtime.start_engine(on_layer_done)
    assert loop.on_idle is not None
    on_idle = loop.on_idle
    try:
        async def step(request_id: str) -> list[Any]:
            q = loop.subscribe(request_id)
            await loop.call(lambda e: e.add_request(request_id, [5, 6, 7],
                                                    SamplingParams(max_tokens=1)))
            await q.get()
            steps = await loop.call(lambda e: list(timeline))  # between steps: stable
            first = steps.index(("layer", 0))
            return steps[first:first + 3]

        # nothing in flight: no poll between the layers, and the idle hook asks for nothing
        assert await step("a") == [("layer", 0), ("layer", 1), "poll"]
        assert await loop.call(lambda e: on_idle(e)) is None

        # a write posted on layer 0 is polled right after it, within the step
        write_to.append(await loop.call(lambda e: runtime.agent.connect(receiver.metadata)))
        timeline.clear()
        assert (await step("b"))[:2] == [("layer", 0), "poll"]
        # idle now: the hook asks to be called again within the interval until the write is
        # done (a write never done fails after its timeout, which ends the loop too)
        while (asked := await loop.call(lambda e: on_idle(e))) is not None:
            assert asked == config.transfer_poll_interval_s
        await loop.call(lambda e: None)  # the last poll's events reach the event loop after it
        assert [(e.kind, e.request_id) for e in events] == [(EventKind.WRITE_DONE, "b")]
    finally:
        await runtime.close()
        receiver.stop()


async def test_an_idle_receiver_is_woken_by_an_announced_write(
        tiny_llama: Path) -> None:
    """With the idle wait made an hour long, a decode worker's engine thread only polls again
    if the sender's announcement wakes it: then the write lands, the request completes, and
    the sender's write (which needs the receiver's progress) is done."""
    config = WorkerConfig(role=Role.DECODE, model=str(tiny_llama), metrics_listen="",
                          transfer_token=TOKEN, engine=EngineConfig(num_blocks=32, block_size=4),
                          idle_wait_s=3600.0)
    runtime = WorkerRuntime(config)
    sender = Peer("nixl", spec=KVLayoutSpec.from_cache_shape(runtime.engine.cache_shape,
                                                              runtime.engine.model_id),
                  num_blocks=32)
    arrived = asyncio.Event()
    events: list[TransferEvent] = []

    def listener(batch: list[TransferEvent]) -> None:
        events.extend(batch)
        arrived.set()

    runtime.on_transfer_events(listener)
    loop = runtime.start_engine()
    try:
        await loop.call(lambda e: runtime.agent.expect("r", 30.0))
        peer = sender.call("connect", runtime.agent.metadata())
        await asyncio.sleep(0.2)  # the engine thread is back in its (hour-long) wait
        sender.call("write", [(peer, "r", [0, 1], [3, 4], (0, 2), True)])
        await asyncio.wait_for(arrived.wait(), 20.0)
        assert [(e.kind, e.request_id) for e in events] == [(EventKind.REQUEST_COMPLETE, "r")]
        [done] = sender.wait_events(1, 20.0)
        assert done.kind == EventKind.WRITE_DONE
    finally:
        await runtime.close()
        sender.stop()


async def test_an_idle_engine_thread_wakes_for_the_agents_next_deadline(
        tiny_llama: Path) -> None:
    """With the idle wait made an hour long, a request whose KV never comes still fails at its
    deadline: the idle hook asks to be called by the agent's `next_deadline()`."""
    config = WorkerConfig(role=Role.DECODE, model=str(tiny_llama), metrics_listen="",
                          transfer_token=TOKEN, engine=EngineConfig(num_blocks=32, block_size=4),
                          idle_wait_s=3600.0)
    runtime = WorkerRuntime(config)
    events: list[TransferEvent] = []
    failed = asyncio.Event()

    def listener(batch: list[TransferEvent]) -> None:
        events.extend(batch)
        failed.set()

    runtime.on_transfer_events(listener)
    loop = runtime.start_engine()
    try:
        await loop.call(lambda e: None)
        assert runtime.agent.next_deadline() is None
        began = time.monotonic()
        await loop.call(lambda e: runtime.agent.expect("r", 0.3))
        assert runtime.agent.next_deadline() is not None
        await asyncio.wait_for(failed.wait(), 20.0)
        assert time.monotonic() - began >= 0.3
        assert [(e.kind, e.request_id) for e in events] == [(EventKind.REQUEST_FAILED, "r")]
        assert runtime.agent.next_deadline() is None
    finally:
        await runtime.close()
