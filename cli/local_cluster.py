"""A whole Tandem cluster on one machine, as real processes: `tandem up` and the e2e tests.

Starts a private `redis-server` on a free loopback port (with a password when
`redis_password` is given; processes get the URL in `TANDEM_REDIS_URL`, not in their visible
arguments), then prefill workers, decode workers and the router, each as `python -m <package>`
with its output in a log file, on loopback ports chosen here (gRPC, /metrics, the router's
OpenAI HTTP API); a process is ready when its `grpc.health.v1` service answers SERVING, as a
Kubernetes probe would ask (the router starts its HTTP API before it answers). `stop()` sends
SIGTERM to every process (SIGKILL after a grace period) and stops Redis, leaving nothing behind.
Individual processes can be killed and new ones started, to test failures.

TLS is a choice made here, never a silent default: with `tls` (a throwaway CA's files,
`cli.throwaway_ca`) every process serves TLS, workers require the router's client
certificate, and Redis serves TLS only; without it every process is started with
`--insecure-plaintext` (the tests whose subject is not TLS). `tandem up` passes `tls`.

A dead process can be started again as it was (`respawn`: same name, ports and flags, so the
router and the other workers find it where it was; `tandem up`'s supervisor does this,
cli/supervisor.py). Every worker's KV transfer control listener is on a port chosen here too,
so a respawned worker is at the same transfer address as well.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.redis_server import LocalRedisServer
from cli.throwaway_ca import ClusterCerts

MODULES = {"prefill": "prefill_worker", "decode": "decode_worker", "router": "router",
           "aggregated": "decode_worker.aggregated"}
REDIS_HINT = ("redis-server not found on PATH: install it (Debian/Ubuntu: "
              "`apt-get install redis-server`), or run scripts/setup.sh")


@dataclass
class ServiceProcess:
    """One started process of the cluster."""

    role: str
    name: str  # also its worker id
    popen: subprocess.Popen[bytes]
    log_path: Path
    address: str  # gRPC host:port
    metrics_address: str = ""  # host:port of its /metrics ("" when off)
    http_address: str = ""  # the router's OpenAI-compatible API, host:port
    argv: list[str] = field(default_factory=list)  # the command it runs, to start it again
    env: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0  # times `respawn` started it again

    @property
    def worker_id(self) -> str:
        return self.name

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class UniquePorts:
    """Free loopback ports for the processes to listen on, never the same one twice, and below
    the OS's ephemeral range. A port the OS picks (`free_port`, bind to 0) is only free now:
    before the process given it binds it, the OS may hand the same number out again, to
    another free_port or as the local port of any process's outgoing connection; with 32 sim
    workers starting at once both happened ("Failed to bind to address"). Ports below the
    ephemeral range (Linux: 32768-60999) are never given out on their own."""

    def __init__(self, low: int = 20_000, high: int = 32_768) -> None:
        self.taken: set[int] = set()
        self.next = random.randrange(low, high)  # clusters started together rarely meet
        self.low, self.high = low, high

    def take(self) -> int:
        for _ in range(self.high - self.low):
            port = self.next
            self.next = self.low + (self.next + 1 - self.low) % (self.high - self.low)
            if port not in self.taken and port_is_free(port):
                self.taken.add(port)
                return port
        raise RuntimeError(f"no free port in [{self.low}, {self.high})")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nobody listens on (or holds) `port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class LocalCluster:
    """`with LocalCluster(model_dir, prefill=2, decode=2) as cluster: cluster.router_address`."""

    model: str | Path
    prefill: int = 1
    decode: int = 1
    worker_args: Sequence[str] = ()  # extra flags for every worker
    router_args: Sequence[str] = ()
    router_port: int = 0
    http_port: int = 0  # the router's OpenAI API (0: a free port)
    log_dir: Path | None = None
    start_timeout_s: float = 180.0
    # CPU threads (torch intra-op) of each worker's engine; the workers share the machine's
    # cores. A prefill is short and latency-bound: by default it takes every core (None:
    # torch's default), so a request alone gets its first token as fast as the engine alone
    # computes it. A decode worker computes as long as it has requests: by default it takes
    # its share of the cores (None: cores // workers, at least 1), so the two roles computing
    # together do not oversubscribe them much (measured, prefill_worker/bench.py and README).
    prefill_threads: int | None = None
    decode_threads: int | None = None
    # GOMP_SPINCOUNT of the workers: how long an idle OpenMP thread spins before it sleeps
    # (None: libgomp's own, ~300,000, a few ms). Short, so a thread waiting at a barrier
    # for a peer preempted by another worker gives its core back within ~0.1 ms.
    omp_spin_count: int | None = 10_000
    metrics: bool = True  # every process serves /metrics on a free loopback port
    processes: list[ServiceProcess] = field(default_factory=list)
    aggregated: int = 0  # workers that prefill and decode their own requests
    api_token: str | None = None  # the router's bearer token, when router_args give it tokens
    tls: ClusterCerts | None = None  # None: every process runs with --insecure-plaintext
    redis_password: str | None = None  # Redis's requirepass (None: no password)

    def __post_init__(self) -> None:
        if shutil.which("redis-server") is None:
            raise FileNotFoundError(REDIS_HINT)
        # with `tls`, Redis serves TLS only too (rediss://, the same throwaway certificates)
        self.redis = LocalRedisServer(password=self.redis_password, tls=self.tls)
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="tandem-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._counter = 0
        self._ports = UniquePorts()

    # ---- starting ------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        try:
            self.redis.start()
            workers = [self.spawn("prefill") for _ in range(self.prefill)]
            workers += [self.spawn("decode") for _ in range(self.decode)]
            workers += [self.spawn("aggregated") for _ in range(self.aggregated)]
            router = self.spawn("router")
            for process in [*workers, router]:
                self.wait_ready(process)
            self.wait_for_workers(self.prefill + self.decode + self.aggregated)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def router(self) -> ServiceProcess:
        return next(p for p in self.processes if p.role == "router" and p.alive)

    @property
    def router_address(self) -> str:
        return self.router.address

    @property
    def http_url(self) -> str:
        """The router's OpenAI-compatible API, "http(s)://host:port" (its paths start /v1)."""
        return f"{'https' if self.tls else 'http'}://{self.router.http_address}"

    def grpc_channel(self, address: str) -> grpc.Channel:
        """A blocking channel to one of the cluster's processes: with `tls`, presenting the
        client certificate (workers require one) and trusting the throwaway CA."""
        if self.tls is None:
            return grpc.insecure_channel(address)
        credentials = grpc.ssl_channel_credentials(
            self.tls.ca.read_bytes(), self.tls.client_key.read_bytes(),
            self.tls.client_cert.read_bytes())
        return grpc.secure_channel(address, credentials)

    def workers(self, role: str) -> list[ServiceProcess]:
        return [p for p in self.processes if p.role == role and p.alive]

    def spawn(self, role: str, extra_args: Sequence[str] = (),
              program: Sequence[str] | None = None) -> ServiceProcess:
        """Starts one process of `role` ("prefill", "decode", "aggregated" or "router"); not
        yet ready. `program`: what to run instead of `python -m <the role's package>` (a
        stand-in taking the same flags, loadtest/scripts/instant_worker.py)."""
        self._counter += 1
        name = role if role == "router" else f"{role}-{self._counter}"
        port = self.router_port if role == "router" and self.router_port else self._ports.take()
        metrics = f"127.0.0.1:{self._ports.take()}" if self.metrics else ""
        args = ["--model", str(self.model), "--listen", f"127.0.0.1:{port}",
                "--metrics-listen", metrics,
                *(self.tls.flags() if self.tls else ["--insecure-plaintext"])]
        http = ""
        if role == "router":
            http = f"127.0.0.1:{self.http_port or self._ports.take()}"
            args += ["--http-listen", http, *self.router_args]
        else:
            args += ["--worker-id", name, "--transfer-port", str(self._ports.take())]
            threads = self.threads(role)
            if threads is not None:
                args += ["--num-threads", str(threads)]
            args += self.worker_args
        assert self.log_dir is not None
        log_path = self.log_dir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "UCX_WARN_UNUSED_ENV_VARS": "n",
               "TANDEM_REDIS_URL": self.redis.url}  # the URL may hold the password
        if self.omp_spin_count is not None and role != "router":
            env["GOMP_SPINCOUNT"] = str(self.omp_spin_count)
        argv = [*(program or (sys.executable, "-m", MODULES[role])), *args, *extra_args]
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        process = ServiceProcess(role, name, popen, log_path, f"127.0.0.1:{port}", metrics,
                                 http, argv, env)
        self.processes.append(process)
        return process

    def respawn(self, process: ServiceProcess) -> None:
        """Starts a process that exited again, as it was (same name, ports, flags; its log
        goes on in the same file); not yet ready."""
        if process.alive:
            raise RuntimeError(f"respawn: {process.name} is still running")
        with open(process.log_path, "ab") as log:
            log.write(f"\n---- restarted (exit code {process.popen.returncode}) ----\n"
                      .encode())
            log.flush()
            process.popen = subprocess.Popen(process.argv, stdout=log,
                                             stderr=subprocess.STDOUT, env=process.env,
                                             start_new_session=True)
        process.started_at = time.monotonic()
        process.restarts += 1

    def threads(self, role: str) -> int | None:
        """`--num-threads` of a `role` worker (None: not passed, torch's default)."""
        if role == "prefill":
            return self.prefill_threads
        if self.decode_threads is not None:
            return self.decode_threads
        return max(1, (os.cpu_count() or 1) // (self.prefill + self.decode + self.aggregated))

    def wait_ready(self, process: ServiceProcess, timeout_s: float | None = None) -> None:
        """Waits until the process's health service answers SERVING; raises with its log if it
        dies or stalls."""
        timeout = timeout_s or self.start_timeout_s
        deadline = time.monotonic() + timeout
        with self.grpc_channel(process.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not process.alive:
                    raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:"
                                       f"\n{process.log()[-4000:]}")
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not listening yet
                time.sleep(0.05)
        raise TimeoutError(f"{process.name} not ready after {timeout} s:\n"
                           f"{process.log()[-4000:]}")

    def wait_for_workers(self, count: int, timeout_s: float = 60.0) -> None:
        """Waits until the router routes to `count` live workers (a blocking call, usable
        from inside a running event loop)."""
        from tandem_proto.tandem.v1 import router_pb2, router_pb2_grpc

        def seen() -> int:
            with self.grpc_channel(self.router_address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                auth = [("authorization", f"Bearer {self.api_token}")] if self.api_token else []
                status = stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5,
                                               metadata=auth)
            return len(status.workers)

        deadline = time.monotonic() + timeout_s
        while (found := seen()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the router sees {found} of {count} workers after "
                                   f"{timeout_s} s; logs in {self.log_dir}")
            time.sleep(0.1)

    # ---- stopping ------------------------------------------------------------------------

    def kill(self, process: ServiceProcess, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` to one process and waits for it to exit."""
        if process.alive:
            process.popen.send_signal(sig)
        process.popen.wait(timeout=30)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to every process, SIGKILL to any still running after `grace_s`."""
        for process in self.processes:
            if process.alive:
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            try:
                process.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
        self.redis.close()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
