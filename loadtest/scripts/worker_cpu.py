"""CPU per request of each process of a zero-cost cluster, and its idle CPU.

    python loadtest/scripts/worker_cpu.py --requests 400 --idle-s 20 [--rounds 2]

Starts Redis, 1 prefill + 1 decode sim worker whose cost model is all zeros, and a router
(kv_aware); then, per round: reads every process's CPU time (`/proc/PID/stat`, user + system,
all threads) across `--idle-s` of idleness, and across `--requests` requests sent at
concurrency 1 by `loadtest run` (64-token prompts, 1 token out, fresh prefixes). Per process it
prints the idle share of a core and the CPU per request, as measured and with the idle rate
over the same wall time taken out (on a loaded machine the requests take long and the second
figure is mostly that correction: compare the first, between runs made at the same time); and
the Redis commands per request (INFO commandstats: the router's lookups and tail reads
included; the commands a script runs count besides its EVALSHA). The client is not counted.
Every process runs the code of the working directory (`python -m` puts it first on the path):
for an A/B on a shared machine, run it from two checkouts' roots at once, PYTHONPATH set to
each.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis

from cli.local_cluster import LocalCluster

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime (fields 14, 15)


def sample(pids: dict[str, int]) -> tuple[float, dict[str, float]]:
    return time.monotonic(), {name: cpu_s(pid) for name, pid in pids.items()}


def command_calls(client: redis.Redis) -> Counter[str]:
    """Redis's count of calls per command so far (INFO commandstats)."""
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(value["calls"])
                    for name, value in stats.items()})


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="model dir (sim workers read only its config.json; default: "
                             "SmolLM2's)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--label", default="")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="also record each worker with py-spy during the requests "
                             "(DIR/NAME-ROUND.txt, raw collapsed stacks, busy samples only)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on SIGTERM too
    model = args.model
    if model is None:
        from engine.default_model import smollm2_dir
        model = str(smollm2_dir())
    zero = ["--engine", "sim", "--num-blocks", "1024"]
    for key in ("step-s", "prefill-token-s", "decode-seq-s", "decode-context-token-s"):
        zero += [f"--sim-{key}", "0"]
    cluster = LocalCluster(model, prefill=1, decode=1, worker_args=zero,
                           router_args=["--policy", "kv_aware"], metrics=False)
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="worker-cpu-"))
    try:
        cluster.start()
        assert cluster.redis.pid is not None
        pids = {p.name: p.popen.pid for p in cluster.processes}
        pids["redis"] = cluster.redis.pid
        client = redis.Redis.from_url(cluster.redis.url)
        time.sleep(2.0)  # past start-up's publishes and first polls
        for round_no in range(args.rounds):
            t0, idle0 = sample(pids)
            time.sleep(args.idle_s)
            t1, idle1 = sample(pids)
            calls0 = command_calls(client)
            spies = [subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
                 "--output", str(args.py_spy / f"{name}-{round_no}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for name, pid in pids.items() if args.py_spy and name != "redis"]
            subprocess.run(
                [sys.executable, "-m", "loadtest", "run", "--address", cluster.router_address,
                 "--tokenizer", model, "--input-len", "64", "--output-len", "1",
                 "--concurrency", "1", "--max-requests", str(args.requests),
                 "--duration", "600", "--no-progress", "--name", f"r{round_no}",
                 "--out", str(out / f"r{round_no}")],
                check=True, stdout=subprocess.DEVNULL)
            t2, busy = sample(pids)
            calls = command_calls(client) - calls0
            for spy in spies:  # SIGINT: py-spy writes what it has and exits
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=30)
            load = os.getloadavg()[0]
            print(f"{args.label}round {round_no}: {args.requests} requests in {t2 - t1:.1f} s "
                  f"({args.requests / (t2 - t1):.0f} req/s), load average {load:.2f}")
            for name in pids:
                idle_rate = (idle1[name] - idle0[name]) / (t1 - t0)
                raw = (busy[name] - idle1[name]) / args.requests
                net = raw - idle_rate * (t2 - t1) / args.requests
                print(f"  {name:10s} idle {100 * idle_rate:5.2f}% of a core   per request "
                      f"{1000 * raw:6.3f} ms, {1000 * net:6.3f} ms less idle", flush=True)
            print(f"  Redis commands per request {calls.total() / args.requests:.2f}: "
                  + ", ".join(f"{name} {n / args.requests:.2f}"
                              for name, n in calls.most_common(6)), flush=True)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
