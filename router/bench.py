"""`python -m router.bench`: routing decisions per second and added latency, per policy.

A real `redis-server` holds the prefix index of 16 registered workers (8 prefill, 8 decode),
each publishing the block chains of the 2,000-token "documents" it has cached, through the
same `PrefixIndexWriter` the workers use. Every decision runs the router's own code path:
hash the prompt's blocks (`hash_prompt_blocks`), look the chain up in the index when the
policy reads prefixes, and pick a pair (`router.decide.Decider`) from loads that include the
router's own in-flight assignments. Variants:

- round_robin, least_loaded: no index lookup (the baseline for the ratios is round_robin);
- kv_aware + pipelined Redis lookup (`PrefixIndexReader`: chunked pipelines, stop at the
  first miss), one round trip or more per request;
- kv_aware + in-memory tail (`PrefixIndexTail` fed by XREAD of the workers' event streams),
  no Redis round trip on the request path.

Sequential (one decision at a time: latency p50/p99) and concurrent (`--concurrency` tasks
on one event loop: throughput), measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from cli.redis_server import LocalRedisServer
from cluster.roles import Role
from engine.block_hash import hash_prompt_blocks
from index.prefix_index import PrefixIndexReader, PrefixIndexWriter
from index.prefix_tail import PrefixIndexTail
from index.redis_client import RedisConfig, connect
from router.decide import Decider
from router.load import InFlightTracker, WorkerLoad
from router.policies import make_policy
from router.prefix import PrefixLookup, TailSource

BLOCK = 16


def documents(count: int, tokens: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(3, 128_000) for _ in range(tokens)] for _ in range(count)]


def prompts(docs: Sequence[list[int]], count: int, rng: random.Random) -> list[list[int]]:
    """70% continue a cached document (a random-length shared prefix), 30% are fresh."""
    out = []
    tokens = len(docs[0])
    for _ in range(count):
        if rng.random() < 0.7:
            doc = rng.choice(docs)
            keep = rng.randrange(tokens // 4, tokens)
            out.append(doc[:keep] + [rng.randrange(3, 128_000) for _ in range(tokens - keep)])
        else:
            out.append([rng.randrange(3, 128_000) for _ in range(tokens)])
    return out


async def publish(redis_cfg: RedisConfig, workers: list[str], docs: list[list[int]],
                  per_worker: int, rng: random.Random) -> None:
    redis = connect(redis_cfg)
    for worker in workers:
        writer = PrefixIndexWriter(redis, redis_cfg, worker, max_batch=4096)
        await writer.start()
        for doc in rng.sample(docs, per_worker):
            writer.stored(hash_prompt_blocks(doc, BLOCK))
        await writer.flush()
    await redis.aclose()


async def run_variant(name: str, decider: Decider, tracker: InFlightTracker,
                      loads: tuple[list[WorkerLoad], list[WorkerLoad]],
                      requests: list[list[int]], concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    modes: Counter[str] = Counter()

    async def one(prompt: list[int]) -> None:
        start = time.perf_counter()
        hashes = hash_prompt_blocks(prompt, BLOCK)
        decision = await decider.decide(hashes, tracker.apply(loads[0]), tracker.apply(loads[1]))
        latencies.append(time.perf_counter() - start)
        modes[decision.policy] += 1
        assignment = tracker.assign(decision.route, len(hashes))
        assignment.finish()
        await asyncio.sleep(0)  # a real request awaits its RPCs: background syncs get to run

    for prompt in requests[:50]:  # warm-up
        await one(prompt)
    latencies.clear()
    modes.clear()
    start = time.perf_counter()
    for prompt in requests:
        await one(prompt)
    sequential = len(requests) / (time.perf_counter() - start)
    cuts = statistics.quantiles(latencies, n=100)
    p50, p99 = cuts[49], cuts[98]

    queue = list(requests)

    async def worker() -> None:
        while queue:
            await one(queue.pop())
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    concurrent = len(requests) / (time.perf_counter() - start)
    name_used = max(modes, key=modes.__getitem__)
    return {"seq": sequential, "conc": concurrent, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3,
            "mean_ms": statistics.fmean(latencies) * 1e3,
            "share": modes[name_used] / sum(modes.values()), "used": name_used}


async def main_async(args: argparse.Namespace) -> None:
    rng = random.Random(0)
    half = args.workers // 2
    prefill_ids = [f"prefill-{i}" for i in range(half)]
    decode_ids = [f"decode-{i}" for i in range(args.workers - half)]
    docs = documents(args.documents, args.prompt_tokens, rng)
    requests = prompts(docs, args.requests, rng)
    loads = ([WorkerLoad(w, Role.PREFILL, running=rng.randrange(0, 8)) for w in prefill_ids],
             [WorkerLoad(w, Role.DECODE, running=rng.randrange(0, 64), kv_blocks_used=rng.randrange(
                 0, 4000), kv_blocks_total=4096, max_running=256) for w in decode_ids])
    with LocalRedisServer() as server:
        redis_cfg = RedisConfig(url=server.url)
        await publish(redis_cfg, prefill_ids + decode_ids, docs, args.documents_per_worker, rng)
        redis = connect(redis_cfg)
        reader_lookup = PrefixLookup(PrefixIndexReader(redis, redis_cfg))
        tail = TailSource(PrefixIndexTail(redis, redis_cfg), lambda: prefill_ids + decode_ids)
        tail.start()
        while tail.last_sync == 0.0:  # first sync: loads every worker's block set
            await asyncio.sleep(0.05)
        variants = [
            ("round_robin", Decider(make_policy("round_robin"), reader_lookup)),
            ("least_loaded", Decider(make_policy("least_loaded"), reader_lookup)),
            ("kv_aware + Redis pipelined lookup", Decider(make_policy("kv_aware"),
                                                          reader_lookup)),
            ("kv_aware + in-memory tail", Decider(make_policy("kv_aware"),
                                                  PrefixLookup(tail))),
        ]
        print(f"{args.workers} workers, {args.requests} requests of {args.prompt_tokens} tokens "
              f"({args.prompt_tokens // BLOCK} blocks), {args.documents} cached documents, "
              f"concurrency {args.concurrency}")
        print("| policy | decisions/s (sequential) | decisions/s (concurrent) | p50 ms | "
              "p99 ms | vs round_robin | decided by |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        base = None
        for name, decider in variants:
            result = await run_variant(name, decider, InFlightTracker(), loads, requests,
                                       args.concurrency)
            base = base or result["conc"]
            print(f"| {name} | {result['seq']:,.0f} | {result['conc']:,.0f} | "
                  f"{result['p50_ms']:.3f} | {result['p99_ms']:.3f} | "
                  f"{result['conc'] / base:.2f}x | {result['used']} "
                  f"{result['share']:.0%} |", flush=True)
        await tail.close()
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--documents-per-worker", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
