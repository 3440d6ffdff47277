"""`tandem up`, `tandem generate` and `tandem router|prefill|decode|scale` (see cli/main.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import NoReturn

from cli.import_model import PIP_INSTALL, is_complete
from cli.supervisor import RestartPolicy
from engine.default_model import smollm2_dir


def default_model_dir() -> Path:
    """The model `tandem up` serves unless given `--model`: SmolLM2-135M-Instruct, converted
    at set-up (engine/default_model.py says where)."""
    return smollm2_dir()


def ensure_model(model: str | None) -> Path:
    """`--model` as given, else the default model's folder; raises FileNotFoundError saying how
    to make it when it is missing or incomplete."""
    if model:
        return Path(model)
    path = default_model_dir()
    if not is_complete(path):
        raise FileNotFoundError(
            f"the default model is not in {path}: run scripts/setup.sh, or `tandem "
            f"import-smollm2` (after `{PIP_INSTALL}`), or pass --model DIR")
    return path


def add_up(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers")
    parser.add_argument("--decode", type=int, default=1, help="decode workers")
    parser.add_argument("--model", help="local HF model dir (default: SmolLM2-135M-Instruct, "
                                         "converted by scripts/setup.sh)")
    parser.add_argument("--port", type=int, default=50051, help="router gRPC port (0: any)")
    parser.add_argument("--http-port", type=int, default=8000,
                        help="the router's OpenAI API port (0: any)")
    parser.add_argument("--transfer-backend", choices=["nixl", "ucxx"], default="nixl")
    parser.add_argument("--policy", choices=["round_robin", "least_loaded", "kv_aware"],
                        default="kv_aware")
    parser.add_argument("--num-blocks", type=int, default=1024, help="KV blocks per worker")
    parser.add_argument("--demo", action="store_true",
                        help="send a few sample requests and print them, then keep serving")
    parser.add_argument("--exit", action="store_true",
                        help="stop the cluster once started (after the demo, with --demo)")
    parser.add_argument("--log-dir", type=Path, help="where process logs go (default: a tmp dir)")
    parser.add_argument("--aggregated", type=int, default=0,
                        help="aggregated workers (prefill and decode their own requests)")
    parser.add_argument("--engine", choices=["model", "sim"], default="model",
                        help="sim: simulated workers, no model (engine/sim/)")
    parser.add_argument("--restart-backoff-s", type=float,
                        default=RestartPolicy.initial_backoff_s,
                        help="a process that exits is started again after this long, doubling "
                             "while it keeps exiting soon after starting")
    parser.add_argument("--restart-max-backoff-s", type=float,
                        default=RestartPolicy.max_backoff_s,
                        help="the cap of that backoff")
    parser.add_argument("--local-prefill-max-tokens", type=int,
                        help="router: prefill prompts with at most this many uncached tokens "
                             "on their decode worker (default: always disaggregate)")
    parser.add_argument("--insecure-plaintext", action="store_true",
                        help="run every port without TLS (default: TLS everywhere, mutual "
                             "between router and workers, from a throwaway CA made in the log "
                             "folder's certs/)")


def up(args: argparse.Namespace) -> int:
    from cli.demo import run_demo
    from cli.local_cluster import LocalCluster
    from cli.supervisor import supervise

    if min(args.prefill, args.decode, args.aggregated) < 0 or \
            (min(args.prefill, args.decode) < 1 and args.aggregated < 1):
        raise ValueError("prefill/decode/aggregated: need a prefill and a decode worker, or "
                         "an aggregated one")
    policy = RestartPolicy(initial_backoff_s=args.restart_backoff_s,
                           max_backoff_s=args.restart_max_backoff_s)
    model = ensure_model(args.model)
    from cli.throwaway_ca import write_cluster_certs

    local = [] if args.local_prefill_max_tokens is None else [
        "--local-prefill-max-tokens", str(args.local_prefill_max_tokens)]
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tandem-cluster-"))
    certs = None if args.insecure_plaintext else write_cluster_certs(log_dir / "certs")
    cluster = LocalCluster(
        model, prefill=args.prefill, decode=args.decode, router_port=args.port,
        http_port=args.http_port,
        worker_args=["--transfer-backend", args.transfer_backend,
                     "--num-blocks", str(args.num_blocks), "--engine", args.engine],
        router_args=["--policy", args.policy, *local], log_dir=log_dir,
        aggregated=args.aggregated, tls=certs, redis_password=secrets.token_urlsafe(24))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting redis, {args.prefill} prefill, {args.decode} decode, {args.aggregated} "
          f"aggregated {args.engine} workers and the router (logs: {cluster.log_dir})",
          flush=True)
    try:
        cluster.start()
        ca = str(certs.ca) if certs else None
        print(f"router listening on {cluster.router_address}"
              + (f" (TLS; CA {ca})" if ca else " (PLAINTEXT)"), flush=True)
        print(f"OpenAI API on {cluster.http_url}/v1", flush=True)
        if args.demo:
            asyncio.run(run_demo(cluster.router_address, model, ca))
        if not args.exit:
            print(connect_hint(cluster.router_address, cluster.http_url, ca)
                  + "\nCtrl-C stops the cluster; a process that exits is restarted", flush=True)
            supervise(cluster, stop, policy,
                      lambda line: print(f"supervisor: {line}", file=sys.stderr, flush=True))
    finally:
        print("stopping the cluster", flush=True)
        cluster.stop()
    return 0


def connect_hint(router: str, http_url: str, ca: str | None) -> str:
    """How to reach a `tandem up` cluster: `tandem generate`, curl and the openai SDK."""
    if ca is None:
        return (f"serving; try: tandem generate \"Hello\" --router {router}\n"
                f"  curl {http_url}/v1/models")
    return (f"serving over TLS; try: tandem generate \"Hello\" --router {router} --ca {ca}\n"
            f"  curl --cacert {ca} {http_url}/v1/models\n"
            f"  openai SDK: OpenAI(base_url=\"{http_url}/v1\", api_key=\"none\", "
            f"http_client=DefaultHttpxClient(verify=ssl.create_default_context("
            f"cafile=\"{ca}\")))")


def add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="prompt text")
    parser.add_argument("--router", default="127.0.0.1:50051", help="router host:port")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float,
                        help="softmax temperature (default 0: greedy, the same prompt gives "
                             "the same text)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--token", default=os.environ.get("TANDEM_API_TOKEN"),
                        help="bearer token of the router's public API (env TANDEM_API_TOKEN; "
                             "the router's api_tokens_file)")
    parser.add_argument("--ca", default=os.environ.get("TANDEM_TLS_CA"),
                        help="CA file that signed the router's certificate (env "
                             "TANDEM_TLS_CA; `tandem up` prints it); unset: plaintext")


def generate(args: argparse.Namespace) -> int:
    import grpc

    from cli.router_client import RouterClient

    async def run() -> None:
        async with RouterClient(args.router, args.token, ca=args.ca) as client:
            async for chunk in client.generate(
                    text=args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                    ignore_eos=args.ignore_eos):
                print(chunk.text, end="", flush=True)
                if chunk.finish_reason:
                    print(f"\n[{chunk.finish_reason}, {chunk.completion_tokens} tokens]")

    try:
        asyncio.run(run())
    except grpc.aio.AioRpcError as error:
        hint = ""
        if error.code() is grpc.StatusCode.UNAVAILABLE and args.ca is None:
            hint = " (if the router serves TLS, as `tandem up` does, pass --ca CA_FILE)"
        print(f"tandem generate: {error.code().name}: {error.details()}{hint}", file=sys.stderr)
        return 1
    return 0


ROLE_MODULES = {"router": "router", "prefill": "prefill_worker", "decode": "decode_worker",
                "scale": "planner", "aggregated": "decode_worker.aggregated"}


def add_role(parser: argparse.ArgumentParser) -> None:
    """`tandem <role> ...` is dispatched before argparse sees it (`cli.main`): the role's own
    parser owns every flag, --help included; this only documents it in `tandem --help`."""


def run_role(role: str, argv: list[str]) -> NoReturn:
    """`tandem <role> ARGS` runs `python -m <module> ARGS` in this process (exec)."""
    module = ROLE_MODULES[role]
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])
