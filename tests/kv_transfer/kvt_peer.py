"""A real peer process for the KV transfer tests: an agent with its own cache in a 'spawn'ed
child, driven over a pipe. Between commands the child keeps calling `poll()` (so transfers
progress) and collects events; every command answer is awaited with a timeout."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

import torch

from kv_transfer import KVLayoutSpec, TransferConfig, TransferError, create_agent
from kv_transfer.spec import memory_of
from tests.support.device import device_under_test

TOKEN = "test-cluster-token"
# the caches live on TANDEM_TEST_DEVICE: DRAM here, VRAM in scripts/gpu_check.sh
_MEMORY, _DEVICE_ID = memory_of(device_under_test())
SPEC = KVLayoutSpec(model_name="tiny-llama", dtype="float32", num_layers=4, num_kv_heads=2,
                    head_dim=16, block_size=4, memory_type=_MEMORY, device_id=_DEVICE_ID)
# Short bounds so failures show up fast in tests; the deadline is long so a peer-loss test
# cannot pass by the deadline firing instead.
CONFIG = TransferConfig(token=TOKEN, connect_timeout_s=20.0, write_timeout_s=20.0,
                        request_timeout_s=30.0, heartbeat_interval_s=0.25, peer_timeout_s=3.0)


def random_cache(spec: KVLayoutSpec, num_blocks: int, seed: int) -> torch.Tensor:
    """[G, N, g, 2, bs, Hkv, D] of random values, reproducible from `seed`, on the spec's
    device."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(spec.dims(num_blocks), generator=g)  # drawn on the CPU: same bytes
    return values.to(device=spec.torch_device, dtype=spec.torch_dtype)


def peer_main(conn: Connection, spec: KVLayoutSpec, config: TransferConfig, num_blocks: int,
              seed: int) -> None:
    agent = create_agent(spec, config)
    cache = random_cache(spec, num_blocks, seed)  # [G, N, g, 2, bs, Hkv, D]
    agent.register_cache(cache)
    conn.send(("ready", agent.metadata(), agent.name))
    events: list[Any] = []
    stream: dict[str, Any] | None = None  # an endless layer-by-layer write (kill tests)
    while True:
        events += agent.poll()
        if stream is not None and len(agent._writes) < 2:
            stream["n"] += 1
            layer = stream["n"] % spec.num_layers
            try:
                agent.write(stream["peer"], stream["rid"], stream["src"], stream["dst"],
                            range(layer, layer + 1), last=False)
            except TransferError as e:
                events.append(("stream_error", e.reason.value))
                stream = None
        if not conn.poll(0.0005):
            continue
        cmd, *args = conn.recv()
        try:
            if cmd == "stop":
                agent.close()
                conn.send(("ok",))
                return
            conn.send(("ok", _handle(agent, cache, cmd, args, events)))
            if cmd == "stream":
                stream = {"peer": args[0], "rid": args[1], "src": args[2], "dst": args[3],
                          "n": -1}
        except TransferError as e:
            conn.send(("error", type(e).__name__, getattr(e, "field", None), e.reason.value,
                       str(e)))


def _handle(agent: Any, cache: torch.Tensor, cmd: str, args: list[Any],
            events: list[Any]) -> Any:
    if cmd == "connect":
        return agent.connect(args[0])
    if cmd == "write":  # args: [(peer, rid, src, dst, (lo, hi), last), ...]
        return [agent.write(p, rid, s, d, range(*lay), last=last)
                for p, rid, s, d, lay, last in args[0]]
    if cmd == "expect":
        return agent.expect(args[0], args[1])
    if cmd == "events":
        out = list(events)
        events.clear()
        return out
    if cmd == "cache":
        return cache.clone()
    if cmd == "stream":
        return None
    if cmd == "stats":
        return agent.stats.snapshot()
    raise ValueError(f"unknown command {cmd}")


class Peer:
    """The parent's handle on a peer process."""

    def __init__(self, backend: str, *, spec: KVLayoutSpec = SPEC, num_blocks: int = 64,
                 seed: int = 1, **config: Any) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        cfg = replace(CONFIG, backend=backend, **config)
        self.proc = ctx.Process(target=peer_main, args=(child, spec, cfg, num_blocks, seed),
                                daemon=True)
        self.proc.start()
        child.close()
        _, self.metadata, self.name = self._recv(60.0)
        self.spec, self.num_blocks, self.seed = spec, num_blocks, seed

    def call(self, cmd: str, *args: Any, timeout: float = 30.0) -> Any:
        self.conn.send((cmd, *args))
        reply = self._recv(timeout)
        if reply[0] == "error":
            raise PeerError(*reply[1:])
        return reply[1] if len(reply) > 1 else None

    def wait_events(self, want: int, timeout: float) -> list[Any]:
        """Collects events until `want` have arrived (or the timeout, then returns what came)."""
        got: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            got += self.call("events")
            time.sleep(0.01)
        return got

    def kill(self) -> None:
        if self.proc.pid is not None and self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def stop(self) -> None:
        with contextlib.suppress(PeerError, TimeoutError, OSError, EOFError):
            self.call("stop", timeout=15.0)
        self.proc.join(10)
        self.kill()

    def _recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer process gave no answer within {timeout} s")
        return self.conn.recv()


class PeerError(Exception):
    """A TransferError raised inside the peer process: (type name, field, reason, message)."""

    def __init__(self, type_name: str, field: str | None, reason: str, message: str) -> None:
        super().__init__(f"{type_name}[{field or reason}]: {message}")
        self.type_name, self.field, self.reason, self.message = type_name, field, reason, message
