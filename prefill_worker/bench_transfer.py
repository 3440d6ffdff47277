"""The transfer term of the prefill benchmark: how long the last layer group's write of a
prompt takes, from posting it to the sender's WRITE_DONE (what a prefill worker waits for
before it returns the first token).

A receiver agent runs in a 'spawn'ed process with a cache of the worker's layout and polls
as a decode worker does (a NIXL write completes only once the receiver's worker has
progressed): woken by the write's announcement, then every `receiver_poll_s` until it landed.
The sender agent is registered on the benchmark engine's own cache (same layout as the prefill
worker's), so the write moves the same bytes between the same kind of caches, over the same
backend, as the cluster's last write of that prompt.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import threading
import time
from multiprocessing.connection import Connection

import numpy as np
import torch

from engine.engine_loop import IDLE_WAIT_S
from kv_transfer.base import EventKind, TransferConfig
from kv_transfer.registry import create_agent
from kv_transfer.spec import KVLayoutSpec

TOKEN = "prefill-bench-token"  # a private pair of agents on loopback
WRITE_TIMEOUT_S = 60.0  # a write not done by then fails the benchmark


def _receiver_main(conn: Connection, spec: KVLayoutSpec, num_blocks: int,
                   config: TransferConfig, poll_s: float) -> None:
    """Polls as a decode worker's engine thread does: every `poll_s` while a write is in
    flight, otherwise every `IDLE_WAIT_S` or when a sender's announcement wakes it."""
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    agent = create_agent(spec, config)
    agent.register_cache(torch.zeros(spec.dims(num_blocks), dtype=spec.torch_dtype,
                                     device=spec.torch_device))
    woken = threading.Event()
    agent.set_wakeup(woken.set)
    conn.send(agent.metadata())
    while not conn.poll(0):
        agent.poll()
        woken.wait(poll_s if agent.in_flight() else IDLE_WAIT_S)
        woken.clear()
    agent.close()


class LastGroupWrite:
    """Times one write of the last layer group of `num_blocks` blocks, as prefill posts it."""

    def __init__(self, spec: KVLayoutSpec, cache: torch.Tensor, backend: str,
                 receiver_poll_s: float) -> None:
        self.spec = spec
        config = TransferConfig(token=TOKEN, backend=backend)
        num_blocks = int(cache.shape[1])  # cache: [G, N, g, 2, bs, Hkv, D]
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_receiver_main, args=(child, spec, num_blocks, config,
                                                                   receiver_poll_s),
                                 daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(120):
            raise TimeoutError("the receiver process did not start within 120 s")
        self.sender = create_agent(spec, config)
        self.sender.register_cache(cache)
        self.peer = self.sender.connect(self._conn.recv())
        self._ids = itertools.count()

    def seconds(self, num_blocks: int) -> float:
        """Posts the write of layers [L - g, L) of blocks 0..num_blocks-1 into the receiver's
        blocks 0..num_blocks-1 and polls until it is done."""
        layers = range(self.spec.num_layers - self.spec.layer_group, self.spec.num_layers)
        blocks = np.arange(num_blocks)
        start = time.perf_counter()
        self.sender.write(self.peer, f"bench-{next(self._ids)}", blocks, blocks, layers,
                          last=True)
        deadline = time.monotonic() + WRITE_TIMEOUT_S
        while True:
            for event in self.sender.poll():
                event.raise_for_failure()
                if event.kind is EventKind.WRITE_DONE:
                    return time.perf_counter() - start
            if time.monotonic() > deadline:
                raise TimeoutError(f"a write of {num_blocks} blocks not done after "
                                   f"{WRITE_TIMEOUT_S} s")

    def close(self) -> None:
        self.sender.close()
        self._conn.send("stop")
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
