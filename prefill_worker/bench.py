"""`python -m prefill_worker.bench [--model DIR] [--lengths 128 512 1536] [--repeats 5]`:
a prompt's time to first token through the cluster, against the engine's own prefill.

Every request pays the difference, so it is measured in one run, under one load:

- engine: `Engine.generate(prompt, max_tokens=1)` in this process, with the engine config of
  the cluster's workers (`--num-blocks`, the rest defaults, torch's default thread count);
- transfer: the prefill worker's last write of that prompt (the last layer group of its
  blocks, posted → WRITE_DONE) between two agents of the worker's cache layout
  (`prefill_worker/bench_transfer.py`): the part of the push that cannot overlap compute;
- cluster: a `LocalCluster` (1 prefill + 1 decode worker, the router, as `tandem up` starts
  them), the client's `Generate` call → the first token's arrival at the client; next to it
  the prefill worker's own engine step for that prompt (its `tandem_step_duration_seconds`),
  which splits the difference into compute (step vs engine) and the rest (TTFT vs step).

Prompts are random token ids, fresh each time (no prefix-cache hit; a hit fails the run).
Each repeat runs every length on the three, in that order; one warm-up first; medians. The
goal (issue #9) is TTFT <= engine + transfer + 5 ms. Default model: SmolLM2-135M's shape with
random weights (`make_tiny_model(preset="smollm2")`), so nothing is downloaded; `--model`
takes any local Hugging Face folder.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from cluster.worker_config import WorkerConfig
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from engine.tiny_model import make_tiny_model
from kv_transfer.spec import KVLayoutSpec
from prefill_worker.bench_transfer import LastGroupWrite

GOAL_SLACK_MS = 5.0  # issue #9: TTFT <= engine prefill + last group's transfer + 5 ms


@dataclass
class Samples:
    """Milliseconds measured for one prompt length."""

    engine: list[float] = field(default_factory=list)
    transfer: list[float] = field(default_factory=list)
    cluster: list[float] = field(default_factory=list)
    worker_step: list[float] = field(default_factory=list)

    def row(self, length: int) -> str:
        engine, transfer, ttft, step = (statistics.median(x) for x in (
            self.engine, self.transfer, self.cluster, self.worker_step))
        goal = engine + transfer + GOAL_SLACK_MS
        return (f"| {length:,} | {engine:,.1f} | {ttft:,.1f} | {ttft / engine:.2f} | "
                f"{transfer:.1f} | {goal:,.1f} | {'yes' if ttft <= goal else 'no'} | "
                f"{step:,.1f} |")


def step_seconds_total(metrics_address: str) -> float:
    """The sum of a worker's `tandem_step_duration_seconds` (its /metrics, scraped now)."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "tandem_step_duration_seconds":
            return sum(s.value for s in family.samples if s.name.endswith("_sum"))
    raise RuntimeError(f"no tandem_step_duration_seconds at {metrics_address}")


async def first_token_ms(client: RouterClient, prompt: list[int]) -> float:
    """Milliseconds from the call to the first token's arrival (the call runs to its end)."""
    start = time.perf_counter()
    first: float | None = None
    async for chunk in client.generate(token_ids=prompt, max_tokens=2, ignore_eos=True,
                                       timeout=600):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - start
        if chunk.finish_reason is not None and chunk.cached_tokens:
            raise RuntimeError(f"{chunk.cached_tokens} prompt tokens came from a prefix cache: "
                               "the prompts are not fresh")
    if first is None:
        raise RuntimeError("the stream ended without a token")
    return first * 1000


def engine_ms(engine: Engine, prompt: list[int]) -> float:
    start = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=1))
    return (time.perf_counter() - start) * 1000


async def measure(args: argparse.Namespace, model: Path) -> dict[int, Samples]:
    engine = Engine(model, EngineConfig(num_blocks=args.num_blocks))
    vocab = engine.model_config.vocab_size
    rng = random.Random(args.seed)

    def fresh(length: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(length)]  # past the special tokens

    spec = KVLayoutSpec.from_cache_shape(engine.cache_shape, engine.model_id, engine.device)
    # the receiver polls as a decode worker does
    transfer = LastGroupWrite(spec, engine.runner.kv_cache, args.transfer_backend,
                              receiver_poll_s=WorkerConfig.transfer_poll_interval_s)
    worker_args = ["--num-blocks", str(args.num_blocks),
                   "--transfer-backend", args.transfer_backend]
    samples = {length: Samples() for length in args.lengths}
    block_size = engine.config.block_size
    try:
        with LocalCluster(model, prefill=1, decode=1, worker_args=worker_args,
                          prefill_threads=args.prefill_threads,
                          decode_threads=args.decode_threads,
                          omp_spin_count=args.omp_spin_count) as cluster:
            prefill_metrics = cluster.workers("prefill")[0].metrics_address
            async with RouterClient(cluster.router_address) as client:
                for repeat in range(args.repeats + 1):  # repeat 0 warms up
                    for length in args.lengths:
                        engine_took = engine_ms(engine, fresh(length))
                        transfer_took = transfer.seconds(-(-length // block_size)) * 1000
                        steps_before = step_seconds_total(prefill_metrics)
                        ttft = await first_token_ms(client, fresh(length))
                        step_took = (step_seconds_total(prefill_metrics) - steps_before) * 1000
                        if repeat:
                            got = samples[length]
                            got.engine.append(engine_took)
                            got.transfer.append(transfer_took)
                            got.cluster.append(ttft)
                            got.worker_step.append(step_took)
    finally:
        transfer.close()
    return samples


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path,
                        help="HF model dir (default: generate SmolLM2-135M's shape)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1536])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-blocks", type=int, default=1024,
                        help="KV blocks of the engine and of each worker (as `tandem up`)")
    parser.add_argument("--prefill-threads", type=int,
                        help="the prefill worker's --num-threads (default: as `tandem up`, "
                             "every core)")
    parser.add_argument("--decode-threads", type=int,
                        help="the decode worker's --num-threads (default: as `tandem up`, "
                             "its share of the cores)")
    spin = parser.add_mutually_exclusive_group()
    spin.add_argument("--omp-spin-count", type=int, default=LocalCluster.omp_spin_count,
                      help="GOMP_SPINCOUNT of the workers (default: as `tandem up`, %(default)s)")
    spin.add_argument("--libgomp-spin", dest="omp_spin_count", action="store_const",
                      const=None, help="leave GOMP_SPINCOUNT to libgomp (~300,000)")
    parser.add_argument("--transfer-backend", choices=["nixl", "ucxx"], default="nixl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.lengths) < 1:
        parser.error("--repeats and --lengths must be >= 1")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as scratch:
        model = args.model or make_tiny_model(Path(scratch), preset="smollm2", seed=0)
        load_before = os.getloadavg()[0]
        samples = asyncio.run(measure(args, model))
        load_after = os.getloadavg()[0]
    print(f"model {model}, median of {args.repeats}, load average {load_before:.2f} before, "
          f"{load_after:.2f} after ({os.cpu_count()} cores)")
    print("| prompt tokens | engine ms | cluster TTFT ms | ratio | last group transfer ms | "
          f"goal ms (engine + transfer + {GOAL_SLACK_MS:.0f}) | within goal | "
          "prefill worker's step ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for length in args.lengths:
        print(samples[length].row(length), flush=True)


if __name__ == "__main__":
    main()
