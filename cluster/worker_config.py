"""A worker process's configuration, from flags or `TANDEM_*` environment variables.

Every flag has an environment variable (`--redis-url` ↔ `TANDEM_REDIS_URL`) so the Helm chart
can configure pods either way; a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field

from cluster.roles import Role
from engine.config import EngineConfig

DEFAULT_TOKEN = "tandem-dev-token"  # local clusters only; set TANDEM_TRANSFER_TOKEN elsewhere


@dataclass(frozen=True)
class WorkerConfig:
    """How one prefill or decode worker runs."""

    role: Role
    model: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    listen: str = "127.0.0.1:0"  # gRPC host:port; port 0 picks a free one
    advertise_host: str = ""  # what peers dial (default: the listen host)
    worker_id: str = ""  # default: role-hostname-pid
    redis_url: str = ""  # registry + prefix index; empty: standalone (no index)
    namespace: str = "tandem"
    transfer_backend: str = "nixl"
    transfer_token: str = DEFAULT_TOKEN
    lease_ms: int = 30_000  # decode: how long a reservation waits for its KV and its Decode call
    heartbeat_ttl_s: float = 3.0
    shutdown_grace_s: float = 10.0
    step_delay_s: float = 0.0  # fault injection for tests: sleep before every engine step
    metrics_listen: str = "127.0.0.1:0"  # host:port of /metrics ("" turns it off)

    def __post_init__(self) -> None:
        if ":" not in self.listen:
            raise ValueError(f"listen: expected host:port, got {self.listen!r}")
        if self.lease_ms < 1:
            raise ValueError(f"lease_ms: must be >= 1, got {self.lease_ms}")
        if not self.transfer_token:
            raise ValueError("transfer_token: must not be empty")

    @property
    def id(self) -> str:
        return self.worker_id or f"{self.role.value}-{socket.gethostname()}-{os.getpid()}"

    @property
    def host(self) -> str:
        return self.advertise_host or self.listen.rsplit(":", 1)[0]


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TANDEM_{name.upper()}", default)


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `tandem prefill` and `tandem decode`."""
    add = parser.add_argument
    add("--model", default=_env("model", ""), help="local Hugging Face model directory")
    add("--listen", default=_env("listen", "127.0.0.1:0"))
    add("--advertise-host", default=_env("advertise_host", ""))
    add("--worker-id", default=_env("worker_id", ""))
    add("--redis-url", default=_env("redis_url", ""))
    add("--namespace", default=_env("namespace", "tandem"))
    add("--transfer-backend", default=_env("transfer_backend", "nixl"), choices=["nixl", "ucxx"])
    add("--transfer-token", default=_env("transfer_token", DEFAULT_TOKEN))
    add("--lease-ms", type=int, default=int(_env("lease_ms", "30000")))
    add("--dtype", default=_env("dtype", "float32"))
    add("--device", default=_env("device", "cpu"))
    add("--block-size", type=int, default=int(_env("block_size", "16")))
    add("--num-blocks", type=int, default=int(_env("num_blocks", "0")) or None)
    add("--kv-cache-bytes", type=int, default=int(_env("kv_cache_bytes", "0")) or None)
    add("--max-num-seqs", type=int, default=int(_env("max_num_seqs", "256")))
    add("--max-num-batched-tokens", type=int,
        default=int(_env("max_num_batched_tokens", "8192")))
    add("--num-threads", type=int, default=int(_env("num_threads", "0")) or None)
    add("--kv-layer-group", type=int, default=int(_env("kv_layer_group", "0")) or None,
        help="layers per KV cache group, a divisor of the model's layer count (default: auto, "
             "see engine/kv_cache.py); prefill and decode workers must agree")
    add("--hash-seed", type=int, default=int(_env("hash_seed", "0")) or None)
    add("--shutdown-grace-s", type=float, default=float(_env("shutdown_grace_s", "10")))
    add("--metrics-listen", default=_env("metrics_listen", "127.0.0.1:0"),
        help="host:port serving Prometheus /metrics (port 0: any free port; empty: off)")
    add("--step-delay-ms", type=float, default=float(_env("step_delay_ms", "0")),
        help="fault injection for tests: sleep this long before every engine step")


def worker_config_from_args(role: Role, args: argparse.Namespace) -> WorkerConfig:
    if not args.model:
        raise ValueError("model: --model (or TANDEM_MODEL) is required")
    engine_kwargs: dict[str, object] = dict(
        dtype=args.dtype, device=args.device, block_size=args.block_size,
        num_blocks=args.num_blocks, kv_cache_bytes=args.kv_cache_bytes,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        num_threads=args.num_threads, kv_layer_group=args.kv_layer_group)
    if args.hash_seed is not None:
        engine_kwargs["hash_seed"] = args.hash_seed
    return WorkerConfig(
        role=role, model=args.model, engine=EngineConfig(**engine_kwargs),  # type: ignore[arg-type]
        listen=args.listen, advertise_host=args.advertise_host, worker_id=args.worker_id,
        redis_url=args.redis_url, namespace=args.namespace,
        transfer_backend=args.transfer_backend, transfer_token=args.transfer_token,
        lease_ms=args.lease_ms, shutdown_grace_s=args.shutdown_grace_s,
        step_delay_s=args.step_delay_ms / 1000, metrics_listen=args.metrics_listen)
