"""The prefix-index writer's CPU per publish, in process, against a private redis-server.

    python loadtest/scripts/publish_cpu.py --flushes 2000 --blocks 4

Each flush publishes `--blocks` new blocks stored and (once it holds four flushes' worth)
as many evicted, as a worker's index writer does per request; it prints the writer process's
CPU (`time.process_time`, Redis not included) and wall time per flush. Run it from a
checkout's root to measure that checkout's writer (for an A/B, in turn from two).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

from cli.redis_server import LocalRedisServer
from engine.block_hash import BlockHash
from index.prefix_index import PrefixIndexWriter
from index.redis_client import RedisConfig, connect


async def measure(url: str, flushes: int, blocks: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per flush."""
    config = RedisConfig(url=url, op_timeout_s=10.0, connect_timeout_s=5.0)  # a busy machine
    redis = connect(config)
    writer = PrefixIndexWriter(redis, config, "bench")
    await writer.start()
    rng = random.Random(0)
    held: list[BlockHash] = []
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(flushes):
        new = [BlockHash(rng.getrandbits(64)) for _ in range(blocks)]
        writer.stored(new)
        held += new
        if len(held) > 4 * blocks:
            writer.evicted(held[:blocks])
            held = held[blocks:]
        await writer.flush()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await redis.aclose()
    return cpu / flushes, wall / flushes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flushes", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=4, help="blocks stored per flush")
    args = parser.parse_args(argv)
    with LocalRedisServer() as server:
        cpu, wall = asyncio.run(measure(server.url, args.flushes, args.blocks))
    print(f"{args.flushes} flushes of {args.blocks} stored + {args.blocks} evicted blocks: "
          f"{1000 * cpu:.3f} ms CPU, {1000 * wall:.3f} ms wall per flush")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
