"""Scriptable stand-ins for prefill and decode workers, served over real gRPC on loopback.

The router's contracts (what it retries, marks down, avoids, relays) depend on what workers
answer, and some answers (a transfer that keeps failing to one decode worker, NOT_FOUND in the
middle of a stream) are hard to provoke on demand in real workers. These fakes answer whatever a
test scripts, through the same protos and the same `cluster.grpc_server` as the real workers;
the real workers' own behaviour is covered by tests/e2e.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
from grpc import aio

from cluster.grpc_server import GrpcServer, ServiceBinding, start_server
from cluster.roles import Role
from engine.block_hash import DEFAULT_HASH_SEED
from index.registry import WorkerRecord, WorkerRegistry
from router.__main__ import build_router
from router.config import RouterConfig
from router.router import Router
from tandem_proto.tandem.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    worker_pb2_grpc,
)

FIRST_TOKEN = 7


def next_token(context_tokens: int) -> int:
    """A counting fake's "model": the token after a context of this many tokens, so a
    request re-prefilled elsewhere with its tokens so far continues as if undisturbed."""
    return 300 + context_tokens  # within the tiny tokenizer's vocabulary: real text


@dataclass
class Script:
    """What a fake decode worker does with a Decode stream."""

    tokens: int | None = 3  # tokens streamed after the first one (None: up to max_tokens)
    token_id: int | None = 100  # the id of each of them (None: `next_token` of the context)
    finish: common_pb2.FinishReason = common_pb2.FINISH_REASON_LENGTH
    fail_with: grpc.StatusCode | None = None  # abort after the tokens instead of finishing
    hold: bool = False  # after the tokens, wait until the request is cancelled


@dataclass
class FakeWorker(worker_pb2_grpc.WorkerServicer):
    """`tandem.v1.Worker`: a fixed status, and a record of every Cancel."""

    worker_id: str
    role: Role
    calls: Counter[str] = field(default_factory=Counter)
    cancelled: list[str] = field(default_factory=list)
    server: GrpcServer | None = None
    status_delay_s: float = 0.0  # how long Status takes to answer (a busy worker)

    async def Status(self, request: common_pb2.StatusRequest,
                     context: aio.ServicerContext) -> common_pb2.WorkerStatus:
        await asyncio.sleep(self.status_delay_s)
        role = (common_pb2.WORKER_ROLE_PREFILL if self.role is Role.PREFILL
                else common_pb2.WORKER_ROLE_DECODE)
        return common_pb2.WorkerStatus(
            worker_id=self.worker_id, role=role, address=self.address, compat_hash="same",
            block_size=16, hash_seed=DEFAULT_HASH_SEED,
            load=common_pb2.WorkerLoad(kv_blocks_total=1000, max_running=64))

    async def Cancel(self, request: common_pb2.CancelRequest,
                     context: aio.ServicerContext) -> common_pb2.CancelResponse:
        self.cancelled.append(request.request_id)
        self.on_cancel(request.request_id)
        return common_pb2.CancelResponse(found=True)

    def on_cancel(self, request_id: str) -> None:
        """What a cancel does besides being recorded."""

    @property
    def address(self) -> str:
        return self.server.address if self.server is not None else ""


@dataclass
class FakePrefill(FakeWorker, prefill_pb2_grpc.PrefillServicer):
    """Answers FIRST_TOKEN, or ABORTED ("KV transfer failed") for targets in `fail_to`."""

    fail_to: set[str] = field(default_factory=set)  # decode worker ids
    counting: bool = False  # answer next_token(prompt length) instead of FIRST_TOKEN
    delay_s: float = 0.0  # how long a Prefill takes (a hung worker: longer than its deadline)
    requests: list[prefill_pb2.PrefillRequest] = field(default_factory=list)

    async def Prefill(self, request: prefill_pb2.PrefillRequest,
                      context: aio.ServicerContext) -> prefill_pb2.PrefillResponse:
        decode_id = request.target.endpoint.worker_id
        self.calls[decode_id] += 1
        self.requests.append(request)
        await asyncio.sleep(self.delay_s)
        if decode_id in self.fail_to:
            await context.abort(grpc.StatusCode.ABORTED,
                                f"KV transfer to {decode_id} failed: peer_lost")
        first = next_token(len(request.token_ids)) if self.counting else FIRST_TOKEN
        return prefill_pb2.PrefillResponse(first_token_id=first,
                                           num_computed_tokens=len(request.token_ids))


@dataclass
class FakeDecode(FakeWorker, decode_pb2_grpc.DecodeServicer):
    """Reserves whatever is asked and streams as `script` says."""

    script: Script = field(default_factory=Script)
    # scripts for the next Decode calls, taken first (a list several fakes may share)
    plan: list[Script] = field(default_factory=list)
    reserves: dict[str, decode_pb2.ReserveRequest] = field(default_factory=dict)
    _held: dict[str, asyncio.Event] = field(default_factory=dict)

    async def Reserve(self, request: decode_pb2.ReserveRequest,
                      context: aio.ServicerContext) -> decode_pb2.ReserveResponse:
        self.calls["reserve"] += 1
        self.reserves[request.request_id] = request
        blocks = -(-len(request.token_ids) // 16)
        return decode_pb2.ReserveResponse(
            block_ids=list(range(blocks)),
            endpoint=common_pb2.TransferEndpoint(worker_id=self.worker_id, metadata=b"md"))

    async def Decode(self, request: decode_pb2.DecodeRequest,
                     context: aio.ServicerContext) -> AsyncIterator[decode_pb2.DecodeResponse]:
        self.calls["decode"] += 1
        script = self.plan.pop(0) if self.plan else self.script
        reserved = self.reserves[request.request_id]
        count = script.tokens if script.tokens is not None else reserved.sampling.max_tokens - 1
        for i in range(count):
            token = script.token_id if script.token_id is not None else \
                next_token(len(reserved.token_ids) + 1 + i)
            yield decode_pb2.DecodeResponse(token_ids=[token])
        if script.fail_with is not None:
            await context.abort(script.fail_with, "scripted failure")
        if script.hold:
            released = self._held.setdefault(request.request_id, asyncio.Event())
            await released.wait()
            yield decode_pb2.DecodeResponse(finish_reason=common_pb2.FINISH_REASON_CANCELLED)
            return
        yield decode_pb2.DecodeResponse(finish_reason=script.finish)

    def on_cancel(self, request_id: str) -> None:
        self._held.setdefault(request_id, asyncio.Event()).set()

    def holding(self) -> int:
        """Streams waiting for a cancel right now."""
        return sum(not event.is_set() for event in self._held.values())


async def serve(worker: FakePrefill | FakeDecode, registry: WorkerRegistry | None) -> None:
    """Starts `worker` on a loopback port and registers it as the real workers do (unless
    `registry` is None: found another way, e.g. as a pod by tests/discovery)."""
    bindings = [ServiceBinding("tandem.v1.Worker", worker_pb2_grpc.add_WorkerServicer_to_server,
                               worker)]
    if isinstance(worker, FakePrefill):
        bindings.append(ServiceBinding(
            "tandem.v1.Prefill", prefill_pb2_grpc.add_PrefillServicer_to_server, worker))
    else:
        bindings.append(ServiceBinding(
            "tandem.v1.Decode", decode_pb2_grpc.add_DecodeServicer_to_server, worker))
    worker.server = await start_server(bindings)
    if registry is not None:
        await registry.heartbeat(WorkerRecord(worker.worker_id, worker.role, worker.address))


@asynccontextmanager
async def router_over(config: RouterConfig, fakes: Sequence[FakePrefill | FakeDecode],
                      registry: WorkerRegistry) -> AsyncIterator[Router]:
    """Serves `fakes`, registered, and yields a router built from `config` once it sees them
    all live; on exit closes the router and stops the fakes."""
    for fake in fakes:
        await serve(fake, registry)
    router = await build_router(config)
    try:
        while len(router.pool.live(Role.PREFILL)) + len(router.pool.live(Role.DECODE)) < \
                len(fakes):
            await asyncio.sleep(0.02)
        yield router
    finally:
        await router.close()
        for fake in fakes:
            assert fake.server is not None
            await fake.server.stop(None)
