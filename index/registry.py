"""The Redis worker registry: workers announce themselves with a heartbeat, the router lists
the live ones.

    {ns}:worker:{id}   hash   role, address, transfer metadata, load, timestamps; expires
                              `ttl_s` after the last heartbeat (the key's TTL decides liveness)
    {ns}:workers       set    ids ever registered; ids whose hash expired are pruned lazily

Every heartbeat rewrites the whole record and re-adds the id (one MULTI/EXEC), so a worker
reappears by itself after Redis restarted empty. Every call is bounded: Redis down raises
`IndexUnavailable`; the `Heartbeat` loop logs it and keeps trying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from cluster.errors import IndexUnavailable
from cluster.roles import Role
from index.redis_client import RedisConfig, bounded

logger = logging.getLogger(__name__)

_LOAD_FIELDS = ("running", "waiting", "kv_blocks_used", "kv_blocks_total",
                "queued_prompt_blocks", "max_running")


@dataclass(frozen=True)
class LoadReport:
    """A worker's load as it measures it (mirrors tandem.v1.WorkerLoad)."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    queued_prompt_blocks: int = 0  # prompt blocks accepted, not computed yet
    max_running: int = 0


@dataclass(frozen=True)
class WorkerRecord:
    """What the registry knows of one worker."""

    worker_id: str
    role: Role
    address: str  # gRPC host:port
    transfer_metadata: bytes = b""
    load: LoadReport = field(default_factory=LoadReport)
    started_unix_ms: int = 0
    updated_unix_ms: int = 0  # set by the registry on every heartbeat

    def __post_init__(self) -> None:
        if not self.worker_id or ":" in self.worker_id:
            raise ValueError(f"worker_id: must be non-empty without ':', got {self.worker_id!r}")


def _encode(record: WorkerRecord, now_ms: int) -> dict[str, bytes | str | int]:
    fields: dict[str, bytes | str | int] = {
        "role": record.role.value, "address": record.address,
        "transfer_metadata": record.transfer_metadata,
        "started_unix_ms": record.started_unix_ms, "updated_unix_ms": now_ms}
    fields.update({name: getattr(record.load, name) for name in _LOAD_FIELDS})
    return fields


def _decode(worker_id: str, raw: dict[bytes, bytes]) -> WorkerRecord:
    def text(name: str) -> str:
        return raw[name.encode()].decode()

    load = LoadReport(**{name: int(text(name)) for name in _LOAD_FIELDS})
    return WorkerRecord(worker_id=worker_id, role=Role(text("role")), address=text("address"),
                        transfer_metadata=raw[b"transfer_metadata"], load=load,
                        started_unix_ms=int(text("started_unix_ms")),
                        updated_unix_ms=int(text("updated_unix_ms")))


class WorkerRegistry:
    """Register, refresh, list and remove workers (see the module doc). The router's default
    `discovery.base.WorkerSource`."""

    authoritative = False  # Redis restarted empty lists no one until the workers re-register

    def __init__(self, redis: Redis, config: RedisConfig, ttl_s: float = 3.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: must be > 0, got {ttl_s}")
        self._redis = redis
        self._config = config
        self.ttl_s = ttl_s
        self._set_key = f"{config.namespace}:workers"
        # listings Redis did not answer; the router exports it
        # (tandem_router_registry_list_failures_total)
        self.list_failures = 0
        self.problem = ""  # why the last listing failed ("" once one succeeds)

    def _key(self, worker_id: str) -> str:
        return f"{self._config.namespace}:worker:{worker_id}"

    async def heartbeat(self, record: WorkerRecord) -> None:
        """Registers or refreshes `record` for another `ttl_s`. Raises IndexUnavailable."""
        key = self._key(record.worker_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(key)  # a full rewrite: no field of an older record survives
        pipe.hset(key, mapping=_encode(record, int(time.time() * 1000)))  # type: ignore[arg-type]
        pipe.pexpire(key, int(self.ttl_s * 1000))
        pipe.sadd(self._set_key, record.worker_id)
        async with bounded("heartbeat", self._config.op_timeout_s):
            await pipe.execute()

    async def deregister(self, worker_id: str) -> None:
        """Removes a worker at once (clean shutdown). Raises IndexUnavailable."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._key(worker_id))
        pipe.srem(self._set_key, worker_id)
        async with bounded("deregister", self._config.op_timeout_s):
            await pipe.execute()

    async def list_workers(self, role: Role | None = None) -> list[WorkerRecord]:
        """Live workers (heartbeat within `ttl_s`), sorted by id. Raises IndexUnavailable."""
        try:
            records = await self._list_workers(role)
        except IndexUnavailable as error:
            self.list_failures += 1
            self.problem = f"the worker registry (Redis) is unreachable: {error}"
            raise
        self.problem = ""
        return records

    async def start(self) -> None:
        """Nothing to start: every listing reads Redis (`WorkerSource`)."""

    async def close(self) -> None:
        """Nothing to close: the Redis client is the caller's (`WorkerSource`)."""

    async def _list_workers(self, role: Role | None) -> list[WorkerRecord]:
        async with bounded("list workers", self._config.op_timeout_s):
            ids = sorted(i.decode() if isinstance(i, bytes) else i
                         for i in await self._redis.smembers(self._set_key))
            pipe = self._redis.pipeline(transaction=False)
            for worker_id in ids:
                pipe.hgetall(self._key(worker_id))
            raws = await pipe.execute() if ids else []
            expired = [worker_id for worker_id, raw in zip(ids, raws, strict=True) if not raw]
            if expired:
                # A worker that heartbeats right now re-adds itself on its next beat.
                await self._redis.srem(self._set_key, *expired)
        records = [_decode(worker_id, raw) for worker_id, raw in zip(ids, raws, strict=True)
                   if raw]
        return [r for r in records if role is None or r.role is role]


class Heartbeat:
    """A worker's heartbeat loop: `await hb.start()` registers (raises if Redis is down),
    then refreshes every `ttl_s / 3` from `record()`; `await hb.stop()` deregisters."""

    def __init__(self, registry: WorkerRegistry, record: Callable[[], WorkerRecord]) -> None:
        self._registry = registry
        self._record = record
        self._task: asyncio.Task[None] | None = None
        # heartbeats that did not reach Redis; the worker exports it
        # (tandem_registry_heartbeat_failures_total)
        self.failures = 0

    async def start(self) -> None:
        await self._registry.heartbeat(self._record())
        self._task = asyncio.create_task(self._loop(), name="registry-heartbeat")

    async def _loop(self) -> None:
        interval = self._registry.ttl_s / 3
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                await self._registry.heartbeat(self._record())
                if failing:
                    logger.warning("registry: heartbeat reaches Redis again")
                failing = False
            except IndexUnavailable as exc:
                self.failures += 1
                if not failing:
                    logger.warning("registry: heartbeat failed: %s", exc)
                failing = True

    async def stop(self, deregister: bool = True) -> None:
        """Stops the loop and (by default) removes the worker; a Redis outage is logged."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if deregister:
            try:
                await self._registry.deregister(self._record().worker_id)
            except IndexUnavailable as exc:
                logger.warning("registry: deregister failed (the key expires anyway): %s", exc)
