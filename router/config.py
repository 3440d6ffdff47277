"""The router process's configuration, from flags or `TANDEM_*` environment variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from engine.block_hash import DEFAULT_HASH_SEED


@dataclass(frozen=True)
class RouterConfig:
    """How the router routes, queues and retries."""

    model: str  # model directory: its tokenizer.json and config.json (no weights are read)
    redis_url: str  # registry (where workers are) and prefix index
    listen: str = "127.0.0.1:0"
    namespace: str = "tandem"
    policy: str = "kv_aware"  # round_robin | least_loaded | kv_aware
    block_size: int = 16  # must match the workers' (checked against their status)
    hash_seed: int = DEFAULT_HASH_SEED
    max_inflight: int = 256  # requests being routed / streamed at once
    max_queue: int = 1024  # requests waiting for an in-flight slot; beyond: RESOURCE_EXHAUSTED
    queue_timeout_s: float = 30.0  # longest wait for a slot (or for decode capacity)
    max_attempts: int = 3  # (prefill, decode) pairs tried before the first token
    lease_ms: int = 30_000  # decode reservation lease
    refresh_interval_s: float = 0.5  # worker list + status polling period
    rpc_timeout_s: float = 60.0  # unary calls to workers (Reserve, Prefill)
    index_retry_s: float = 1.0  # in degraded mode, how often Redis is tried again
    default_max_tokens: int = 16
    no_capacity_backoff_s: float = 0.05  # wait when every decode worker is out of KV blocks
    cleanup_timeout_s: float = 5.0  # a best-effort Cancel of what a worker holds
    status_timeout_s: float = 1.0  # one worker status poll
    # "tail": an in-memory copy of the index fed by the workers' Redis streams (no Redis round
    # trip per request); "pipelined": look each prompt up in Redis (python -m router.bench).
    prefix_index: str = "tail"
    metrics_listen: str = "127.0.0.1:0"  # host:port of /metrics ("" turns it off)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: --model (or TANDEM_MODEL) is required (for the tokenizer)")
        if not self.redis_url:
            raise ValueError("redis_url: --redis-url (or TANDEM_REDIS_URL) is required")
        for name in ("max_inflight", "max_queue", "max_attempts", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.policy not in ("round_robin", "least_loaded", "kv_aware"):
            raise ValueError(f"policy: unknown {self.policy!r}")
        if self.prefix_index not in ("tail", "pipelined"):
            raise ValueError(f"prefix_index: must be 'tail' or 'pipelined', "
                             f"got {self.prefix_index!r}")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TANDEM_{name.upper()}", default)


def add_router_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default=_env("model", ""))
    add("--redis-url", default=_env("redis_url", ""))
    add("--listen", default=_env("listen", "127.0.0.1:0"))
    add("--namespace", default=_env("namespace", "tandem"))
    add("--policy", default=_env("policy", "kv_aware"),
        choices=["round_robin", "least_loaded", "kv_aware"])
    add("--block-size", type=int, default=int(_env("block_size", "16")))
    add("--hash-seed", type=int, default=int(_env("hash_seed", str(DEFAULT_HASH_SEED))))
    add("--max-inflight", type=int, default=int(_env("max_inflight", "256")))
    add("--max-queue", type=int, default=int(_env("max_queue", "1024")))
    add("--queue-timeout-s", type=float, default=float(_env("queue_timeout_s", "30")))
    add("--lease-ms", type=int, default=int(_env("lease_ms", "30000")))
    add("--prefix-index", default=_env("prefix_index", "tail"), choices=["tail", "pipelined"])
    add("--metrics-listen", default=_env("metrics_listen", "127.0.0.1:0"),
        help="host:port serving Prometheus /metrics (port 0: any free port; empty: off)")


def router_config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        model=args.model, redis_url=args.redis_url, listen=args.listen,
        namespace=args.namespace, policy=args.policy, block_size=args.block_size,
        hash_seed=args.hash_seed, max_inflight=args.max_inflight, max_queue=args.max_queue,
        queue_timeout_s=args.queue_timeout_s, lease_ms=args.lease_ms,
        prefix_index=args.prefix_index, metrics_listen=args.metrics_listen)
