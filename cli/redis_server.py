"""A private `redis-server` process on a free loopback port.

Used by the one-command local cluster and by the tests (unit and end-to-end): no persistence
(`--save ''`, no AOF), its own temporary directory, started and stopped synchronously. It can be
killed and restarted on the same port to simulate a Redis outage and a restart that lost state.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from cli.throwaway_ca import ClusterCerts
from cluster.addresses import free_port

_START_TIMEOUT_S = 10.0


def _ping(host: str, port: int, password: str | None, ca: Path | None,
          timeout_s: float = 0.2) -> bool:
    try:
        with _connect(host, port, ca, timeout_s) as sock:
            # inline commands; a password-protected server answers NOAUTH to a bare PING
            sock.sendall((f"AUTH {password}\r\n" if password else "").encode() + b"PING\r\n")
            return b"+PONG" in _read_replies(sock, 2 if password else 1)
    except OSError:
        return False


def _connect(host: str, port: int, ca: Path | None, timeout_s: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout_s)
    if ca is None:
        return sock
    try:
        return ssl.create_default_context(cafile=str(ca)).wrap_socket(sock, server_hostname=host)
    except (OSError, ssl.SSLError):
        sock.close()
        raise


def _read_replies(sock: socket.socket, lines: int) -> bytes:
    data = b""
    while data.count(b"\r\n") < lines:
        chunk = sock.recv(64)
        if not chunk:
            break
        data += chunk
    return data


class LocalRedisServer:
    """`with LocalRedisServer() as redis: redis.url` — a fresh, empty Redis for the block."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 binary: str = "redis-server", password: str | None = None,
                 tls: ClusterCerts | None = None) -> None:
        """`password`: the server's requirepass (None: none); it must be URL- and
        command-safe (letters, digits, `-_.`). `tls`: serve TLS only (no plaintext port) with
        these certificates (clients need no certificate of their own); the URL is then
        `rediss://` with the CA as redis-py's `ssl_ca_certs`."""
        self.tls = tls
        if password is not None and (not password or not all(
                c.isalnum() or c in "-_." for c in password)):
            raise ValueError("password: letters, digits and -_. only, not empty")
        self.password = password
        self.host = host
        self.port = port or free_port(host)
        self.binary = shutil.which(binary) or binary
        self._dir = Path(tempfile.mkdtemp(prefix="tandem-redis-"))
        self._log = self._dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis://[:password@]host:port/0"""
        auth = f":{self.password}@" if self.password else ""
        if self.tls is not None:
            return f"rediss://{auth}{self.host}:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (a soak samples its memory)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Starts the server (empty) and waits until it answers PING."""
        if self.running:
            return
        # the password goes in a config file only its owner reads, not in the visible argv
        conf = self._dir / "redis.conf"
        conf.write_text(f"requirepass {self.password}\n" if self.password else "")
        conf.chmod(0o600)
        ports = ["--port", str(self.port)] if self.tls is None else [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
            "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
            "--tls-auth-clients", "no"]
        self._proc = subprocess.Popen(
            [self.binary, str(conf), *ports, "--bind", self.host, "--save", "",
             "--appendonly", "no", "--dir", str(self._dir), "--loglevel", "warning",
             "--logfile", str(self._log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _ping(self.host, self.port, self.password,
                        self.tls.ca if self.tls is not None else None):
            if self._proc.poll() is not None:
                err = self._log.read_text() if self._log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {err}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def kill(self) -> None:
        """Kills the server at once (SIGKILL): an outage; its data is lost."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after 5 s)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def pause(self) -> None:
        """Freezes the server (SIGSTOP): connections stay open but nothing answers."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undoes `pause()`."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Kills and starts a fresh, empty server on the same port."""
        self.kill()
        self.start()

    def close(self) -> None:
        """Stops the server and removes its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalRedisServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
