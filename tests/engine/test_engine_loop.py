"""The engine thread: commands between steps, outputs to asyncio queues, death is loud."""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.engine import Engine, RequestOutput
from engine.engine_loop import IDLE_WAIT_S, EngineDead, EngineLoop, build_engine
from engine.sampling import SamplingParams
from engine.tiny_model import make_tiny_model
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


class RecordingQueue(queue.Queue):  # type: ignore[type-arg]
    """The command queue, writing how long the engine thread offers to wait into `timeline`."""

    def __init__(self, timeline: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self.timeline = timeline

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self.timeline.append(("wait", timeout if block else 0.0))
        return super().get(block, timeout)


async def test_the_idle_hook_bounds_the_command_wait_even_right_after_a_step(
        tiny_llama: Path) -> None:
    """A step that starts something to poll for (a KV write) is followed by the idle hook at
    once, and the thread then waits no longer than the hook asked, not `IDLE_WAIT_S`."""
    in_flight = threading.Event()
    timeline: list[tuple[Any, ...]] = []  # ("wait", timeout) and ("idle", steps, in flight)

    def on_layer_done(layer: int, batch: object) -> None:
        in_flight.set()  # as a prefill worker posts the write of a layer group

    def on_idle(engine: Engine) -> float | None:
        timeline.append(("idle", engine.stats.steps, in_flight.is_set()))
        return 0.002 if in_flight.is_set() else None

    loop = EngineLoop(Engine(tiny_llama, EngineConfig(num_blocks=64, block_size=4)),
                      on_layer_done=on_layer_done, on_idle=on_idle)
    loop._commands = RecordingQueue(timeline)
    loop.start()
    try:
        q = loop.subscribe("a")
        await loop.call(lambda e: e.add_request("a", [5, 6, 7], SamplingParams(max_tokens=1)))
        await collect(q)
        await asyncio.sleep(0.2)
        events = list(timeline)
        assert events[0] == ("wait", IDLE_WAIT_S)  # nothing in flight: the long idle wait
        last_before = max(i for i, e in enumerate(events) if e[:2] == ("idle", 0))
        first_after = events.index(("idle", 1, True))
        assert first_after == last_before + 1  # the step ran between them, and nothing else
        waits_after = [e[1] for e in events[first_after:] if e[0] == "wait"]
        assert len(waits_after) > 3 and set(waits_after) == {0.002}
    finally:
        loop.stop()


async def test_the_idle_wait_is_the_loops_own(tiny_llama: Path) -> None:
    """With nothing in flight the thread waits `idle_wait_s` (a worker's config), not the
    module default; a command still ends that wait at once."""
    timeline: list[tuple[Any, ...]] = []
    loop = EngineLoop(Engine(tiny_llama, EngineConfig(num_blocks=16, block_size=4)),
                      on_idle=lambda e: None, idle_wait_s=3600.0)
    loop._commands = RecordingQueue(timeline)
    loop.start()
    try:
        await asyncio.sleep(0.05)  # in its hour-long wait now
        began = time.monotonic()
        assert await loop.call(lambda e: e.has_unfinished()) is False
        assert time.monotonic() - began < 60.0  # not the hour: the command woke it
        assert timeline[0] == ("wait", 3600.0)
    finally:
        loop.stop()


def test_a_non_positive_idle_wait_is_refused(tiny_llama: Path) -> None:
    engine = Engine(tiny_llama, EngineConfig(num_blocks=16, block_size=4))
    with pytest.raises(ValueError, match="idle_wait_s: must be > 0"):
        EngineLoop(engine, idle_wait_s=0.0)


def test_build_engine_raises_its_error_on_the_callers_thread(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build_engine(tmp_path / "missing", EngineConfig(num_blocks=8))


STEP_ON_THE_ENGINE_THREAD = """
import asyncio, os, sys
from engine.config import EngineConfig
from engine.engine import Engine
from engine.engine_loop import EngineLoop, build_engine
from engine.sampling import SamplingParams

os.sched_setaffinity(0, {0, 1})  # two CPUs, whatever the machine has
config = EngineConfig(num_blocks=256)
engine = Engine(sys.argv[2], config) if sys.argv[1] == "main" else build_engine(sys.argv[2], config)

def voluntary_switches() -> int:
    return sum(int(line.split()[1]) for task in os.listdir("/proc/self/task")
               for line in open(f"/proc/self/task/{task}/status")
               if line.startswith("voluntary_ctxt_switches"))

async def main() -> None:
    loop = EngineLoop(engine)
    loop.start()
    before = voluntary_switches()
    for i in range(5):
        q = loop.subscribe(str(i))
        await loop.call(lambda e: e.add_request(str(i), list(range(3, 515)),
                                                SamplingParams(max_tokens=1)))
        await q.get()
    print(voluntary_switches() - before)
    loop.stop()

asyncio.run(main())
"""


def test_an_engine_built_off_the_main_thread_steps_without_openmp_sleeping(
        tmp_path: Path) -> None:
    """Built on the main thread and stepped on the engine thread, an engine leaves two OpenMP
    pools, and libgomp (more of its threads than the two CPUs) puts its workers to sleep after
    every parallel region: hundreds of voluntary context switches for five 512-token prefills
    of the bench-shaped model. Built by `build_engine`, only the engine thread's pool is left."""
    assert (os.cpu_count() or 1) >= 2, "needs two CPUs to pin the engine to"
    model = make_tiny_model(tmp_path / "bench", preset="bench")

    def switches(where: str) -> int:
        out = subprocess.run([sys.executable, "-c", STEP_ON_THE_ENGINE_THREAD, where,
                              str(model)], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parents[2])
        return int(out.stdout.split()[-1])

    on_main, off_main = switches("main"), switches("build")
    assert off_main * 5 < on_main, (off_main, on_main)


async def test_a_stalled_engine_waits_for_the_release_instead_of_spinning(
        tiny_llama: Path) -> None:
    """A request preempted while a reservation holds the blocks it needs cannot run until the
    reservation goes: the thread waits for commands (a step every `IDLE_WAIT_S` at most), then
    the release lets the request finish."""
    engine = Engine(tiny_llama, EngineConfig(num_blocks=20, block_size=4))
    steps = 0
    step = engine.step

    def counted(*args: Any) -> list[RequestOutput]:
        nonlocal steps
        steps += 1
        return step(*args)

    engine.step = counted  # type: ignore[method-assign,assignment]
    loop = EngineLoop(engine)
    loop.start()
    try:
        sampling = SamplingParams(max_tokens=24, ignore_eos=True)
        assert await loop.call(lambda e: e.reserve("held", list(range(3, 59)), sampling))
        q = loop.subscribe("r")
        prompt = list(range(100, 118))  # 18 tokens + 24 new: 11 blocks, 6 free
        await loop.call(lambda e: e.add_request("r", prompt, sampling))
        while not await loop.call(lambda e: e.stalled):
            await asyncio.sleep(0.01)
        before = steps
        await asyncio.sleep(0.5)
        assert steps - before <= 0.5 / IDLE_WAIT_S + 2  # not thousands: no busy loop
        await loop.call(lambda e: e.release("held"))
        assert await collect(q) == hf_greedy(tiny_llama, prompt, 24)
    finally:
        loop.stop()
