"""The Redis prefix index: workers publish which block hashes they hold, the router looks up
which worker holds the longest prefix of a prompt.

Writer (one per worker). The engine reports `stored(hashes)` / `evicted(hashes)` synchronously
(no I/O, on the event loop); `flush()` publishes everything pending as one atomic command (a
Lua script, `index.prefix_publish`): per block hash the set of its holders (`blk:{hash}`, what
cold lookups read), the worker's own set of hashes (`wblk:{worker}`, for resync and cleanup),
and one entry per batch of at most `max_batch` events on the worker's capped stream
(`events:{worker}`) with a per-worker sequence number and the writer's incarnation (a random id
per writer, i.e. per worker process), so readers that tail the streams see the events in order
and can spot a gap or a restarted worker. The `run()` loop sleeps until an event arrives (or the
next epoch check is due), publishes at once, and then publishes at most once per
`flush_interval_s`, so a busy worker's events are batched and an idle one does not wake. The
writer keeps its whole state in memory, so it can always re-publish it:

- at start (this also wipes what a crashed predecessor with the same id left behind),
- after a failed publish (we cannot know what reached Redis),
- when the epoch key (`{ns}:epoch`, read in every batch and checked by `run()` every second)
  is missing or changed: Redis restarted empty or was flushed. The first writer to notice
  creates a new epoch; every writer whose epoch differs re-publishes.

A re-publish puts a `reset` entry on the stream: tailing readers reload that worker's set.

Reader (the router). `lookup(hashes)` returns, per worker, how many *leading* blocks of the
prompt it holds. Hashes are chained, so a match is always a contiguous prefix: the lookup
pipelines `SMEMBERS blk:{hash}` in growing chunks (16, 32, ... 256 hashes per round trip) and
stops after the first chunk where no worker is left holding every block so far. A miss on the
first block costs one round trip; a 4,000-block hit costs ~5.

Every Redis operation is bounded (`index.redis_client.bounded`): Redis down means
`IndexUnavailable` within the configured timeout, which the router turns into degraded mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Collection, Iterable, Sequence

from redis.asyncio import Redis

from cluster.errors import IndexUnavailable
from engine.block_hash import BlockHash, hash_to_hex
from index.prefix_keys import PrefixKeys
from index.prefix_publish import MAX_BATCH, BatchPublisher
from index.prefix_walk import PrefixWalk
from index.redis_client import RedisConfig, bounded

logger = logging.getLogger(__name__)

_STREAM_TTL_AFTER_REMOVE_MS = 60_000  # readers have a minute to see a removed worker's reset


def _as_bytes(value: bytes | str | None) -> bytes | None:
    """Our clients never decode responses; this only narrows redis-py's declared types."""
    return value.encode() if isinstance(value, str) else value


def _as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class PrefixIndexWriter:
    """Publishes one worker's block events, in order and in batches (see the module doc)."""

    def __init__(self, redis: Redis, config: RedisConfig, worker_id: str, *,
                 max_batch: int = 512, stream_maxlen: int = 10_000) -> None:
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch: must be in [1, {MAX_BATCH}], got {max_batch}")
        self.worker_id = worker_id
        self._redis = redis
        self._config = config
        self._keys = PrefixKeys(config.namespace)
        self._max_batch = max_batch
        self._stream_maxlen = stream_maxlen
        self._held: set[str] = set()  # hash hexes this worker holds: the truth to re-publish
        self._pending: list[str] = []  # "+hash hex" (stored) or "-hash hex", in event order
        self._seq = 0
        # this process's life: a restarted worker (same id, new process) has another, so a
        # reader knows its earlier entries and sequence numbers are void
        self.incarnation = uuid.uuid4().hex[:16]
        self._publisher = BatchPublisher(redis, self._keys, worker_id, self.incarnation,
                                         stream_maxlen)
        self._events = asyncio.Event()  # set by each event: wakes `run()`
        self._epoch: bytes | None = None
        self._dirty = True  # Redis may not hold our state: re-publish before the next batch
        self._lock = asyncio.Lock()
        # Exported by the worker (tandem_prefix_index_{republishes,publish_failures}_total):
        self.republishes = 0  # full-state publishes: at start, then each means Redis lost
        # (or may have lost) this worker's state
        self.publish_failures = 0  # publishes, re-publishes and epoch checks Redis did not
        # answer (while it is down, `run()` fails one every `retry_interval_s`)

    # -- event intake (called by the engine; never blocks) -------------------------------

    def stored(self, hashes: Iterable[BlockHash]) -> None:
        """Blocks became complete in this worker's prefix cache."""
        self._record(True, hashes)

    def evicted(self, hashes: Iterable[BlockHash]) -> None:
        """Blocks left this worker's prefix cache."""
        self._record(False, hashes)

    def _record(self, stored: bool, hashes: Iterable[BlockHash]) -> None:
        # While dirty and idle, the next re-publish snapshots `_held` anyway: keeping the events
        # would only grow the queue during an outage. Under the lock, a publish is in flight
        # and has already taken its snapshot, so the events must be kept.
        keep = not self._dirty or self._lock.locked()
        sign = "+" if stored else "-"
        for block_hash in hashes:
            hex_hash = hash_to_hex(block_hash)
            if stored:
                self._held.add(hex_hash)
            else:
                self._held.discard(hex_hash)
            if keep:
                self._pending.append(sign + hex_hash)
        self._events.set()

    @property
    def held(self) -> frozenset[BlockHash]:
        return frozenset(BlockHash(int(h, 16)) for h in self._held)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def seq(self) -> int:
        """Sequence number of the last batch put on the stream."""
        return self._seq

    # -- publishing -------------------------------------------------------------------------

    async def start(self) -> None:
        """Publishes the full state (empty at start), replacing any stale one for this id."""
        async with self._lock:
            await self._republish()

    async def flush(self) -> int:
        """Publishes the pending events; returns how many. Raises IndexUnavailable."""
        async with self._lock:
            if self._dirty:
                count = len(self._pending)
                await self._republish()
                return count
            ops, self._pending = self._pending, []
            if not ops:
                return 0
            try:
                epoch = await self._publish(ops)
            except IndexUnavailable:
                self._dirty = True
                self.publish_failures += 1
                raise
            if epoch != self._epoch:
                logger.warning("prefix index: epoch changed (%r -> %r): Redis lost its state; "
                               "re-publishing %d blocks of %s", self._epoch, epoch,
                               len(self._held), self.worker_id)
                await self._republish()
            return len(ops)

    async def check_epoch(self) -> bool:
        """Re-publishes if Redis lost its state (or an earlier publish failed). Returns whether
        it re-published. Raises IndexUnavailable."""
        async with self._lock:
            if not self._dirty:
                try:
                    async with bounded("get epoch", self._config.op_timeout_s):
                        epoch = _as_bytes(await self._redis.get(self._keys.epoch))
                except IndexUnavailable:
                    self.publish_failures += 1
                    raise
                if epoch == self._epoch:
                    return False
                logger.warning("prefix index: epoch %r gone (now %r); re-publishing %s",
                               self._epoch, epoch, self.worker_id)
            await self._republish()
            return True

    async def remove(self) -> None:
        """Takes this worker out of the index (clean shutdown). Raises IndexUnavailable."""
        async with self._lock:
            self._held.clear()
            self._pending.clear()
            await self._republish()
            async with bounded("expire stream", self._config.op_timeout_s):
                await self._redis.pexpire(self._keys.events(self.worker_id),
                                          _STREAM_TTL_AFTER_REMOVE_MS)

    async def run(self, flush_interval_s: float = 0.02,
                  epoch_check_interval_s: float = 1.0, retry_interval_s: float = 0.5) -> None:
        """Publishes forever (cancel the task to stop); Redis failures are logged, not raised.

        Sleeps until an event arrives or the next epoch check is due; publishes at most once
        per `flush_interval_s` (events arriving meanwhile wait for the next publish, in one
        batch). While Redis is failing, every try is a real round trip (an epoch check, which
        re-publishes once Redis answers), spaced `retry_interval_s` apart, so that "reachable
        again" is only logged when Redis really answered.
        """
        last_check = time.monotonic()
        failing = False
        while True:
            self._events.clear()  # what arrives from here on is published next time round
            published = 0
            try:
                if failing or self._dirty or \
                        time.monotonic() - last_check >= epoch_check_interval_s:
                    last_check = time.monotonic()
                    await self.check_epoch()
                published = await self.flush()
                if failing:
                    logger.warning("prefix index: Redis reachable again for %s", self.worker_id)
                failing = False
            except IndexUnavailable as exc:
                if not failing:
                    logger.warning("prefix index: cannot publish for %s: %s", self.worker_id, exc)
                failing = True
            if failing:
                await asyncio.sleep(retry_interval_s)
                continue
            if published:
                await asyncio.sleep(flush_interval_s)  # what comes meanwhile: one batch
            if not self._events.is_set():
                wait_s = last_check + epoch_check_interval_s - time.monotonic()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait_s, 0.0)):
                        await self._events.wait()

    async def _publish(self, ops: Sequence[str]) -> bytes | None:
        """One atomic command: the epoch read, the set updates and one stream entry per batch
        (`index.prefix_publish`)."""
        batches = []
        for start in range(0, len(ops), self._max_batch):
            self._seq += 1
            batches.append((self._seq, ",".join(ops[start:start + self._max_batch])))
        # Like a re-publish, a big flush (a long prompt's blocks) gets more time.
        async with bounded("publish", self._config.op_timeout_s + len(ops) / 50_000):
            epoch = await self._publisher.publish(self._epoch, batches)
        return _as_bytes(epoch)

    async def _ensure_epoch(self) -> bytes:
        async with bounded("epoch", self._config.op_timeout_s):
            epoch = _as_bytes(await self._redis.get(self._keys.epoch))
            if epoch is None:
                await self._redis.set(self._keys.epoch, uuid.uuid4().hex, nx=True)
                epoch = _as_bytes(await self._redis.get(self._keys.epoch))
        if epoch is None:
            raise IndexUnavailable("redis epoch: vanished right after being set")
        return epoch

    async def _republish(self) -> None:
        """Replaces this worker's whole published state with `_held` (caller holds the lock)."""
        self._dirty = True
        keys, worker = self._keys, self.worker_id
        try:
            epoch = await self._ensure_epoch()
            async with bounded("read own blocks", self._config.op_timeout_s):
                old = {_as_str(h) for h in await self._redis.smembers(keys.worker_blocks(worker))}
            held, self._pending = set(self._held), []  # snapshot: later events stay pending
            pipe = self._redis.pipeline(transaction=True)
            for hex_hash in old - held:
                pipe.srem(keys.block(hex_hash), worker)
            pipe.delete(keys.worker_blocks(worker))
            ordered = sorted(held)
            for start in range(0, len(ordered), 4096):
                pipe.sadd(keys.worker_blocks(worker), *ordered[start:start + 4096])
            for hex_hash in held - old:
                pipe.sadd(keys.block(hex_hash), worker)
            self._seq += 1
            pipe.xadd(keys.events(worker), {"seq": self._seq, "epoch": epoch,
                                            "inc": self.incarnation, "reset": 1},
                      maxlen=self._stream_maxlen, approximate=True)
            pipe.persist(keys.events(worker))
            # A big state takes longer to send: 1 s more per ~50k blocks.
            timeout = self._config.op_timeout_s + len(held) / 50_000
            async with bounded("republish", timeout):
                await pipe.execute()
        except IndexUnavailable:
            self.publish_failures += 1
            logger.warning("prefix index: re-publish of %s failed; will retry", worker)
            raise
        self._epoch = epoch
        self._dirty = False
        self.republishes += 1
        logger.info("prefix index: published full state of %s (%d blocks, epoch %s)",
                    worker, len(held), epoch.decode())


class PrefixIndexReader:
    """Longest-prefix lookups for the router (see the module doc)."""

    def __init__(self, redis: Redis, config: RedisConfig, *, first_chunk: int = 16,
                 max_chunk: int = 256) -> None:
        if not 1 <= first_chunk <= max_chunk:
            raise ValueError(f"first_chunk: must be in [1, max_chunk], got {first_chunk}")
        self._redis = redis
        self._config = config
        self._keys = PrefixKeys(config.namespace)
        self._first_chunk = first_chunk
        self._max_chunk = max_chunk
        self.round_trips = 0  # total, for tests

    async def lookup(self, hashes: Sequence[BlockHash],
                     workers: Collection[str] | None = None) -> dict[str, int]:
        """Per worker, the number of leading blocks of `hashes` it holds (only workers with at
        least one); `workers` restricts the answer to those (e.g. the live ones).
        Raises IndexUnavailable."""
        walk = PrefixWalk(workers)
        start, chunk = 0, self._first_chunk
        while start < len(hashes) and not walk.over:
            part = hashes[start:start + chunk]
            pipe = self._redis.pipeline(transaction=False)
            for block_hash in part:
                pipe.smembers(self._keys.block(hash_to_hex(block_hash)))
            async with bounded("lookup", self._config.op_timeout_s):
                holders_per_block = await pipe.execute()
            self.round_trips += 1
            for holders in holders_per_block:
                if not walk.step(_as_str(w) for w in holders):
                    break
            start += len(part)
            chunk = min(chunk * 2, self._max_chunk)
        return walk.result()

    async def close(self) -> None:
        """Nothing runs in the background; the Redis client is the caller's."""

    async def epoch(self) -> bytes | None:
        """The index's current epoch (None: Redis holds no index). Raises IndexUnavailable."""
        async with bounded("get epoch", self._config.op_timeout_s):
            return _as_bytes(await self._redis.get(self._keys.epoch))

    async def worker_blocks(self, worker_id: str) -> set[BlockHash]:
        """Every block one worker has published. Raises IndexUnavailable."""
        async with bounded("read worker blocks", self._config.op_timeout_s):
            members = await self._redis.smembers(self._keys.worker_blocks(worker_id))
        return {BlockHash(int(_as_str(h), 16)) for h in members}
