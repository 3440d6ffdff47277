"""The prefix-index writer's publish as one Redis command: a Lua script applies a flush's
batches atomically, as the MULTI/EXEC transaction it replaces did.

Per batch it updates `blk:{hash}` and `wblk:{worker}` (the last event per hash wins) and adds
the batch's stream entry, in the order of the batches; it returns the epoch key's value as read
before any of it. A script runs atomically, so a reader sees all of a flush or none of it (the
router's tail relies on `wblk:` changing together with each stream entry, see
`index.prefix_tail`). The client sends one command whose arguments are the batches' `ops`
strings (the text the stream carries anyway), instead of one command per block hash: that per
command work (building, packing, parsing a reply) was most of a worker's publishing CPU.

The script touches `blk:` keys it is not given in KEYS: fine on a standalone Redis, which is
what the index uses (the transaction it replaces spanned the same keys, which Redis Cluster
refuses too).
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from index.prefix_keys import PrefixKeys

# KEYS: epoch, wblk:{worker}, events:{worker}
# ARGV: blk: key prefix, worker, incarnation, stream maxlen, epoch field, then per batch
#       seq and ops ("+hex,-hex,...", in event order)
PUBLISH_LUA = """
local prefix, worker, inc, maxlen, epoch_field = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local epoch = redis.call('GET', KEYS[1])
for i = 6, #ARGV, 2 do
  local seq, ops = ARGV[i], ARGV[i + 1]
  local last, order = {}, {}
  for op in string.gmatch(ops, '[^,]+') do
    local hash = string.sub(op, 2)
    if last[hash] == nil then order[#order + 1] = hash end
    last[hash] = string.sub(op, 1, 1)
  end
  local added, removed = {}, {}
  for _, hash in ipairs(order) do
    if last[hash] == '+' then
      redis.call('SADD', prefix .. hash, worker)
      added[#added + 1] = hash
    else
      redis.call('SREM', prefix .. hash, worker)
      removed[#removed + 1] = hash
    end
  end
  if #added > 0 then redis.call('SADD', KEYS[2], unpack(added)) end
  if #removed > 0 then redis.call('SREM', KEYS[2], unpack(removed)) end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*',
             'seq', seq, 'epoch', epoch_field, 'inc', inc, 'ops', ops)
end
return epoch
"""
# `unpack` takes at most ~8,000 values (Lua's C stack): a batch is far fewer (`max_batch`).
MAX_BATCH = 4096


class BatchPublisher:
    """Publishes a flush's batches for one worker with one EVALSHA (the script is loaded on
    first use and again after Redis lost it, by redis-py's `Script`)."""

    def __init__(self, redis: Redis, keys: PrefixKeys, worker_id: str, incarnation: str,
                 stream_maxlen: int) -> None:
        self._script: AsyncScript = redis.register_script(PUBLISH_LUA)
        self._keys = [keys.epoch, keys.worker_blocks(worker_id), keys.events(worker_id)]
        self._head: list[bytes | str | int] = [keys.block(""), worker_id, incarnation,
                                               stream_maxlen]

    async def publish(self, epoch: bytes | None,
                      batches: Sequence[tuple[int, str]]) -> bytes | str | None:
        """Applies `batches` ((seq, ops) each, in order) with `epoch` in their stream entries;
        returns the epoch key's value read first (None: absent)."""
        args: list[bytes | str | int] = [*self._head, epoch or b""]
        for seq, ops in batches:
            args += [seq, ops]
        result: bytes | str | None = await self._script(keys=self._keys, args=args)
        return result
