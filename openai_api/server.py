"""uvicorn serving the API inside the router's event loop, started and stopped with it.

    server = HttpServer(build_app(router), "127.0.0.1:0", grace_s=10)
    address = await server.start()      # bound and accepting
    ...
    await server.stop()                 # no new connections; open ones get grace_s

The socket is bound here, so a busy port is an error naming `http_listen` at start (not an exit
from inside uvicorn) and port 0 gives its real port at once. Signals stay the process's
(`cluster.process` stops everything on SIGTERM); uvicorn does not install its own handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import uvicorn

from cluster.addresses import split_host_port


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the process owns SIGTERM and SIGINT


class HttpServer:
    def __init__(self, app: Any, listen: str, grace_s: float,
                 tls: Mapping[str, Any] | None = None) -> None:
        """`tls`: uvicorn's ssl options (`cluster.tls.TlsConfig.uvicorn_options`); empty or
        None: plaintext."""
        self.listen = listen
        self.config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                     ws="none", timeout_graceful_shutdown=math.ceil(grace_s),
                                     **(tls or {}))
        self._server = _Server(self.config)
        self._task: asyncio.Task[None] | None = None
        self.address = ""

    async def start(self) -> str:
        """Binds, serves, and returns "host:port" once accepting."""
        sock = _bind(self.listen)
        host, port = sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError(f"http_listen: the server on {self.address} stopped")
            await asyncio.sleep(0.01)
        return self.address

    async def begin_stop(self) -> None:
        """Stops accepting; requests in flight go on (up to the grace period)."""
        self._server.should_exit = True

    async def stop(self) -> None:
        """Stops, waiting for requests in flight (cancelled past the grace period)."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task


def _bind(listen: str) -> socket.socket:
    host, port = split_host_port(listen, "http_listen")
    family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port,
                                                          type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as error:
        sock.close()
        raise OSError(f"http_listen: cannot listen on {listen}: {error}") from error
    sock.set_inheritable(True)
    return sock
