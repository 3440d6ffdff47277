"""`run`: from the command line's arguments to a written run — the workload, the target, one
bounded point per rate or concurrency, then the JSON, the Markdown summary and the plots."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from loadtest import workloads
from loadtest.arrivals import Load
from loadtest.distributions import LengthDist
from loadtest.plots import write_plots
from loadtest.report import build_report, markdown, write_json
from loadtest.request import Request
from loadtest.runner import Bounds, PointResult, run_point
from loadtest.summary import Slo
from loadtest.targets.base import Target
from loadtest.tokens import TokenSpace
from loadtest.trace import read_trace, trace_requests


def token_space(args: argparse.Namespace) -> TokenSpace:
    if args.tokenizer is not None:
        return TokenSpace.from_tokenizer_dir(args.tokenizer)
    if args.vocab_size is not None:
        return TokenSpace(args.vocab_size)
    raise ValueError("tokenizer: give --tokenizer MODEL_DIR (or --vocab-size N) so that prompt "
                     "ids are valid for the model")


def make_requests(args: argparse.Namespace, space: TokenSpace, seed: int) -> list[Request]:
    """The workload, deterministic from `seed`."""
    if args.workload == "synthetic":
        return workloads.synthetic(space, args.max_requests, args.input_len, args.output_len,
                                   seed)
    if args.workload == "shared-prefix":
        return workloads.shared_prefix(space, args.groups, args.users, args.system_len,
                                       args.question_len, args.output_len, seed)
    if args.workload == "multi-turn":
        return workloads.multi_turn(space, args.conversations, args.turns, args.question_len,
                                    args.output_len, seed)
    if args.trace is None:
        raise ValueError("trace: the trace workload needs --trace FILE")
    return trace_requests(read_trace(args.trace), space, seed, args.trace_block_size,
                          args.block_size)


def make_loads(args: argparse.Namespace) -> list[Load]:
    """One point per rate or concurrency; a trace without either keeps its own times."""
    if args.rate and args.concurrency:
        raise ValueError("load: give --rate or --concurrency, not both")
    if args.rate:
        return [Load(rate=r, arrival=args.arrival, burstiness=args.burstiness)
                for r in args.rate]
    if args.concurrency:
        return [Load(concurrency=c) for c in args.concurrency]
    if args.workload == "trace":
        return [Load(arrival="trace", speedup=s) for s in args.speedup]
    raise ValueError("load: give --rate R [R ...] (open loop) or --concurrency C [C ...]")


def make_target(args: argparse.Namespace, space: TokenSpace, salt: str | None) -> Target:
    if args.target == "grpc":
        from loadtest.targets.tandem_grpc import TandemTarget

        return TandemTarget(args.address, salt, args.request_timeout, args.ca)
    from loadtest.targets.openai_http import OpenAITarget

    return OpenAITarget(args.url, args.model, args.endpoint, space, args.ignore_eos,
                        args.api_key, timeout_s=args.request_timeout, ca=args.ca)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path | LengthDist) else v
            for k, v in vars(args).items() if k not in ("api_key", "command")}


async def _start_at(start_at: str | None) -> float:
    """Waits until the wall-clock time `start_at` (None: not at all; "stdin": prints "ready"
    and reads the time from stdin); returns the time.time() it starts at. A process that is
    ready late starts at once and says so on stderr."""
    if start_at == "stdin":
        print("ready", flush=True)
        start_at = (await asyncio.to_thread(sys.stdin.readline)).strip()
    when = _unix_time(start_at)
    if when is not None:
        wait = when - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        elif wait < -0.05:
            print(f"loadtest: ready {-wait:.2f} s after --start-at; starting now",
                  file=sys.stderr)
    return time.time()


def _unix_time(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--start-at: need a time.time() value or 'stdin', got {value!r}") \
            from None


async def run(args: argparse.Namespace) -> tuple[Path, str]:
    """Runs every point and writes the outputs; returns the output dir and the summary."""
    space = token_space(args)
    loads = make_loads(args)
    make_requests(args, space, args.seed)  # a bad workload fails before anything is sent
    if args.start_at != "stdin":
        _unix_time(args.start_at)  # a bad --start-at too
    bounds = Bounds(args.duration, args.max_requests)
    slo = Slo(None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1000,
              None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1000)
    name = args.name or f"{args.target}-{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = args.out or Path("loadtest-results") / name
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    points: list[PointResult] = []
    target_name = ""
    started = time.time()
    for i, load in enumerate(loads):
        salt = {"auto": f"loadtest-{run_id}-{i}", "none": None}.get(args.cache_salt,
                                                                    args.cache_salt)
        target = make_target(args, space, salt)
        target_name = target.name
        # point i's prompts come from seed + i: the same distributions, and no prompt a
        # server cached at an earlier point (a salt does that over gRPC; HTTP has none)
        requests = make_requests(args, space, args.seed + i)
        async with target:
            if i == 0:
                started = await _start_at(args.start_at)
            points.append(await run_point(target, requests, load, bounds, args.seed + i,
                                          f"lt{run_id}-{i}", args.metrics_url, args.progress,
                                          metrics_ca=args.ca))
    report = build_report(name, target_name, {**_config(args), "started_unix": started},
                          points, slo)
    write_json(out_dir / "run.json", report)
    plots = write_plots({name: report["points"]}, out_dir)
    summary = markdown(report, [str(p) for p in plots])
    (out_dir / "summary.md").write_text(summary)
    return out_dir, summary
