"""The harness's command line: `python -m loadtest run|compare|make-trace ...`, also
`tandem bench ...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtest.arrivals import ARRIVALS
from loadtest.distributions import LengthDist
from loadtest.targets.openai_http import ENDPOINTS
from loadtest.trace import MOONCAKE_BLOCK_SIZE

WORKLOADS = ("synthetic", "shared-prefix", "multi-turn", "trace")


def _add_run(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--target", choices=["grpc", "openai"], default="grpc",
                        help="the Tandem router over gRPC, or an OpenAI-compatible server")
    target.add_argument("--address", default="127.0.0.1:50051", help="router host:port (grpc)")
    target.add_argument("--url", default="http://127.0.0.1:8000",
                        help="server base URL (openai)")
    target.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="completions",
                        help="/v1/completions (token ids) or /v1/chat/completions (text)")
    target.add_argument("--model", help="the `model` field (openai; default: the first the "
                        "server lists at /v1/models)")
    target.add_argument("--api-key", help="bearer token (openai)")
    target.add_argument("--ca", default=os.environ.get("TANDEM_TLS_CA"),
                        help="CA file of the server's TLS certificate (env TANDEM_TLS_CA; "
                             "`tandem up` prints it), and of an https --metrics-url; grpc "
                             "unset: plaintext; openai unset: the system's CAs")
    target.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="do not send ignore_eos (openai; servers that refuse it)")
    target.add_argument("--metrics-url",
                        help="a Prometheus /metrics page (the router's) read before and after")
    target.add_argument("--cache-salt", default="auto",
                        help="grpc: 'auto' (a fresh salt per point, so points share no cached "
                             "prefix), 'none', or a fixed salt")
    target.add_argument("--request-timeout", type=float, help="seconds per request")

    work = parser.add_argument_group("workload")
    work.add_argument("--workload", choices=WORKLOADS, default="synthetic")
    work.add_argument("--tokenizer", type=Path,
                      help="model dir with tokenizer.json: prompt ids avoid its special tokens")
    work.add_argument("--vocab-size", type=int, help="draw prompt ids from [0, N) instead")
    work.add_argument("--seed", type=int, default=0,
                      help="point i of a sweep draws its prompts and arrivals with seed + i")
    work.add_argument("--input-len", type=LengthDist.parse, default=LengthDist.parse("128"),
                      help="synthetic prompt length: N, fixed:N, uniform:LO,HI, "
                           "lognormal:MEAN,SIGMA")
    work.add_argument("--output-len", type=LengthDist.parse, default=LengthDist.parse("32"),
                      help="output length (same forms)")
    work.add_argument("--groups", type=int, default=4, help="shared-prefix: system prompts")
    work.add_argument("--users", type=int, default=8, help="shared-prefix: users per group")
    work.add_argument("--system-len", type=int, default=512,
                      help="shared-prefix: system prompt tokens")
    work.add_argument("--question-len", type=LengthDist.parse, default=LengthDist.parse("64"),
                      help="shared-prefix and multi-turn: question length")
    work.add_argument("--conversations", type=int, default=8, help="multi-turn")
    work.add_argument("--turns", type=int, default=4, help="multi-turn")
    work.add_argument("--trace", type=Path, help="trace: a Mooncake JSONL file")
    work.add_argument("--trace-block-size", type=int, default=MOONCAKE_BLOCK_SIZE,
                      help="trace: tokens per hash id")
    work.add_argument("--block-size", type=int, default=16, help="the cluster's KV block size")
    work.add_argument("--speedup", type=float, nargs="+", default=[1.0],
                      help="trace: its times divided by this (several: a sweep)")

    load = parser.add_argument_group("load (one point per rate or concurrency: a sweep)")
    load.add_argument("--rate", type=float, nargs="+", help="open loop: requests/s")
    load.add_argument("--concurrency", type=int, nargs="+", help="closed loop: in flight")
    load.add_argument("--arrival", choices=[a for a in ARRIVALS if a != "trace"],
                      default="poisson")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape (1: Poisson-like; < 1: burstier)")
    load.add_argument("--duration", type=float, default=60.0,
                      help="seconds per point; what is in flight then is cancelled")
    load.add_argument("--max-requests", type=int, default=200, help="requests per point")

    out = parser.add_argument_group("output")
    out.add_argument("--slo-ttft-ms", type=float, help="goodput: TTFT objective")
    out.add_argument("--slo-tpot-ms", type=float, help="goodput: TPOT objective")
    out.add_argument("--out", type=Path, help="output dir (default loadtest-results/NAME)")
    out.add_argument("--name", help="run name (default: target-workload-time)")
    out.add_argument("--no-progress", dest="progress", action="store_false")
    load.add_argument("--start-at", metavar="UNIX_TIME|stdin",
                      help="start the first point at this wall-clock time (time.time()), "
                           "after setting up; 'stdin': once set up, print 'ready' and read "
                           "that time from stdin. Several processes then send together "
                           "(loadtest/scripts/parallel_load.py)")


def _add_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="run JSON files")
    parser.add_argument("--out", type=Path, default=Path("loadtest-results/compare"))


def _add_make_trace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="the JSONL file to write")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=2.0, help="requests/s")
    parser.add_argument("--prefixes", type=int, default=4, help="shared prefixes")
    parser.add_argument("--prefix-blocks", type=int, default=2, help="blocks per prefix")
    parser.add_argument("--unique-blocks", type=int, default=1, help="most own blocks")
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 64],
                        metavar=("LO", "HI"))
    parser.add_argument("--trace-block-size", type=int, default=MOONCAKE_BLOCK_SIZE)


def build_parser(prog: str = "python -m loadtest") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Load-test a Tandem router or an OpenAI-compatible server.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub.add_parser("run", help="run a workload, write JSON, Markdown and plots"))
    _add_compare(sub.add_parser("compare", help="put two or more run JSONs side by side"))
    _add_make_trace(sub.add_parser("make-trace", help="write a synthetic Mooncake trace"))
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m loadtest") -> int:
    """Runs one command; returns the exit status (2 for a user error, said in one line)."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            from loadtest.session import run

            out, summary = asyncio.run(run(args))
            print(summary)
            print(f"wrote {out}")
        elif args.command == "compare":
            from loadtest.compare import compare

            markdown, plots = compare(args.runs, args.out)
            print(markdown.read_text())
            print(f"wrote {markdown} and {len(plots)} plot(s)")
        else:
            from loadtest.trace import synthesize_trace, write_trace

            entries = synthesize_trace(args.requests, args.seed, args.rate, args.prefixes,
                                       args.prefix_blocks, args.unique_blocks,
                                       (args.output_len[0], args.output_len[1]),
                                       args.trace_block_size)
            write_trace(args.out, entries)
            print(f"wrote {len(entries)} requests to {args.out}")
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
