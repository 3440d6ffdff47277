"""One command for a cluster experiment: start a local cluster, run the same load through one
router per policy, write every run and a comparison, stop everything.

    python loadtest/scripts/cluster_bench.py --engine sim --prefill 4 --decode 4 \
        --policies kv_aware round_robin least_loaded --out loadtest/results/routing \
        -- --workload shared-prefix --groups 8 --users 8 ... (any `loadtest run` flags)

The workers start once; each policy gets its own router process over the same workers and
Redis, started for its runs and stopped after them (an idle router still tails the prefix
index, ~13% of a core here, which would be taken from the router being measured).
`--processes N` sends each point from up to N client processes at once and merges them
(`parallel_load.py`): one Python client tops out below what the cluster serves. `--cache-salt auto`
(the harness's default) gives every run fresh prefixes, so a policy never finds blocks an
earlier one left. `--sim KEY=VALUE` sets a cost-model constant of every sim worker
(`--sim step-s=0` → `--sim-step-s 0`). `--engine instant` starts `instant_worker.py`
stand-ins instead (they answer at once: what remains is the router's own cost), and `--direct`
first runs the load straight to one of them, the one-hop baseline. Each run is `OUT/NAME`
(`run.json`, `summary.md`, plots); `OUT/compare` puts them side by side. A script, not part
of the `loadtest` package: it starts the cluster (`cli.local_cluster`), which the harness
itself never imports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from cli.local_cluster import LocalCluster, ServiceProcess
from tandem_proto.tandem.v1 import router_pb2, router_pb2_grpc

POLICIES = ("round_robin", "least_loaded", "kv_aware")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The driver's flags, and the `loadtest run` flags after `--`."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/lt-model",
                        help="model dir (sim workers read only its config.json)")
    parser.add_argument("--engine", choices=["model", "sim", "instant"], default="sim",
                        help="instant: instant_worker.py stand-ins (no engine, no transfer)")
    parser.add_argument("--direct", action="store_true",
                        help="instant only: first the same load straight to one decode "
                             "worker (its Generate, one hop): the baseline, run DIRECT")
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=1)
    parser.add_argument("--aggregated", type=int, default=0)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=["kv_aware"])
    parser.add_argument("--sim", action="append", default=[], metavar="KEY=VALUE",
                        help="a sim cost-model constant, e.g. step-s=0 (repeatable)")
    parser.add_argument("--num-blocks", type=int, default=1024)
    parser.add_argument("--local-prefill-max-tokens", type=int)
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="one more flag for every worker (repeatable)")
    parser.add_argument("--router-arg", action="append", default=[],
                        help="one more flag for every router (repeatable)")
    parser.add_argument("--label", default="", help="prefix of each run's name")
    parser.add_argument("--pin", action="store_true",
                        help="pin worker k (every thread) to CPU k mod cores, one engine "
                             "thread each: a worker per core, as a worker per GPU")
    parser.add_argument("--processes", type=int, default=1,
                        help="client processes per point (parallel_load.py; 1: loadtest run)")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv[:split]), argv[split + 1:]


def wait_for_workers(router: ServiceProcess, count: int, timeout_s: float = 120.0) -> None:
    """Waits until `router` routes to `count` workers."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(router.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        while len(stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(),
                                        timeout=10).workers) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{router.name}: fewer than {count} workers")
            time.sleep(0.2)


def pin(pid: int, cpu: int) -> None:
    """Pins every thread of process `pid` to `cpu` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), {cpu})


def load_command(processes: int, name: str, out: Path, target: list[str],
                 load_args: list[str]) -> list[str]:
    """`loadtest run` with `load_args`, or with `processes` > 1 `parallel_load.py`, which
    takes the load values (`--concurrency`, `--rate`), `--seed`, `--name` and `--out` itself."""
    if processes <= 1:
        return [sys.executable, "-m", "loadtest", "run", *target, "--name", name,
                "--out", str(out), "--no-progress", *load_args]
    own, rest = split_flags(load_args, ("--concurrency", "--rate", "--seed"))
    return [sys.executable, str(Path(__file__).with_name("parallel_load.py")),
            "--processes", str(processes), "--name", name, "--out", str(out), *own, "--",
            *target, *rest]


def split_flags(argv: list[str], names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(`names` with their values, the rest) of a flag list; a value is every word up to the
    next one that starts with "--"."""
    own: list[str] = []
    rest: list[str] = []
    into = rest
    for word in argv:
        if word.startswith("--"):
            into = own if word.split("=")[0] in names else rest
        into.append(word)
    return own, rest


def run_load(args: argparse.Namespace, name: str, target: list[str],
             load_args: list[str]) -> Path:
    """Runs the load against `target` as run `<label><name>`; returns its run.json."""
    name = f"{args.label}{name}"
    out = args.out / name
    command = load_command(args.processes, name, out, target, load_args)
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True)
    return out / "run.json"


def main(argv: list[str]) -> int:
    args, load_args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on SIGTERM too
    instant = args.engine == "instant"
    if args.direct and not instant:
        raise SystemExit("--direct: only instant workers answer a client directly")
    if instant and args.aggregated:
        raise SystemExit("--aggregated: instant workers are prefill or decode only")
    worker_args = [] if instant else ["--engine", args.engine, "--num-blocks",
                                      str(args.num_blocks)]
    for item in args.sim:
        key, _, value = item.partition("=")
        worker_args += [f"--sim-{key}", value]
    router_args = list(args.router_arg)
    if args.local_prefill_max_tokens is not None:
        router_args += ["--local-prefill-max-tokens", str(args.local_prefill_max_tokens)]
    cluster = LocalCluster(args.model, prefill=args.prefill, decode=args.decode,
                           aggregated=args.aggregated,
                           worker_args=[*worker_args, *args.worker_arg],
                           router_args=router_args, start_timeout_s=300,
                           prefill_threads=1 if args.pin else None,
                           decode_threads=1 if args.pin else None)
    workers = args.prefill + args.decode + args.aggregated
    runs: list[Path] = []
    try:
        print(f"starting {workers} {args.engine} workers (logs: {cluster.log_dir})", flush=True)
        cluster.redis.start()
        program = [sys.executable, str(Path(__file__).with_name("instant_worker.py")),
                   "--role"] if instant else None
        spawned = [cluster.spawn(role, program=program and [*program, role])
                   for role, n in (("prefill", args.prefill),
                   ("decode", args.decode), ("aggregated", args.aggregated))
                   for _ in range(n)]
        for process in spawned:
            cluster.wait_ready(process)
        if args.pin:
            cpus = sorted(os.sched_getaffinity(0))
            for k, process in enumerate(spawned):
                pin(process.popen.pid, cpus[k % len(cpus)])
                print(f"{process.name} pinned to CPU {cpus[k % len(cpus)]}", flush=True)
        if args.direct:
            decode = next(p for p in spawned if p.role == "decode")
            runs.append(run_load(args, "direct", ["--address", decode.address], load_args))
        for policy in args.policies:
            router = cluster.spawn("router", ["--policy", policy])
            cluster.wait_ready(router)
            wait_for_workers(router, workers)
            target = ["--address", router.address,
                      "--metrics-url", f"http://{router.metrics_address}/metrics"]
            runs.append(run_load(args, policy, target, load_args))
            cluster.kill(router)  # SIGKILL: it holds nothing the workers need
    finally:
        cluster.stop()
    if len(runs) > 1:
        subprocess.run([sys.executable, "-m", "loadtest", "compare", *map(str, runs),
                        "--out", str(args.out / "compare")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
