"""An instant Tandem worker: a prefill or decode worker with no engine and no KV transfer.

    python loadtest/scripts/instant_worker.py --role decode --worker-id decode-1 \
        --listen 127.0.0.1:0 --redis-url redis://127.0.0.1:6379 [--no-prefix-events]

A stand-in for the router's bench, as `instant_backend.py` is for the HTTP routers: no real
worker is instant (a zero-cost sim worker still runs an engine thread, a block manager and a
KV transfer per request, ~8 ms of CPU per request on this machine), so the router's own cost is
only isolated in front of workers that answer at once. It speaks the real protocol
(`tandem_proto`: `tandem.v1.Decode`, `Prefill`, `Worker`) on the same gRPC server stack as a
real worker (`cluster.grpc_server`: error mapping, health, reflection; the internal services
require the cluster secret's credential), registers in the Redis registry with the real
heartbeat, and answers:

- `Reserve`: the blocks the prompt needs, after those it "holds" (the leading prompt blocks
  seen in an earlier Reserve or Prefill here, as a real worker's prefix cache would);
- `Prefill`: one fixed token (`TOKEN`) at once, nothing written anywhere;
- the `Decode` stream: the finish reason at once (`length`: the one token was the last; a
  stream opened without a first token gets `TOKEN` with it). Whatever `max_tokens` says,
  every request is one token long;
- `Status`, `Cancel` as a worker does (its load: none running, never full: a handler never
  awaits, so no request is ever in one while another is served).

With a Redis URL it publishes the prompt blocks of every Reserve and Prefill to the prefix
index through the workers' own `PrefixIndexWriter` (unless `--no-prefix-events`), so a
`kv_aware` router tails a stream as busy as a real cluster's.

It also serves `tandem.v1.Router/Generate` (one message: `TOKEN` and its finish reason, no
credential), so a load client can call it directly: the one-hop baseline that the router's
added latency is measured against. Plaintext only; the flags `cli.local_cluster` passes every
worker and that mean nothing here (`--model`, `--transfer-port`, ...) are accepted and ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from grpc import aio
from prometheus_client import CollectorRegistry

from cluster import cluster_secret
from cluster.grpc_server import ServiceBinding
from cluster.process import ProcessOptions, serve_until_stopped
from cluster.roles import Role
from cluster.tls import PLAINTEXT
from engine.block_hash import DEFAULT_HASH_SEED, BlockHash, hash_prompt_blocks
from index.prefix_index import PrefixIndexWriter
from index.redis_client import RedisConfig, connect
from index.registry import Heartbeat, LoadReport, WorkerRecord, WorkerRegistry
from kv_transfer.handshake import PROTOCOL_VERSION
from tandem_proto.tandem.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    worker_pb2_grpc,
)

log = logging.getLogger("instant_worker")

TOKEN = 1000  # the one token of every request: an ordinary word piece, no special token
NUM_BLOCKS = 1 << 20  # what it reports as its KV capacity: never full
COMPAT_HASH = "instant"  # every instant worker's: any prefill may "send" to any decode
ROLE_PB = {Role.PREFILL: common_pb2.WORKER_ROLE_PREFILL, Role.DECODE: common_pb2.WORKER_ROLE_DECODE}


class InstantWorker:
    """What the services share: the worker's identity, the blocks it holds, its load."""

    def __init__(self, worker_id: str, role: Role, block_size: int, hash_seed: int) -> None:
        self.worker_id = worker_id
        self.role = role
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.address = ""
        self.writer: PrefixIndexWriter | None = None
        self.held: set[BlockHash] = set()
        self.requests = 0

    def take(self, token_ids: Sequence[int], cache_salt: str | None) -> tuple[int, int]:
        """(leading prompt blocks already held, blocks the prompt needs); holds them all from
        now on, published as a worker's "stored" events are."""
        self.requests += 1
        hashes = hash_prompt_blocks(token_ids, self.block_size,
                                    (cache_salt or "").encode(), self.hash_seed)
        cached = 0
        while cached < len(hashes) and hashes[cached] in self.held:
            cached += 1
        cached = min(cached, max(len(token_ids) - 1, 0) // self.block_size)  # last token computed
        new = [h for h in hashes if h not in self.held]
        if new:
            self.held.update(new)
            if self.writer is not None:
                self.writer.stored(new)
        return cached, -(-len(token_ids) // self.block_size)

    def status(self) -> common_pb2.WorkerStatus:
        return common_pb2.WorkerStatus(
            worker_id=self.worker_id, role=ROLE_PB[self.role], address=self.address,
            load=common_pb2.WorkerLoad(kv_blocks_used=len(self.held),
                                       kv_blocks_total=NUM_BLOCKS, max_running=1 << 16),
            load_unix_ms=int(time.time() * 1000), publishes_prefix_events=self.writer is not None,
            counters={"requests": self.requests},
            compat_hash=COMPAT_HASH, block_size=self.block_size, hash_seed=self.hash_seed)

    def record(self) -> WorkerRecord:
        return WorkerRecord(worker_id=self.worker_id, role=self.role, address=self.address,
                            transfer_metadata=b"instant",
                            load=LoadReport(kv_blocks_total=NUM_BLOCKS),
                            started_unix_ms=int(time.time() * 1000))


class InstantDecode(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: InstantWorker) -> None:
        self.worker = worker

    async def Reserve(self, request: decode_pb2.ReserveRequest,
                      context: aio.ServicerContext) -> decode_pb2.ReserveResponse:
        salt = request.cache_salt if request.HasField("cache_salt") else None
        cached, blocks = self.worker.take(request.token_ids, salt)
        expires_ms = int(time.time() * 1000) + (request.lease_ms or 30_000)
        return decode_pb2.ReserveResponse(
            block_ids=range(cached, blocks), num_cached_blocks=cached,
            num_cached_tokens=cached * self.worker.block_size,
            endpoint=common_pb2.TransferEndpoint(
                worker_id=self.worker.worker_id, metadata=b"instant", compat_hash=COMPAT_HASH,
                handshake_version=PROTOCOL_VERSION),
            lease_expires_unix_ms=expires_ms,
            grant=common_pb2.TransferGrant(expires_unix_ms=expires_ms))

    async def Decode(self, request: decode_pb2.DecodeRequest,
                     context: aio.ServicerContext) -> AsyncIterator[decode_pb2.DecodeResponse]:
        tokens = [] if request.HasField("first_token_id") else [TOKEN]
        yield decode_pb2.DecodeResponse(token_ids=tokens,
                                        finish_reason=common_pb2.FINISH_REASON_LENGTH)


class InstantPrefill(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: InstantWorker) -> None:
        self.worker = worker

    async def Prefill(self, request: prefill_pb2.PrefillRequest,
                      context: aio.ServicerContext) -> prefill_pb2.PrefillResponse:
        salt = request.cache_salt if request.HasField("cache_salt") else None
        cached, _ = self.worker.take(request.token_ids, salt)
        cached_tokens = cached * self.worker.block_size
        return prefill_pb2.PrefillResponse(
            first_token_id=TOKEN, num_computed_tokens=len(request.token_ids) - cached_tokens,
            num_cached_tokens=cached_tokens, num_blocks_sent=len(request.target.block_ids))


class InstantStatus(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker: InstantWorker) -> None:
        self.worker = worker

    async def Status(self, request: common_pb2.StatusRequest,
                     context: aio.ServicerContext) -> common_pb2.WorkerStatus:
        return self.worker.status()

    async def Cancel(self, request: common_pb2.CancelRequest,
                     context: aio.ServicerContext) -> common_pb2.CancelResponse:
        return common_pb2.CancelResponse(found=False)  # it never holds anything


class DirectRouter(router_pb2_grpc.RouterServicer):
    """The one-hop baseline: a client's Generate answered here at once, as the router answers
    it (`TOKEN` with its finish reason and usage), with no router in between."""

    async def Generate(self, request: router_pb2.GenerateRequest,
                       context: aio.ServicerContext,
                       ) -> AsyncIterator[router_pb2.GenerateResponse]:
        request_id = request.request_id if request.HasField("request_id") else uuid.uuid4().hex
        yield router_pb2.GenerateResponse(
            request_id=request_id, token_ids=[TOKEN],
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=len(request.token_ids), completion_tokens=1))

    async def GetClusterStatus(self, request: router_pb2.GetClusterStatusRequest,
                               context: aio.ServicerContext,
                               ) -> router_pb2.GetClusterStatusResponse:
        return router_pb2.GetClusterStatusResponse(policy="direct")


def services(worker: InstantWorker) -> list[ServiceBinding]:
    bindings = [ServiceBinding("tandem.v1.Worker", worker_pb2_grpc.add_WorkerServicer_to_server,
                               InstantStatus(worker))]
    if worker.role is Role.DECODE:
        bindings += [
            ServiceBinding("tandem.v1.Decode", decode_pb2_grpc.add_DecodeServicer_to_server,
                           InstantDecode(worker)),
            ServiceBinding("tandem.v1.Router", router_pb2_grpc.add_RouterServicer_to_server,
                           DirectRouter())]
    else:
        bindings.append(ServiceBinding(
            "tandem.v1.Prefill", prefill_pb2_grpc.add_PrefillServicer_to_server,
            InstantPrefill(worker)))
    return bindings


async def serve(args: argparse.Namespace) -> None:
    worker = InstantWorker(args.worker_id, Role(args.role), args.block_size, args.hash_seed)
    redis_url = args.redis_url or os.environ.get("TANDEM_REDIS_URL")
    heartbeat: Heartbeat | None = None

    async def started(address: str) -> None:
        nonlocal heartbeat
        worker.address = address
        if redis_url:
            redis_cfg = RedisConfig(url=redis_url, op_timeout_s=args.redis_op_timeout_s)
            redis = connect(redis_cfg)
            if args.prefix_events:
                worker.writer = PrefixIndexWriter(redis, redis_cfg, worker.worker_id)
                tasks.append(asyncio.create_task(run_writer(worker.writer)))
            heartbeat = Heartbeat(WorkerRegistry(redis, redis_cfg, ttl_s=args.heartbeat_ttl_s),
                                  worker.record)
            await heartbeat.start()

    async def stopping() -> None:
        if heartbeat is not None:
            await heartbeat.stop(deregister=True)
        for task in tasks:
            task.cancel()

    tasks: list[asyncio.Task[None]] = []
    secret = cluster_secret.secret_or_dev(args.transfer_token, worker.worker_id)
    await serve_until_stopped(services(worker), ProcessOptions(
        name=f"instant {worker.role.value} worker {worker.worker_id}", listen=args.listen,
        metrics_registry=CollectorRegistry(), grace_s=1.0, on_started=started,
        on_stopping=stopping, interceptors=[cluster_secret.server_interceptor(secret)],
        tls=PLAINTEXT))


async def run_writer(writer: PrefixIndexWriter) -> None:
    """As a worker runs its index writer: Redis down at the start is retried by `run()`."""
    try:
        await writer.start()
    except Exception as error:
        log.warning("prefix index unavailable at start (%s); will re-publish", error)
    await writer.run()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["prefill", "decode"], required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--redis-url", help="default: TANDEM_REDIS_URL; none: no registry")
    parser.add_argument("--block-size", type=int, default=16, help="the router's")
    parser.add_argument("--hash-seed", type=int, default=DEFAULT_HASH_SEED, help="the router's")
    parser.add_argument("--heartbeat-ttl-s", type=float, default=3.0)
    parser.add_argument("--redis-op-timeout-s", type=float, default=2.0,
                        help="bound on one Redis call (a worker's default is 0.5 s; a bench "
                             "machine with 32 of these starting is often busier)")
    parser.add_argument("--transfer-token", default=os.environ.get("TANDEM_TRANSFER_TOKEN"),
                        help="the cluster secret (default: TANDEM_TRANSFER_TOKEN, else the "
                             "local development secret)")
    parser.add_argument("--no-prefix-events", dest="prefix_events", action="store_false",
                        help="publish nothing to the prefix index")
    for ignored in ("--model", "--metrics-listen", "--transfer-port", "--num-threads"):
        parser.add_argument(ignored, help="ignored (cli.local_cluster passes it)")
    parser.add_argument("--insecure-plaintext", action="store_true",
                        help="ignored: plaintext is the only choice here")
    return parser.parse_args(argv)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(parse_args()))


if __name__ == "__main__":
    main()
