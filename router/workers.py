"""The router's view of the workers: found through a `WorkerSource` (the Redis registry, or the
Kubernetes API: `discovery`), watched over gRPC.

Every `refresh_interval_s` the pool lists the source (keeping its last known list while
the source is unreachable, so routing goes on in degraded mode) and asks each worker for its
`Status` (load, KV usage, compatibility hash, block size). A worker that fails a call or a
status poll is marked down for `worker_down_s` and is not routed to. Prefill/decode pairs whose
KV compatibility hashes differ are reported as pair errors and never chosen. Every call carries
the cluster secret's credential (`cluster.cluster_secret`), which the workers require.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc import aio

from cluster import cluster_secret
from cluster.errors import IndexUnavailable
from cluster.roles import Role
from discovery.base import WorkerSource
from observability.grpc_tracing import client_interceptors
from router.clients import ClientTimeouts, DecodeClient, PrefillClient, WorkerFailed
from router.config import RouterConfig
from router.load import WorkerLoad
from tandem_proto.tandem.v1 import common_pb2

log = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    """One worker: its channel, typed client and last status."""

    worker_id: str
    role: Role
    address: str
    channel: aio.Channel
    client: PrefillClient | DecodeClient
    status: common_pb2.WorkerStatus | None = None
    down_until: float = 0.0
    last_error: str = ""
    counters: dict[str, float] = field(default_factory=dict)
    missing_since: float | None = None  # when the registry stopped listing it
    status_misses: int = 0  # status polls in a row that ran out of time
    _load: tuple[common_pb2.WorkerStatus | None, WorkerLoad] | None = field(
        default=None, repr=False, compare=False)  # load(): the status it was read from

    @property
    def up(self) -> bool:
        return self.status is not None and time.monotonic() >= self.down_until

    def load(self) -> WorkerLoad:
        """The load of its last status (every request asks: kept until a new status comes; a
        status is replaced, never changed, by the polls)."""
        kept = self._load
        if kept is not None and kept[0] is self.status:
            return kept[1]
        load = self.status.load if self.status is not None else common_pb2.WorkerLoad()
        worker_load = WorkerLoad(
            worker_id=self.worker_id, role=self.role, running=load.running,
            waiting=load.waiting, kv_blocks_used=load.kv_blocks_used,
            kv_blocks_total=load.kv_blocks_total, max_running=load.max_running,
            queued_prompt_blocks=load.queued_prompt_blocks)
        self._load = (self.status, worker_load)
        return worker_load


class WorkerPool:
    """Live workers by role, refreshed in the background (periods, timeouts and the block
    size and hash seed workers must have: `config`)."""

    def __init__(self, registry: WorkerSource, config: RouterConfig) -> None:
        self.registry = registry
        self.config = config
        self.timeouts = ClientTimeouts(rpc_s=config.rpc_timeout_s,
                                       prefill_s=config.prefill_timeout_s,
                                       status_s=config.status_timeout_s,
                                       cleanup_s=config.cleanup_timeout_s)
        # every call to a worker carries the cluster secret's credential: passed by the
        # clients with each call (an interceptor would add a task per call); the channels
        # have interceptors only when tracing is on
        self._metadata = cluster_secret.call_metadata(
            cluster_secret.secret_or_dev(config.transfer_token, "router"))
        self._interceptors = client_interceptors()
        self.workers: dict[str, WorkerHandle] = {}
        # incompatible_pairs()'s answer and the workers it was computed from
        self._pairs: tuple[tuple[tuple[str, Role, str | None], ...],
                           dict[tuple[str, str], str]] | None = None
        self.on_removed: list[Callable[[str], None]] = []  # told the id of a worker that left
        self.registry_ok = True
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        await self.registry.start()
        await self.refresh()
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in self._closing:
            task.cancel()
        for handle in self.workers.values():
            await handle.channel.close()
        await self.registry.close()

    def prefill_client(self, worker_id: str) -> PrefillClient:
        client = self.workers[worker_id].client
        assert isinstance(client, PrefillClient), f"{worker_id} is not a prefill worker"
        return client

    def decode_client(self, worker_id: str) -> DecodeClient:
        client = self.workers[worker_id].client
        assert isinstance(client, DecodeClient), f"{worker_id} is not a decode worker"
        return client

    def live(self, role: Role) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.role is role and h.up and
                self._config_matches(h)]

    def listed(self) -> list[str]:
        """Workers the source lists now (for the registry: heartbeat within its TTL), whether
        or not they are up; those missing are kept in `workers` a while, not here."""
        return [h.worker_id for h in self.workers.values() if h.missing_since is None]

    def mark_down(self, worker_id: str, why: str) -> None:
        handle = self.workers.get(worker_id)
        if handle is not None:
            down_s = self.config.worker_down_s
            log.warning("worker %s marked down for %.0f s: %s", worker_id, down_s, why)
            handle.down_until = time.monotonic() + down_s
            handle.last_error = why

    def incompatible_pairs(self) -> dict[tuple[str, str], str]:
        """(prefill id, decode id) → why they cannot exchange KV. Every request asks: the
        answer is kept while the workers and their compatibility hashes stay the same."""
        key = tuple((h.worker_id, h.role, h.status.compat_hash if h.status else None)
                    for h in self.workers.values())
        kept = self._pairs
        if kept is not None and kept[0] == key:
            return dict(kept[1])
        pairs = self._incompatible_pairs()
        self._pairs = (key, pairs)
        return dict(pairs)

    def _incompatible_pairs(self) -> dict[tuple[str, str], str]:
        pairs: dict[tuple[str, str], str] = {}
        prefill = [h for h in self.workers.values() if h.role is Role.PREFILL and h.status]
        decode = [h for h in self.workers.values() if h.role is Role.DECODE and h.status]
        for p in prefill:
            for d in decode:
                assert p.status is not None and d.status is not None
                if p.status.compat_hash != d.status.compat_hash:
                    pairs[(p.worker_id, d.worker_id)] = layout_mismatch(p.status, d.status)
        return pairs

    def config_errors(self) -> dict[str, str]:
        """Workers whose block size or hash seed differs from the router's (never routed to)."""
        return {h.worker_id: h.last_error for h in self.workers.values()
                if h.status is not None and not self._config_matches(h)}

    def _config_matches(self, handle: WorkerHandle) -> bool:
        status = handle.status
        if status is None:
            return False
        want = self.config
        if status.worker_id and status.worker_id != handle.worker_id:
            # the prefix index is keyed by the id the worker publishes under
            handle.last_error = (f"the worker calls itself {status.worker_id!r}, discovery "
                                 f"found it as {handle.worker_id!r}: its worker_id must match")
            return False
        ok = status.block_size == want.block_size and status.hash_seed == want.hash_seed
        if not ok:
            handle.last_error = (f"block size {status.block_size} / hash seed {status.hash_seed}"
                                 f" differ from the router's {want.block_size} / "
                                 f"{want.hash_seed}")
        return ok

    async def refresh(self) -> None:
        try:
            records = await self.registry.list_workers()
            if not self.registry_ok:
                log.warning("worker registry reachable again")
            self.registry_ok = True
            listed = {r.worker_id for r in records}
            now = time.monotonic()
            for record in records:
                handle = self.workers.get(record.worker_id)
                if handle is None or handle.address != record.address:
                    self._add(record.worker_id, record.role, record.address)
                else:
                    handle.missing_since = None
            for worker_id, handle in list(self.workers.items()):
                if worker_id in listed:
                    continue
                # Missing from the registry: gone for good, or Redis restarted empty and the
                # worker has not re-registered yet. Keep it (routable while its status polls
                # succeed) until it has been missing for a while.
                handle.missing_since = handle.missing_since or now
                if (self.registry.authoritative
                        or now - handle.missing_since > self.config.worker_forget_after_s):
                    self._remove(worker_id)
        except IndexUnavailable as error:
            if self.registry_ok:
                log.warning("worker registry unreachable (%s): routing to the last known "
                            "workers", error)
            self.registry_ok = False
        await asyncio.gather(*(self._poll(h) for h in list(self.workers.values())))

    def _add(self, worker_id: str, role: Role, address: str) -> None:
        # mutual TLS (the router's certificate; the worker's checked against the cluster CA),
        # or plaintext when the config chose it
        channel = self.config.tls.channel(address, server_name=self.config.worker_tls_name,
                                          interceptors=self._interceptors)
        client = (PrefillClient if role is Role.PREFILL else DecodeClient)(
            worker_id, channel, self.timeouts, self._metadata)
        old = self.workers.get(worker_id)
        if old is not None:  # re-registered at a new address: the old channel is useless
            self._track(asyncio.ensure_future(self._close_later(old.channel)))
        self.workers[worker_id] = WorkerHandle(worker_id, role, address, channel, client)
        log.info("worker %s (%s) at %s joined", worker_id, role.value, address)

    def _track(self, task: asyncio.Future[None]) -> None:
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _remove(self, worker_id: str) -> None:
        handle = self.workers.pop(worker_id)
        log.info("worker %s left the registry", worker_id)
        for listener in self.on_removed:
            listener(worker_id)
        # calls still running on the channel finish or fail on their own deadlines
        self._track(asyncio.ensure_future(self._close_later(handle.channel)))

    async def _poll(self, handle: WorkerHandle) -> None:
        try:
            status = await handle.client.status()
        except WorkerFailed as error:
            # Refused: the worker is gone. Too slow: it may only be busy (a long prefill
            # starving its event loop of CPU), so only a run of misses takes it out.
            handle.status_misses += error.code is grpc.StatusCode.DEADLINE_EXCEEDED
            unreachable = (error.code is not grpc.StatusCode.DEADLINE_EXCEEDED
                           or handle.status_misses >= self.config.status_misses_before_down)
            if unreachable and handle.status is not None \
                    and time.monotonic() >= handle.down_until:
                self.mark_down(handle.worker_id, f"status poll failed: {error.code.name}"
                               + (f" ({handle.status_misses} in a row)"
                                  if handle.status_misses > 1 else ""))
            return
        handle.status_misses = 0
        handle.status = status
        handle.counters = dict(status.counters)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("refreshing workers")

    async def _close_later(self, channel: aio.Channel) -> None:
        await asyncio.sleep(self.config.channel_close_delay_s)
        await channel.close()


def layout_mismatch(prefill: common_pb2.WorkerStatus, decode: common_pb2.WorkerStatus) -> str:
    """Why two workers' KV layouts differ, naming the fields (prefill's value first)."""
    p, d = prefill.kv_layout, decode.kv_layout
    fields = [f"{name} {p.get(name, '?')} vs {d.get(name, '?')}"
              for name in sorted(set(p) | set(d)) if p.get(name) != d.get(name)]
    detail = ", ".join(fields) or (
        f"compat hash {prefill.compat_hash[:12]} vs {decode.compat_hash[:12]}")
    return f"KV layouts differ: {detail}"
