"""An in-memory copy of the prefix index for the router, fed by tailing the workers' streams.

The design to measure against the plain pipelined lookup (`PrefixIndexReader`): `sync()` (one
round trip, the epoch and an XREAD of all followed workers, run by the router every few ms)
applies each worker's batches in order; `lookup()` then answers from memory, with no Redis
round trip on the request path.

Resync. A worker's snapshot is its `wblk:{worker}` set, which the writer changes atomically
with each stream entry (one Lua script per publish; a transaction replaces it whole on a
re-publish), so it is always the
state as of the stream's last entry. A worker is reloaded from it (`resyncs[reason]`):

    new       it is new to this tail (first sync, or it came back after being dropped)
    gap       its stream skipped a sequence number (the capped stream was trimmed past us, or
              entries were lost)
    restart   an entry of another incarnation: the worker's process restarted (its sequence
              numbers start again; its old entries are void)
    reset     the writer re-published its whole state (a failed publish, Redis lost it)
    epoch     Redis restarted empty or was flushed: every worker

Reload reads the stream's last id first and the set second; the entries between are replayed on
top, which is harmless because the stream entry and the set change of one batch are written in
one atomic command and replaying set adds and removes in order converges to the same state.

A worker not in the followed set (`sync(workers)`: the router passes the workers whose registry
heartbeat is live) is dropped from memory at once (`drops`), so a dead worker's blocks stop
attracting requests as soon as its heartbeat lapses; should it come back it is reloaded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any, cast

from redis.asyncio import Redis

from cluster.errors import IndexUnavailable
from engine.block_hash import BlockHash, hash_from_hex
from index.prefix_keys import PrefixKeys
from index.prefix_walk import PrefixWalk
from index.redis_client import RedisConfig, bounded

_Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry: (id, fields)
RESYNC_REASONS = ("new", "gap", "restart", "reset", "epoch")  # see the module doc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class PrefixIndexTail:
    """Follows a set of workers; `lookup` answers like `PrefixIndexReader.lookup`, in memory."""

    def __init__(self, redis: Redis, config: RedisConfig, *, read_count: int = 1000) -> None:
        self._redis = redis
        self._config = config
        self._keys = PrefixKeys(config.namespace)
        self._read_count = read_count
        self._holders: dict[BlockHash, set[str]] = {}
        self._blocks: dict[str, set[BlockHash]] = {}
        self._last_id: dict[str, bytes] = {}
        self._last_seq: dict[str, int] = {}
        self._incarnation: dict[str, bytes] = {}  # the writer's, from its latest entry
        self._epoch: bytes | None = None
        # Exported by the router (tandem_router_prefix_tail_{reloads,resyncs,drops,
        # sync_failures}_total) and in GetClusterStatus:
        self.resyncs: Counter[str] = Counter({reason: 0 for reason in RESYNC_REASONS})
        self.drops = 0  # workers dropped from memory: they left the followed set
        self.sync_failures = 0  # syncs Redis did not answer (the copy goes stale)

    @property
    def reloads(self) -> int:
        """Workers reloaded whole, for any reason."""
        return sum(self.resyncs.values())

    @property
    def workers(self) -> frozenset[str]:
        """The workers this tail holds entries of."""
        return frozenset(self._blocks)

    def blocks(self, worker: str) -> frozenset[BlockHash]:
        """The blocks this tail believes `worker` holds."""
        return frozenset(self._blocks.get(worker, ()))

    async def sync(self, workers: Collection[str]) -> None:
        """Catches up with the streams of `workers` (others are dropped).
        Raises IndexUnavailable; the copy is then stale and the router should degrade."""
        try:
            await self._sync(workers)
        except IndexUnavailable:
            self.sync_failures += 1
            raise

    async def _sync(self, workers: Collection[str]) -> None:
        timeout = self._config.op_timeout_s
        followed = set(workers)
        streams: dict[Any, Any] = {self._keys.events(w): self._last_id[w] for w in self._blocks
                                   if w in followed}
        replies: list[tuple[bytes, list[_Entry]]] = []
        async with bounded("tail read", timeout):
            if streams:  # one round trip: the epoch and every followed stream's new entries
                pipe = self._redis.pipeline(transaction=False)
                pipe.get(self._keys.epoch)
                pipe.xread(streams, count=self._read_count)
                epoch, replies = cast(Any, await pipe.execute())
            else:
                epoch = await self._redis.get(self._keys.epoch)
        first_load = "new"
        if epoch != self._epoch:
            first_load = "epoch" if self._epoch is not None or self._blocks else "new"
            for worker in list(self._blocks):
                self._drop(worker)
            self._epoch = epoch if isinstance(epoch, bytes) else None
            replies = []  # read from the streams of before: void
        for worker in set(self._blocks) - followed:
            self._drop(worker)
            self.drops += 1
        prefix = len(self._keys.events(""))
        for stream, entries in replies or ():
            worker = _text(stream)[prefix:]
            for entry_id, fields in entries:
                seq = int(fields[b"seq"])
                reason = self._resync_reason(worker, seq, fields)
                if reason is not None:
                    await self._reload(worker, reason)
                    break
                self._apply(worker, fields[b"ops"].decode())
                self._last_id[worker], self._last_seq[worker] = entry_id, seq
        for worker in followed - set(self._blocks):  # their entries from the next sync on
            await self._reload(worker, first_load)

    def lookup(self, hashes: Sequence[BlockHash],
               workers: Collection[str] | None = None) -> dict[str, int]:
        """Per worker, the number of leading blocks of `hashes` it holds (as of the last sync)."""
        walk = PrefixWalk(workers)
        for block_hash in hashes:
            if walk.over or not walk.step(self._holders.get(block_hash, ())):
                break
        return walk.result()

    def _resync_reason(self, worker: str, seq: int, fields: dict[bytes, bytes]) -> str | None:
        """Why this entry cannot be applied on top of what we hold (None: it can)."""
        if fields.get(b"inc", b"") != self._incarnation[worker]:
            return "restart"
        if b"reset" in fields:
            return "reset"
        if seq != self._last_seq[worker] + 1:
            return "gap"
        return None

    def _apply(self, worker: str, ops: str) -> None:
        held = self._blocks[worker]
        for op in ops.split(",") if ops else ():
            block_hash = hash_from_hex(op[1:])
            if op[0] == "+":
                held.add(block_hash)
                self._holders.setdefault(block_hash, set()).add(worker)
            else:
                held.discard(block_hash)
                self._forget(block_hash, worker)

    def _forget(self, block_hash: BlockHash, worker: str) -> None:
        holders = self._holders.get(block_hash)
        if holders is not None:
            holders.discard(worker)
            if not holders:
                del self._holders[block_hash]

    def _drop(self, worker: str) -> None:
        for block_hash in self._blocks.pop(worker, ()):
            self._forget(block_hash, worker)
        self._last_id.pop(worker, None)
        self._last_seq.pop(worker, None)
        self._incarnation.pop(worker, None)

    async def _reload(self, worker: str, reason: str) -> None:
        timeout = self._config.op_timeout_s
        async with bounded("tail reload", timeout):
            last: list[_Entry] = cast(
                Any, await self._redis.xrevrange(self._keys.events(worker), count=1))
            members = await self._redis.smembers(self._keys.worker_blocks(worker))
        self._drop(worker)
        self._blocks[worker] = {hash_from_hex(_text(h)) for h in members}
        for block_hash in self._blocks[worker]:
            self._holders.setdefault(block_hash, set()).add(worker)
        self._last_id[worker] = last[0][0] if last else b"0-0"
        self._last_seq[worker] = int(last[0][1][b"seq"]) if last else 0
        self._incarnation[worker] = last[0][1].get(b"inc", b"") if last else b""
        self.resyncs[reason] += 1
