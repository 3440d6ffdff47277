"""A bounded chaos soak: steady load on a real local cluster while workers and Redis die.

    python -m tests.support.soak --minutes 10            # prints its totals; exit 1 on a violation
    python -m tests.support.soak --minutes 10 --transfer-backend ucxx

Starts a `LocalCluster` (redis-server, 2 prefill and 2 decode workers, the router) on the
generated tiny Llama (or `--model`), computes every prompt's greedy tokens up front in an
undisturbed in-process engine, then for `--minutes`:

- `--concurrency` clients send greedy requests (random prompt from a fixed pool, random
  `max_tokens`) one after another;
- the chaos loop (tests/support/chaos.py) SIGKILLs a random prefill or decode worker and starts
  a replacement, or kills Redis and starts it empty, every `--chaos-interval-s` (± half);
- every process's RSS is sampled.

Then it stops the chaos, lets the last requests end, and checks. A violation (exit 1) is:

- a completion whose tokens differ from the reference, or a stream that ended without a
  finish reason;
- an error status outside `CLEAR_CODES` (INTERNAL, UNKNOWN, ...: a bug, not a fault);
- a live worker whose KV blocks are not all free (or that still holds a request) once the
  cluster is idle, `--drain-timeout-s` after the load stopped;
- a chaos action that failed (a replacement worker that never became ready);
- a process whose peak RSS passed `--rss-limit-mib` (default 1024 MiB: a tiny-model worker
  peaks at ~380 MiB, torch and UCX included, the router at ~170 MiB and Redis at ~12 MiB in a
  1-minute soak; a leak of a few KiB per request crosses it in a long one).

The workers decode with a small KV cache (`--num-blocks`), so preemption runs too, and with a
per-step delay, so requests are in flight when a worker dies. The router's decode lease is
shortened to 10 s so that a reservation orphaned by a killed prefill worker expires within the
drain. The totals: requests, completed, migrated (the router's `migrations` counter when it
has one, else "absent"), failed by status code, chaos actions, peak RSS, leaked blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from engine.tiny_model import make_tiny_model
from tests.e2e.helpers import counters, scrape
from tests.support.chaos import Chaos

log = logging.getLogger("soak")

# the statuses a request may end with under faults: each says what happened
CLEAR_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 2.0
    model: Path | None = None  # None: the generated tiny Llama
    concurrency: int = 6
    chaos_interval_s: float = 8.0
    # per worker, 16-token blocks: the longest request (90 + 40 tokens) takes 9, so three on a
    # decode worker preempt
    num_blocks: int = 16
    step_delay_ms: int = 20
    max_tokens: int = 40
    rss_limit_mib: float = 1024.0
    drain_timeout_s: float = 60.0
    request_timeout_s: float = 90.0
    prompts: int = 24
    seed: int = 0
    transfer_backend: str = "nixl"  # or "ucxx": every worker's KV transfer backend

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise ValueError(f"minutes: must be > 0, got {self.minutes}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency: must be >= 1, got {self.concurrency}")
        if self.transfer_backend not in ("nixl", "ucxx"):
            raise ValueError(f"transfer_backend: 'nixl' or 'ucxx', got {self.transfer_backend!r}")
        if self.chaos_interval_s <= 0:
            raise ValueError(f"chaos_interval_s: must be > 0, got {self.chaos_interval_s}")


@dataclass
class SoakReport:
    requests: int = 0
    completed: int = 0
    migrated: int | None = None  # None: the router has no migration counter
    failed: Counter[str] = field(default_factory=Counter)  # by status code name
    actions: Counter[str] = field(default_factory=Counter)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    leaked: dict[str, str] = field(default_factory=dict)  # worker → what it still holds
    violations: list[str] = field(default_factory=list)
    preemptions: int = 0  # summed over the live workers' counters at the end
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        rss = ", ".join(f"{n} {v:.0f}" for n, v in sorted(self.peak_rss_mib.items()))
        lines = [
            f"soak: {self.seconds:.0f} s",
            f"  requests   {self.requests}",
            f"  completed  {self.completed}",
            f"  migrated   {'absent' if self.migrated is None else self.migrated}",
            f"  failed     {dict(sorted(self.failed.items())) or 0}",
            f"  chaos      {dict(sorted(self.actions.items()))}",
            f"  preempted  {self.preemptions} (live workers)",
            f"  peak RSS   MiB: {rss}",
            f"  leaked     {self.leaked or 'none'}",
            f"  violations {len(self.violations)}",
            *(f"    {v}" for v in self.violations[:20]),
        ]
        return "\n".join(lines)


def prompt_pool(config: SoakConfig) -> list[list[int]]:
    """Fixed prompts, 8 to 90 tokens; every fourth shares a 48-token prefix with others."""
    rng = random.Random(config.seed)
    shared = [rng.randrange(3, 500) for _ in range(48)]
    pool = []
    for i in range(config.prompts):
        tail = [rng.randrange(3, 500) for _ in range(rng.randint(8, 42))]
        pool.append(shared + tail if i % 4 == 0 else tail * 2 if i % 4 == 1 else tail)
    return pool


def references(model: Path, pool: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens from an undisturbed in-process engine, one at a time."""
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=16))
    greedy = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [engine.generate([p], greedy)[0] for p in pool]


async def load(client: RouterClient, pool: list[list[int]], refs: list[list[int]],
               config: SoakConfig, rng: random.Random, stop: asyncio.Event,
               report: SoakReport) -> None:
    """One client: requests back to back until `stop`; every outcome goes in `report`."""
    while not stop.is_set():
        index = rng.randrange(len(pool))
        max_tokens = rng.randint(4, config.max_tokens)
        report.requests += 1
        try:
            result = await client.complete(token_ids=pool[index], max_tokens=max_tokens,
                                           ignore_eos=True, timeout=config.request_timeout_s)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            report.failed[code.name] += 1
            if code not in CLEAR_CODES:
                report.violations.append(f"prompt {index}: {code.name}: {error.details()}")
            continue
        if result.finish_reason is None:
            report.violations.append(f"prompt {index}: the stream ended without a finish "
                                     f"reason after {len(result.token_ids)} tokens")
        elif result.token_ids != refs[index][:max_tokens]:
            report.violations.append(f"prompt {index}: wrong tokens {result.token_ids} != "
                                     f"{refs[index][:max_tokens]}")
        else:
            report.completed += 1


async def migrations(cluster: LocalCluster, client: RouterClient) -> int | None:
    """The router's migration count: its status counter, else a /metrics sample; None when
    the router has neither (no request migration in this build)."""
    status = await client.status()
    if "migrations" in status.counters:
        return int(status.counters["migrations"])
    samples = scrape(cluster.router)
    found = [v for name, v in samples.items() if "migration" in name and name.endswith("_total")]
    return int(sum(found)) if found else None


async def leaks(cluster: LocalCluster) -> dict[str, str]:
    """Live workers whose blocks are not all free or that still hold requests."""
    held = {}
    for worker in cluster.workers("prefill") + cluster.workers("decode"):
        try:
            c = await counters(worker)
        except grpc.aio.AioRpcError as error:
            held[worker.name] = f"status failed: {error.code().name}"
            continue
        if c["kv_blocks_free"] != c["kv_blocks_total"] or c["requests"]:
            held[worker.name] = (f"{c['kv_blocks_total'] - c['kv_blocks_free']:.0f} blocks, "
                                 f"{c['requests']:.0f} requests")
    return held


async def drain(cluster: LocalCluster, timeout_s: float) -> dict[str, str]:
    """Waits for every live worker to hold nothing; what is still held at the timeout."""
    deadline = time.monotonic() + timeout_s
    while (held := await leaks(cluster)) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return held


async def soak(cluster: LocalCluster, model: Path, config: SoakConfig) -> SoakReport:
    """Runs the soak on a started cluster; returns its report (violations included)."""
    pool = prompt_pool(config)
    refs = references(model, pool, config.max_tokens)
    report = SoakReport()
    rng = random.Random(config.seed)
    chaos = Chaos(cluster, config.chaos_interval_s, random.Random(config.seed + 1))
    started = time.monotonic()
    stop_load, stop_chaos, stop_rss = asyncio.Event(), asyncio.Event(), asyncio.Event()
    async with RouterClient(cluster.router_address) as client:
        clients = [asyncio.create_task(load(client, pool, refs, config,
                                            random.Random(rng.random()), stop_load, report))
                   for _ in range(config.concurrency)]
        chaos_task = asyncio.create_task(chaos.run(stop_chaos))
        rss_task = asyncio.create_task(chaos.sample_rss_every(2.0, stop_rss))
        await asyncio.sleep(config.minutes * 60)
        stop_chaos.set()
        await chaos_task  # the last replacement is up
        stop_load.set()
        await asyncio.gather(*clients)
        report.leaked = await drain(cluster, config.drain_timeout_s)
        stop_rss.set()
        await rss_task
        report.migrated = await migrations(cluster, client)
    report.seconds = time.monotonic() - started
    report.actions = chaos.actions
    report.peak_rss_mib = chaos.peak_rss_mib
    for worker in cluster.workers("prefill") + cluster.workers("decode"):
        report.preemptions += int((await counters(worker)).get("preemptions", 0))
    report.violations += [f"chaos action failed: {e}" for e in chaos.errors]
    report.violations += [f"{name} leaked: {what}" for name, what in report.leaked.items()]
    report.violations += [f"{name} peak RSS {mib:.0f} MiB > {config.rss_limit_mib:.0f} MiB"
                          for name, mib in report.peak_rss_mib.items()
                          if mib > config.rss_limit_mib]
    if not report.completed:
        report.violations.append("no request completed")
    return report


def soak_cluster(model: Path, config: SoakConfig, log_dir: Path) -> LocalCluster:
    """The cluster the soak runs on (not started)."""
    return LocalCluster(
        model, prefill=2, decode=2, log_dir=log_dir,
        worker_args=["--num-blocks", str(config.num_blocks),
                     "--step-delay-ms", str(config.step_delay_ms), "--shutdown-grace-s", "2",
                     "--transfer-backend", config.transfer_backend],
        router_args=["--lease-ms", "10000"])


def run(config: SoakConfig, log_dir: Path) -> SoakReport:
    """Generates the model if none is given, starts the cluster, soaks, stops it."""
    model = config.model or make_tiny_model(log_dir / "tiny-llama", arch="llama", seed=1)
    with soak_cluster(model, config, log_dir / "logs") as cluster:
        return asyncio.run(soak(cluster, model, config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.soak",
                                     description=__doc__.split("\n\n")[0])
    defaults = SoakConfig()
    parser.add_argument("--minutes", type=float, default=defaults.minutes)
    parser.add_argument("--model", type=Path, help="a model directory (default: the tiny "
                        "Llama, generated)")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--chaos-interval-s", type=float, default=defaults.chaos_interval_s)
    parser.add_argument("--num-blocks", type=int, default=defaults.num_blocks)
    parser.add_argument("--rss-limit-mib", type=float, default=defaults.rss_limit_mib)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--transfer-backend", choices=("nixl", "ucxx"),
                        default=defaults.transfer_backend)
    parser.add_argument("--log-dir", type=Path, help="where the processes' logs go "
                        "(default: a new temporary directory, printed)")
    parser.add_argument("--json", action="store_true", help="also print the totals as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = SoakConfig(minutes=args.minutes, model=args.model,
                            concurrency=args.concurrency,
                            chaos_interval_s=args.chaos_interval_s, num_blocks=args.num_blocks,
                            rss_limit_mib=args.rss_limit_mib, seed=args.seed,
                            transfer_backend=args.transfer_backend)
    except ValueError as error:
        parser.error(str(error))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="tandem-soak-"))
    log.info("logs in %s", log_dir)
    report = run(config, log_dir)
    print(report.summary())
    if args.json:
        print(json.dumps({"requests": report.requests, "completed": report.completed,
                          "migrated": report.migrated, "failed": report.failed,
                          "actions": report.actions, "peak_rss_mib": report.peak_rss_mib,
                          "leaked": report.leaked, "violations": report.violations}))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
