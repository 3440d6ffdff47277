"""The same load from several client processes at once, merged into one run: a server's
ceiling without one Python client as the bottleneck.

    python loadtest/scripts/parallel_load.py --processes 4 --concurrency 32 64 \
        --name tandem --out results/tandem -- --address 127.0.0.1:50051 --input-len 64 ...

For each `--concurrency` (or `--rate`) value, `--processes` `loadtest run` processes (at most
one per request in flight) start with a share of it (concurrency split as evenly as it goes,
rate divided; seeds differ) and `--start-at stdin`: each sets up (tokenizer, prompts,
connection), says "ready", and all get the same start time once the last one is ready (a
loaded machine can take tens of seconds to start a Python process); their one-point runs are then
merged (`loadtest.merge`) into one point of OUT/run.json, with `summary.md` and the plots as
`loadtest run` writes them, so `loadtest compare` takes it like any run. Each process's own
run stays in OUT/parts/. The flags after `--` go to every process unchanged (not
`--concurrency`, `--rate`, `--seed`, `--name`, `--out`: this script sets them).

The processes still share the machine's cores with the server: on a small machine the
clients' CPU is taken from the server's, which the merged figures include.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

from loadtest.arrivals import Load
from loadtest.merge import merge_point, merge_runs
from loadtest.plots import write_plots
from loadtest.report import markdown, read_json, write_json
from loadtest.summary import Slo

RESERVED = ("--concurrency", "--rate", "--seed", "--name", "--out", "--start-at")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, required=True)
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int, nargs="+")
    load.add_argument("--rate", type=float, nargs="+")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lead-s", type=float, default=0.5,
                        help="seconds from the last process's 'ready' to the common start")
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv[:split])
    rest = argv[split + 1:]
    for flag in rest:
        if flag.split("=")[0] in RESERVED:
            raise SystemExit(f"parallel_load: {flag} is set by this script, not after --")
    if args.processes < 1:
        raise SystemExit(f"parallel_load: --processes must be >= 1, got {args.processes}")
    return args, rest


def shares(load: Load, processes: int) -> list[list[str]]:
    """Each process's load flags: the concurrency split as evenly as it goes (over at most
    `concurrency` processes: concurrency 1 is one process), or the rate divided (Poisson
    arrivals from independent processes add up to Poisson)."""
    if load.concurrency is not None:
        processes = min(processes, load.concurrency)
        base, extra = divmod(load.concurrency, processes)
        return [["--concurrency", str(base + (k < extra))] for k in range(processes)]
    assert load.rate is not None
    return [["--rate", repr(load.rate / processes)] for _ in range(processes)]


def start_together(procs: list[subprocess.Popen[str]], lead_s: float,
                   timeout_s: float) -> None:
    """Waits for every process's "ready" line, then sends them all one start time; their
    further output is drained on threads (a full pipe would stall them)."""
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        assert proc.stdout is not None
        while (line := proc.stdout.readline()) and line.strip() != "ready":
            if time.monotonic() > deadline:
                break
        if line.strip() != "ready":
            for other in procs:
                other.kill()
            raise SystemExit(f"parallel_load: a process never got ready (exit {proc.wait()})")
    start = repr(time.time() + lead_s)
    for proc in procs:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(start + "\n")
        proc.stdin.close()
        threading.Thread(target=proc.stdout.read, daemon=True).start()


def main(argv: list[str]) -> int:
    args, rest = parse_args(argv)
    loads = ([Load(concurrency=c) for c in args.concurrency] if args.concurrency
             else [Load(rate=r) for r in args.rate])
    merged = []
    target, slo = "", Slo(None, None)
    for i, load in enumerate(loads):
        procs, outs = [], []
        for k, flags in enumerate(shares(load, args.processes)):
            out = args.out / "parts" / f"{i}-{k}"
            outs.append(out)
            command = [sys.executable, "-m", "loadtest", "run", *rest, *flags,
                       "--seed", str(args.seed + i + 1000 * k), "--name", f"{args.name}-{i}-{k}",
                       "--out", str(out), "--start-at", "stdin", "--no-progress"]
            procs.append(subprocess.Popen(command, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True))
        start_together(procs, args.lead_s, args.ready_timeout_s)
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"parallel_load: a process failed (exit codes {codes})")
        reports = [read_json(out / "run.json") for out in outs]
        point, skew = merge_point(reports, load)
        merged.append((point, skew, len(procs)))
        target = reports[0]["target"]
        goodput = reports[0]["points"][0]["summary"]["goodput"]
        slo = Slo(goodput["slo_ttft_s"], goodput["slo_tpot_s"])
        print(f"{load.label}: {len(procs)} processes, start skew {skew * 1000:.0f} ms",
              flush=True)
    config = {**reports[0]["config"], "processes": args.processes,
              "concurrency": args.concurrency, "rate": args.rate, "seed": args.seed}
    report = merge_runs(args.name, target, merged, slo, config)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "run.json", report)
    plots = write_plots({args.name: report["points"]}, args.out)
    summary = markdown(report, [str(p) for p in plots])
    (args.out / "summary.md").write_text(summary)
    print(summary)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
