"""The router's own cost, before and after a change: routers from two source trees take turns in
front of the same instant workers (`instant_worker.py`), with the same load.

    git archive BASE_COMMIT | tar -x -C /tmp/base      # the "before" tree
    python loadtest/scripts/router_ab.py --base /tmp/base --prefill 16 --decode 16 \
        --policies round_robin kv_aware --rounds 2 --requests 2000 --out /tmp/router-ab

Each round starts, for each tree (A = `--base`, B = `--tree`, by default this one) and policy,
a router (the others are stopped: an idle router still tails the prefix index), waits until it
sees every worker, warms it up (50 requests), reads its idle CPU rate, then sends 64-token
prompts for one token each from an in-process client (`drive`: `loadtest run` spends seconds
loading its tokenizer and prompts, which would blur the CPU window): `--requests` / 4 at
concurrency 1, `--requests` at `--concurrency`. CPU per request: the router process's CPU time
(/proc) over the second, divided by its requests (the idle rate, printed, is not taken out: a
loaded router does its background work too). Interleaving the trees cancels most of the
machine's drift (it is shared); the table gives each round and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient

HERE = Path(__file__).resolve()
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def drive(address: str, requests: int, concurrency: int, seed: int) -> dict[str, float]:
    """`requests` 64-token prompts, one output token, from `concurrency` callers on one
    channel (no tokenizer or prompt files: it starts at once, so the router's CPU time around
    it is the load's); the request rate and TTFT p50."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 30_000) for _ in range(64)] for _ in range(requests)]
    ttfts: list[float] = []
    async with RouterClient(address) as client:
        async def caller() -> None:
            while prompts:
                prompt = prompts.pop()
                start = time.perf_counter()
                async for chunk in client.generate(token_ids=prompt, max_tokens=1,
                                                   ignore_eos=True, timeout=30):
                    if chunk.token_ids and len(ttfts) < requests:
                        ttfts.append(time.perf_counter() - start)
        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        seconds = time.perf_counter() - began
    return {"rps": requests / seconds, "ttft_p50_ms": statistics.median(ttfts) * 1e3}


def measure(address: str, pid: int, requests: int, concurrency: int,
            seed: int) -> tuple[dict[str, float], float]:
    """(drive()'s figures, the router's CPU seconds while it ran)."""
    before = cpu_s(pid)
    figures = asyncio.run(drive(address, requests, concurrency, seed))
    return figures, cpu_s(pid) - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the 'before' source tree")
    parser.add_argument("--tree", type=Path, default=HERE.parents[2],
                        help="the 'after' source tree (default: this one)")
    parser.add_argument("--model", default=str(Path.home() / ".cache/tandem/models/"
                                               "SmolLM2-135M-Instruct"))
    parser.add_argument("--prefill", type=int, default=16)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--policies", nargs="+", default=["round_robin", "kv_aware"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2000,
                        help="at --concurrency (a quarter of them at concurrency 1)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--idle-s", type=float, default=2.0,
                        help="the idle router's CPU rate is measured over this long")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on SIGTERM too
    trees = {"A": args.base.resolve(), "B": args.tree.resolve()}
    cluster = LocalCluster(args.model, prefill=args.prefill, decode=args.decode)
    instant = [sys.executable, str(HERE.with_name("instant_worker.py")), "--role"]
    rows: list[dict[str, object]] = []
    try:
        cluster.redis.start()
        workers = [cluster.spawn(role, program=[*instant, role])
                   for role, n in (("prefill", args.prefill), ("decode", args.decode))
                   for _ in range(n)]
        for worker in workers:
            cluster.wait_ready(worker)
        print("| round | tree | policy | load avg | c=1 req/s | c=1 TTFT p50 ms | "
              f"c={args.concurrency} req/s | router idle core | router ms CPU/request |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
        for round_ in range(1, args.rounds + 1):
            for tree, path in trees.items():
                for policy in args.policies:
                    program = ["env", f"PYTHONPATH={path}", sys.executable, "-m", "router"]
                    router = cluster.spawn("router", ["--policy", policy], program=program)
                    cluster.wait_ready(router)
                    cluster.wait_for_workers(args.prefill + args.decode)
                    pid = router.popen.pid
                    seed = round_ * 100 + len(rows)
                    measure(router.address, pid, 50, 4, seed)  # warm-up: channels, caches
                    before = cpu_s(pid)
                    time.sleep(args.idle_s)
                    idle = (cpu_s(pid) - before) / args.idle_s
                    one, _ = measure(router.address, pid, args.requests // 4, 1, seed + 1)
                    many, spent = measure(router.address, pid, args.requests,
                                          args.concurrency, seed + 2)
                    per_request_ms = spent / args.requests * 1e3
                    cluster.kill(router)
                    load = os.getloadavg()[0]
                    rows.append({"round": round_, "tree": tree, "policy": policy, "load": load,
                                 "c1": one, "many": many, "idle": idle,
                                 "cpu_ms": per_request_ms})
                    print(f"| {round_} | {tree} | {policy} | {load:.1f} | {one['rps']:.0f} | "
                          f"{one['ttft_p50_ms']:.2f} | {many['rps']:.0f} | {idle:.2f} | "
                          f"{per_request_ms:.2f} |", flush=True)
    finally:
        cluster.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
