"""Redis key layout of the prefix index (one place, so writer and reader cannot disagree).

    {ns}:epoch            string   id of the index's current life; a new one after Redis lost
                                   its data (restart without persistence, FLUSHALL)
    {ns}:blk:{hash hex}   set      ids of the workers holding that block (cold lookups)
    {ns}:wblk:{worker}    set      hash hexes one worker holds (resync, cleanup)
    {ns}:events:{worker}  stream   the worker's block events, in order, capped; one entry per
                                   batch: seq, epoch, inc (the writer's incarnation), and
                                   either ops or reset (see prefix_index)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixKeys:
    namespace: str

    @property
    def epoch(self) -> str:
        return f"{self.namespace}:epoch"

    def block(self, hash_hex: str) -> str:
        return f"{self.namespace}:blk:{hash_hex}"

    def worker_blocks(self, worker_id: str) -> str:
        return f"{self.namespace}:wblk:{worker_id}"

    def events(self, worker_id: str) -> str:
        return f"{self.namespace}:events:{worker_id}"
