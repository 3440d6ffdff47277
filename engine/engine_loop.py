"""Runs an `Engine` on its own thread so an asyncio service never waits on a model step.

The engine is not thread-safe: everything that touches it — adding, reserving, releasing,
reading stats — goes through `call`, which runs the function on the engine thread between
two steps and hands the result back to the event loop. Each step's outputs are delivered to
per-request asyncio queues (`subscribe`). If a step raises, the engine is considered dead:
every subscriber gets the error, `fatal` is set, and the service should exit so its
supervisor (Kubernetes, `tandem up`) restarts it. Build the engine with `build_engine`, not
on the main thread (see there why).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from engine.config import EngineConfig
from engine.engine import Engine, RequestOutput, StepInfo, StepLayerCallback
from engine.errors import EngineDead
from engine.warmup import warm_up

log = logging.getLogger(__name__)

__all__ = ["EngineDead", "EngineLoop", "build_engine"]

T = TypeVar("T")
# The default longest wait of an idle engine thread for a command before it runs its idle hook
# again, when the hook asked for no sooner call (a worker sets its own: `WorkerConfig.
# idle_wait_s`). Commands and `wake()` (a transfer agent's control event) end the wait at once
# and the hook asks for its deadlines, so no request waits for this poll: traced step by step,
# with it at 1 s no step of a request took near 1 s (loadtest/README.md, experiment 3), and
# tests/e2e/test_idle_wait.py serves requests with it at 60 s. It only sets idle CPU (5 ms
# made 32 idle sim workers burn 1.4 cores).
IDLE_WAIT_S = 0.05

IdleHook = Callable[[Engine], float | None]
"""Runs on the engine thread between steps; returns the longest the thread may then wait for
a command before calling it again (something outside the engine is in flight: a KV transfer
to poll; or a timer is due: a transfer deadline), or None when nothing is (the thread then
sleeps until a command or `wake()`, at most the loop's `idle_wait_s`)."""


def build_engine(model_dir: str | Path, config: EngineConfig) -> Engine:
    """`Engine(model_dir, config)`, built and warmed up (`engine.warmup`) on a short-lived
    thread, for an `EngineLoop`.

    OpenMP (torch's CPU thread pool) keeps a pool of worker threads for every thread that ran
    a parallel region. An engine loaded on the main thread and stepped on the engine thread
    leaves two pools; libgomp, seeing more of its threads than CPUs, then stops spin-waiting
    between parallel regions, and every op of every step pays a futex wake-up (measured on 2
    cores, SmolLM2-135M, 512-token prefill: 20% slower, 13,800 voluntary context switches
    against 14). The temporary thread's pool ends with it, leaving the engine thread's alone.
    """
    built: list[Engine] = []
    failed: list[BaseException] = []

    def build() -> None:
        try:
            engine = Engine(model_dir, config)
            warm_up(engine)  # Triton compiles now, not on the first request (engine.warmup)
            built.append(engine)
        except BaseException as error:  # re-raised on the caller's thread
            failed.append(error)

    thread = threading.Thread(target=build, name="engine-build")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return built[0]


class EngineLoop:
    """An engine driven by a background thread, used from asyncio."""

    def __init__(self, engine: Engine, on_layer_done: StepLayerCallback | None = None,
                 on_idle: IdleHook | None = None,
                 step_delay_s: float = 0.0,
                 on_step: Callable[[StepInfo], None] | None = None,
                 idle_wait_s: float = IDLE_WAIT_S) -> None:
        if idle_wait_s <= 0:
            raise ValueError(f"idle_wait_s: must be > 0, got {idle_wait_s}")
        self.engine = engine
        self.idle_wait_s = idle_wait_s  # the longest idle wait when the hook asks for none
        self.on_step = on_step  # engine thread, after every step that ran a batch
        self.step_delay_s = step_delay_s  # fault injection for tests: a slow engine
        self.on_layer_done = on_layer_done
        self.on_idle = on_idle  # engine thread: between steps, and at least as often as it asks
        self.fatal: BaseException | None = None
        self._commands: queue.Queue[tuple[Callable[[Engine], Any], Future[Any]]] = queue.Queue()
        self._subscribers: dict[str, tuple[asyncio.AbstractEventLoop,
                                           asyncio.Queue[RequestOutput | BaseException]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.wake()
        self._thread.join(timeout)

    def wake(self) -> None:
        """Ends the engine thread's wait for a command now, so it runs its idle hook (any
        thread; a KV transfer agent calls it when a peer announces a write)."""
        self._commands.put((lambda _e: None, Future()))

    def post(self, fn: Callable[[Engine], Any]) -> None:
        """Runs `fn(engine)` on the engine thread between two steps, without waiting for it
        (any thread); an error it raises is logged. For clean-ups that must not hold the
        caller until the engine finishes its current step."""
        future: Future[Any] = Future()
        future.add_done_callback(_log_failure)
        self._commands.put((fn, future))

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Runs `fn(engine)` on the engine thread and returns its result (or raises its error)."""
        if self.fatal is not None:
            raise EngineDead(f"engine failed: {self.fatal!r}")
        future: Future[T] = Future()
        self._commands.put((fn, future))
        return await asyncio.wrap_future(future)

    def subscribe(self, request_id: str) -> asyncio.Queue[RequestOutput | BaseException]:
        """A queue that receives every output of `request_id` (call before adding it)."""
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        with self._lock:
            self._subscribers[request_id] = (asyncio.get_running_loop(), q)
        return q

    def unsubscribe(self, request_id: str) -> None:
        with self._lock:
            self._subscribers.pop(request_id, None)

    # ---- engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            wait = self.idle_wait_s  # the longest the next command wait may take
            while not self._stop.is_set():
                # a stalled engine (its waiting requests need blocks held outside the
                # scheduler) waits for the command that frees them instead of spinning
                busy = self.engine.has_unfinished() and not self.engine.stalled
                self._run_commands(0.0 if busy else wait)
                wait = self._idle()
                if self.engine.has_unfinished():
                    if self.step_delay_s:
                        time.sleep(self.step_delay_s)
                    outputs = self.engine.step(self.on_layer_done)
                    if self.on_step is not None and self.engine.last_step is not None:
                        self.on_step(self.engine.last_step)
                    self._deliver(outputs)
                    wait = self._idle()  # the step may have started something to poll for
        except BaseException as error:  # the engine is in an unknown state: stop serving
            log.exception("engine step failed; this worker can no longer serve")
            self.fatal = error
            self._fail_all(error)

    def _idle(self) -> float:
        """Runs the idle hook; how long the thread may wait for a command before the next."""
        asked = None if self.on_idle is None else self.on_idle(self.engine)
        return self.idle_wait_s if asked is None else min(asked, self.idle_wait_s)

    def _run_commands(self, timeout: float) -> None:
        """Runs every queued command, first waiting up to `timeout` seconds for one."""
        try:
            fn, future = self._commands.get(timeout=timeout) if timeout > 0 else \
                self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as error:  # the caller's error (bad input...), not ours
                    future.set_exception(error)
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            targets = [(self._subscribers.get(o.request_id), o) for o in outputs]
        for target, output in targets:
            if target is not None:
                loop, q = target
                loop.call_soon_threadsafe(q.put_nowait, output)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            targets = list(self._subscribers.values())
        for loop, q in targets:
            loop.call_soon_threadsafe(q.put_nowait, EngineDead(f"engine failed: {error!r}"))
        while True:
            try:
                _fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineDead(f"engine failed: {error!r}"))


def _log_failure(future: Future[Any]) -> None:
    error = future.exception()
    if error is not None:
        log.error("a posted engine command failed: %r", error)
