"""The router process's configuration: every field is a flag and a `TANDEM_*` variable.

`router_flags()` derives both from the fields (`cluster/settings.py`): `--policy` ↔
`TANDEM_POLICY`, and so on; a flag wins over its variable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cluster.addresses import is_loopback, split_host_port
from cluster.settings import ConfigFlags
from cluster.tls import TlsConfig
from discovery.config import KubernetesConfig
from engine.block_hash import DEFAULT_HASH_SEED
from index.redis_client import RedisConfig


@dataclass(frozen=True)
class RouterConfig:
    """How the router routes, queues and retries."""

    model: str = field(metadata={
        "help": "model directory: its tokenizer.json and config.json (no weights are read)"})
    redis_url: str = field(metadata={"help": "Redis of the worker registry and prefix index"})
    listen: str = field(default="127.0.0.1:0", metadata={
        "help": "gRPC host:port to serve on (port 0: any free port)"})
    namespace: str = field(default="tandem", metadata={
        "help": "Redis key prefix, so several clusters can share one Redis"})
    policy: Literal["round_robin", "least_loaded", "kv_aware"] = field(
        default="kv_aware", metadata={"help": "how a (prefill, decode) pair is chosen"})
    block_size: int = field(default=16, metadata={
        "help": "tokens per KV block; workers whose block size differs are not used"})
    hash_seed: int = field(default=DEFAULT_HASH_SEED, metadata={
        "help": "seed of the chained block hashes; workers whose seed differs are not used"})
    max_inflight: int = field(default=256, metadata={
        "help": "requests being routed or streamed at once"})
    max_queue: int = field(default=1024, metadata={
        "help": "requests waiting for an in-flight slot; beyond it: RESOURCE_EXHAUSTED"})
    queue_timeout_s: float = field(default=30.0, metadata={
        "help": "longest wait for an in-flight slot, or for decode capacity"})
    max_attempts: int = field(default=3, metadata={
        "help": "(prefill, decode) pairs tried before the first token"})
    no_capacity_backoff_s: float = field(default=0.05, metadata={
        "help": "when every decode worker is out of KV blocks, wait this long before asking "
                "again"})
    lease_ms: int = field(default=30_000, metadata={"help": "decode reservation lease"})
    rpc_timeout_s: float = field(default=30.0, metadata={
        "help": "deadline of a Reserve call to a decode worker (it waits for one engine step "
                "at most)"})
    prefill_timeout_s: float = field(default=60.0, metadata={
        "help": "deadline of a prefill: the Prefill call (the prompt queued and computed, its "
                "KV written), or a local route's wait for its first token; past it the worker "
                "is marked down and the request goes to another pair"})
    max_migrations: int = field(default=2, metadata={
        "help": "times one request may move to another pair mid-generation, when its decode "
                "worker fails or stalls (re-prefilled with the tokens so far; 0: never); past "
                "it the request ends with UNAVAILABLE"})
    decode_stall_s: float = field(default=30.0, metadata={
        "help": "a decode stream with no message for this long is lost, like a dead "
                "worker's: its worker is marked down and the request migrates (well above "
                "the slowest legitimate decode step)"})
    cleanup_timeout_s: float = field(default=5.0, metadata={
        "help": "deadline of the best-effort release and cancel calls to workers, and of "
                "those still pending when the router stops"})
    default_max_tokens: int = field(default=16, metadata={
        "help": "max_tokens of a request that gives none"})
    refresh_interval_s: float = field(default=0.5, metadata={
        "help": "period of the worker list and status polls"})
    status_timeout_s: float = field(default=1.0, metadata={
        "help": "deadline of one worker status poll"})
    status_misses_before_down: int = field(default=3, metadata={
        "help": "status polls in a row that must time out before a worker is marked down (a "
                "refused poll marks it down at once)"})
    worker_down_s: float = field(default=3.0, metadata={
        "help": "a worker that failed a call or a status poll is skipped this long"})
    worker_forget_after_s: float = field(default=10.0, metadata={
        "help": "a worker missing from the registry this long is dropped"})
    discovery: Literal["redis", "kubernetes"] = field(default="redis", metadata={
        "help": "how the router finds workers: redis (their heartbeats in the registry) or "
                "kubernetes (a watch of the worker pods; the prefix index stays in Redis)"})
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)  # --kubernetes-*
    channel_close_delay_s: float = field(default=120.0, metadata={
        "help": "a dropped worker's channel is closed this long later, once in-flight calls "
                "have ended"})
    prefix_index: Literal["tail", "pipelined"] = field(default="tail", metadata={
        "help": "tail: an in-memory copy of the prefix index fed by the workers' Redis streams "
                "(no Redis round trip per request); pipelined: look each prompt up in Redis"})
    tail_sync_interval_s: float = field(default=0.005, metadata={
        "help": "prefix_index tail: how often the copy reads the workers' streams"})
    tail_stale_after_s: float = field(default=1.0, metadata={
        "help": "prefix_index tail: a copy not synced for this long is stale, and the router "
                "routes by load (degraded mode)"})
    index_retry_s: float = field(default=1.0, metadata={
        "help": "in degraded mode, how often the prefix index is tried again"})
    redis_op_timeout_s: float = field(default=RedisConfig.op_timeout_s, metadata={
        "help": "hard bound on one Redis operation (registry list, index lookup or sync)"})
    metrics_listen: str = field(default="127.0.0.1:0", metadata={
        "help": "host:port serving Prometheus /metrics (port 0: any free port; empty: off)"})
    http_listen: str = field(default="127.0.0.1:0", metadata={
        "help": "host:port of the OpenAI-compatible HTTP API (/v1/completions, "
                "/v1/chat/completions, /v1/models, /health; port 0: any free port; empty: off)"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "the model's name in the HTTP API (`model` of requests, /v1/models); "
                "unset: the model folder's name"})
    local_prefill_max_tokens: int | None = field(default=None, metadata={
        "help": "conditional disaggregation: a prompt whose part not cached on its decode "
                "worker is at most this many tokens is prefilled there, with no prefill worker "
                "and no transfer; unset: always disaggregate (docs/architecture.md)"})
    api_tokens_file: str | None = field(default=None, metadata={
        "help": "file of the public API's bearer tokens, one a line (gRPC metadata "
                "'authorization: Bearer <token>', HTTP Authorization); unset: no "
                "authentication (health and /metrics are always open)"})
    transfer_token: str | None = field(default=None, metadata={
        "help": "the cluster secret, the workers' transfer_token: presented on every call to "
                "a worker; unset: the local development secret, accepted only when the router "
                "listens on loopback"})
    max_request_bytes: int = field(default=8 * 1024 * 1024, metadata={
        "help": "largest request: a gRPC message the router receives (RESOURCE_EXHAUSTED "
                "beyond it) and an HTTP body (413)"})
    max_prompt_tokens: int | None = field(default=None, metadata={
        "help": "longest prompt in tokens (INVALID_ARGUMENT / 400 beyond it); unset: the "
                "model's context less one"})
    max_output_tokens: int | None = field(default=None, metadata={
        "help": "largest max_tokens a request may ask (INVALID_ARGUMENT / 400 beyond it; the "
                "default of a chat without one is cut to it); unset: the model's context"})
    max_stop_strings: int = field(default=16, metadata={
        "help": "most stop strings in one request"})
    max_stop_chars: int = field(default=256, metadata={
        "help": "longest stop string, in characters"})
    max_streams_per_token: int = field(default=128, metadata={
        "help": "with api_tokens_file: generations one API token may run at once, gRPC and "
                "HTTP together (RESOURCE_EXHAUSTED / 429 beyond it)"})
    log_request_text: bool = field(default=False, metadata={
        "help": "log prompts and generated text (and put them on the request's span); off: "
                "no prompt or output text reaches a log line or a span"})
    # --tls-cert/--tls-key/--tls-ca or --insecure-plaintext: gRPC, HTTP and /metrics serve
    # TLS (client certificates not asked); the router presents its certificate to workers
    tls: TlsConfig = field(default_factory=TlsConfig)
    worker_tls_name: str | None = field(default=None, metadata={
        "help": "the name (a DNS SAN) every worker's certificate carries, checked instead of "
                "the address the worker advertises (pod IPs change); unset: the address's "
                "host must be in the certificate"})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: --model (or TANDEM_MODEL) is required (for the tokenizer)")
        if not self.redis_url:
            raise ValueError("redis_url: --redis-url (or TANDEM_REDIS_URL) is required")
        for name in ("max_inflight", "max_queue", "max_attempts", "block_size", "lease_ms",
                     "default_max_tokens", "status_misses_before_down", "max_stop_strings",
                     "max_stop_chars", "max_streams_per_token"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations: must be >= 0, got {self.max_migrations}")
        for name in ("queue_timeout_s", "rpc_timeout_s", "prefill_timeout_s", "decode_stall_s",
                     "cleanup_timeout_s", "refresh_interval_s", "status_timeout_s",
                     "tail_sync_interval_s", "tail_stale_after_s", "redis_op_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("no_capacity_backoff_s", "worker_down_s", "worker_forget_after_s",
                     "channel_close_delay_s", "index_retry_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes: must be >= 1024, got {self.max_request_bytes}")
        for name in ("max_prompt_tokens", "max_output_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1 or unset, got {getattr(self, name)}")
        if self.max_output_tokens is not None and self.default_max_tokens > self.max_output_tokens:
            raise ValueError(f"default_max_tokens: {self.default_max_tokens} exceeds "
                             f"max_output_tokens {self.max_output_tokens}")
        if self.local_prefill_max_tokens is not None and self.local_prefill_max_tokens < 0:
            raise ValueError(f"local_prefill_max_tokens: must be >= 0 or unset, "
                             f"got {self.local_prefill_max_tokens}")
        if self.policy not in ("round_robin", "least_loaded", "kv_aware"):
            raise ValueError(f"policy: unknown {self.policy!r}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name: must not be blank (unset it for the folder's "
                             "name)")
        if self.discovery not in ("redis", "kubernetes"):
            raise ValueError(f"discovery: must be 'redis' or 'kubernetes', "
                             f"got {self.discovery!r}")
        if self.api_tokens_file == "":
            raise ValueError("api_tokens_file: must not be empty (unset it for no "
                             "authentication)")
        if self.transfer_token == "":
            raise ValueError("transfer_token: must not be empty (leave it unset on loopback)")
        listen_host, _ = split_host_port(self.listen, "listen")
        if self.transfer_token is None and not is_loopback(listen_host):
            raise ValueError(f"transfer_token: required when serving on a non-loopback "
                             f"address ({listen_host}): set --transfer-token or "
                             f"TANDEM_TRANSFER_TOKEN to the workers' cluster secret")
        if self.worker_tls_name is not None and not self.worker_tls_name.strip():
            raise ValueError("worker_tls_name: must not be blank (unset it to check the "
                             "address's host)")
        if self.prefix_index not in ("tail", "pipelined"):
            raise ValueError(f"prefix_index: must be 'tail' or 'pipelined', "
                             f"got {self.prefix_index!r}")

    @property
    def model_name(self) -> str:
        """The name the HTTP API serves the model under."""
        return self.served_model_name or Path(self.model).resolve().name

    def redis_config(self) -> RedisConfig:
        """Where the registry and the prefix index live."""
        return RedisConfig(url=self.redis_url, namespace=self.namespace,
                           op_timeout_s=self.redis_op_timeout_s)


def router_flags() -> ConfigFlags[RouterConfig]:
    """The flags of `tandem router`."""
    return ConfigFlags(RouterConfig)
