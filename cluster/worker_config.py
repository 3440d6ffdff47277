"""A worker process's configuration: every field is a flag and a `TANDEM_*` variable.

`worker_flags()` derives both from the fields (`cluster/settings.py`): `--redis-url` ↔
`TANDEM_REDIS_URL`, the engine's fields included (`--num-blocks` ↔ `TANDEM_NUM_BLOCKS`), so
the Helm chart can configure pods either way; a flag wins over its variable.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Literal

from cluster.addresses import is_loopback, split_host_port
from cluster.cluster_secret import LOCAL_DEV_TOKEN, secret_or_dev
from cluster.roles import Role
from cluster.settings import ConfigFlags
from cluster.tls import TlsConfig
from engine.config import EngineConfig
from index.redis_client import RedisConfig
from kv_transfer.base import TransferConfig

__all__ = ["LOCAL_DEV_TOKEN", "WorkerConfig", "is_loopback", "worker_flags"]


@dataclass(frozen=True)
class WorkerConfig:
    """How one prefill or decode worker runs."""

    role: Role  # set by the program (`tandem prefill` / `tandem decode`), not a flag
    model: str = field(metadata={
        "help": "local Hugging Face model directory (config.json, tokenizer, safetensors)"})
    engine: EngineConfig = field(default_factory=EngineConfig)
    listen: str = field(default="127.0.0.1:0", metadata={
        "help": "gRPC host:port to serve on (port 0: any free port)"})
    advertise_host: str | None = field(default=None, metadata={
        "help": "the host peers dial, for gRPC and KV transfer; unset: the listen host"})
    worker_id: str | None = field(default=None, metadata={
        "help": "this worker's id in the registry; unset: role-hostname-pid"})
    redis_url: str | None = field(default=None, metadata={
        "help": "Redis of the registry and prefix index; unset: a standalone worker"})
    namespace: str = field(default="tandem", metadata={
        "help": "Redis key prefix, so several clusters can share one Redis"})
    redis_op_timeout_s: float = field(default=RedisConfig.op_timeout_s, metadata={
        "help": "hard bound on one Redis operation (heartbeat, index publish)"})
    heartbeat_ttl_s: float = field(default=3.0, metadata={
        "help": "the registry forgets this worker this long after its last heartbeat "
                "(heartbeats every third of it)"})
    transfer_backend: Literal["nixl", "ucxx"] = field(default="nixl", metadata={
        "help": "KV transfer backend; prefill and decode workers must agree"})
    transfer_token: str | None = field(default=None, metadata={
        "help": "the cluster secret: authenticates the KV transfer links and the router's "
                "calls to this worker (the router's transfer_token must be the same); unset: "
                "a local development secret, accepted only when the listen and advertise "
                "hosts are loopback"})
    transfer_host: str | None = field(default=None, metadata={
        "help": "the address the KV transfer listeners (the control link and UCX) bind and "
                "advertise; UCX is restricted to the interface holding it; unset: the "
                "advertise host"})
    transfer_port: int | None = field(default=None, metadata={
        "help": "KV transfer: the control listener's port (unset: any free port); a fixed port "
                "keeps a restarted worker at the same transfer address"})
    transfer_connect_timeout_s: float = field(default=TransferConfig.connect_timeout_s, metadata={
        "help": "KV transfer: TCP connect + handshake + backend set-up to a peer"})
    transfer_write_timeout_s: float = field(default=TransferConfig.write_timeout_s, metadata={
        "help": "KV transfer: one write's bytes must land within this"})
    transfer_request_timeout_s: float = field(default=TransferConfig.request_timeout_s,
                                              metadata={
        "help": "KV transfer, receiver: deadline of a request's KV when no reservation set "
                "one (a decode reservation's lease does)"})
    transfer_heartbeat_interval_s: float = field(default=TransferConfig.heartbeat_interval_s,
                                                 metadata={
        "help": "KV transfer: control-link ping period"})
    transfer_peer_timeout_s: float = field(default=TransferConfig.peer_timeout_s, metadata={
        "help": "KV transfer: a peer silent on the control link this long is lost"})
    transfer_poll_interval_s: float = field(default=0.0005, metadata={
        "help": "KV transfer: while writes are in flight (posted here, or announced by a "
                "sender), the engine thread polls the agent this often: between steps, between "
                "a prefill's layers, and while idle; how late a landed write may be seen"})
    idle_wait_s: float = field(default=0.05, metadata={
        "help": "the longest an idle engine thread sleeps before it polls the transfer agent "
                "again; nothing on the request path waits for it (a command, a sender's write "
                "announcement or any control-link event wakes the thread, and the agent's next "
                "deadline bounds the sleep), so it only sets idle CPU"})
    transfer_timeout_s: float = field(default=30.0, metadata={
        "help": "prefill: all of a request's KV writes must be done within this, or it fails"})
    lease_ms: int = field(default=30_000, metadata={
        "help": "decode: how long a reservation waits for its KV and its Decode call, and "
                "the longest lease a caller may ask (a longer one is cut to this)"})
    lease_check_interval_s: float = field(default=0.1, metadata={
        "help": "decode: how often expired reservation leases are looked for"})
    quarantine_s: float = field(default=5.0, metadata={
        "help": "decode: blocks of a request released before its KV completed stay unused "
                "this long, so a write still in flight cannot land in another request's blocks"})
    shutdown_grace_s: float = field(default=10.0, metadata={
        "help": "once stopping, in-flight calls get this long to finish"})
    step_delay_ms: float = field(default=0.0, metadata={
        "help": "fault injection for tests: sleep this long before every engine step"})
    metrics_listen: str = field(default="127.0.0.1:0", metadata={
        "help": "host:port serving Prometheus /metrics (port 0: any free port; empty: off)"})
    # --tls-cert/--tls-key/--tls-ca or --insecure-plaintext: the gRPC port requires a client
    # certificate signed by the CA (mutual TLS); /metrics is https with the same certificate
    tls: TlsConfig = field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        listen_host, _ = split_host_port(self.listen, "listen")
        if self.lease_ms < 1:
            raise ValueError(f"lease_ms: must be >= 1, got {self.lease_ms}")
        for name in ("redis_op_timeout_s", "heartbeat_ttl_s", "transfer_timeout_s",
                     "transfer_poll_interval_s", "lease_check_interval_s", "idle_wait_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("quarantine_s", "shutdown_grace_s", "step_delay_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.transfer_host is not None and self.transfer_host.strip("[]") in ("", "0.0.0.0",
                                                                                "::"):
            raise ValueError(f"transfer_host: must be one address peers can dial, not "
                             f"{self.transfer_host!r}")
        if self.transfer_port is not None and not 1 <= self.transfer_port <= 65535:
            raise ValueError(f"transfer_port: must be in [1, 65535], got {self.transfer_port}")
        if self.transfer_token == "":
            raise ValueError("transfer_token: must not be empty (leave it unset on loopback)")
        if self.transfer_token is None:
            exposed = [h for h in {listen_host, self.host, self.data_host}
                       if not is_loopback(h)]
            if exposed:
                raise ValueError(
                    f"transfer_token: required when serving on a non-loopback address "
                    f"({', '.join(sorted(exposed))}): set --transfer-token or "
                    f"TANDEM_TRANSFER_TOKEN to the cluster's shared secret")

    @property
    def id(self) -> str:
        return self.worker_id or f"{self.role.value}-{socket.gethostname()}-{os.getpid()}"

    @property
    def host(self) -> str:
        return self.advertise_host or split_host_port(self.listen, "listen")[0]

    @property
    def data_host(self) -> str:
        """Where the KV transfer binds and what peers dial."""
        return self.transfer_host or self.host

    @property
    def step_delay_s(self) -> float:
        return self.step_delay_ms / 1000

    def redis_config(self) -> RedisConfig:
        """Where this worker's registry and prefix index live (requires `redis_url`)."""
        assert self.redis_url is not None
        return RedisConfig(url=self.redis_url, namespace=self.namespace,
                           op_timeout_s=self.redis_op_timeout_s)

    def cluster_secret(self) -> str:
        """The cluster secret (`cluster.cluster_secret`): `transfer_token`, or on loopback
        (see `__post_init__`) the local development secret, with a warning."""
        return secret_or_dev(self.transfer_token, f"{self.role.value} worker")

    def transfer_config(self) -> TransferConfig:
        """The KV transfer agent's config, keyed by the cluster secret."""
        return TransferConfig(
            token=self.cluster_secret(), backend=self.transfer_backend, host=self.data_host,
            port=self.transfer_port or 0,
            connect_timeout_s=self.transfer_connect_timeout_s,
            write_timeout_s=self.transfer_write_timeout_s,
            request_timeout_s=self.transfer_request_timeout_s,
            heartbeat_interval_s=self.transfer_heartbeat_interval_s,
            peer_timeout_s=self.transfer_peer_timeout_s)


def worker_flags() -> ConfigFlags[WorkerConfig]:
    """The flags of `tandem prefill` and `tandem decode` (`role` is the program's)."""
    return ConfigFlags(WorkerConfig, fixed=("role",))
