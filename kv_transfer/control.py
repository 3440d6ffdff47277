"""The control link: one TCP connection per (sender, receiver) pair, kept open for the pair's
life. It carries the handshake, then heartbeats and aborts, and it is how each side learns that
the other died: a killed process closes its sockets at once (EOF), a hung or partitioned one
stops answering pings (`peer_timeout_s`). One-sided writes give the receiver no such signal.
A sender also announces each write it posts, so a receiver that polls slowly while idle is
woken at once (`on_event`): a NIXL write completes only once the receiver's worker has
progressed. Every other event (a peer accepted, an abort, a link lost) wakes it too, so a
polling thread may sleep until woken or until its agent's `next_deadline()`.

A daemon thread owns the sockets; it never touches the transfer backend. It reports what it saw
as `ControlEvent`s that the agent's `poll()` drains on the caller's thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kv_transfer import handshake
from kv_transfer.base import FailureReason, HandshakeError, TransferConfig, TransferError
from kv_transfer.spec import KVLayoutSpec
from kv_transfer.wire import encode_frame, recv_frame, split_frames

log = logging.getLogger(__name__)

_SEND_TIMEOUT_S = 2.0  # a ping or abort that cannot be written in this long means a dead link


@dataclass(frozen=True)
class ControlEvent:
    kind: str  # "accepted" | "lost" | "abort" | "refused" | "write"
    peer: str
    outbound: bool  # True: a link this agent opened (we are the sender on it)
    conn_id: int = 0
    detail: str = ""  # lost: why; abort, write: the request id; refused: the field


@dataclass(eq=False)
class _Link:
    sock: socket.socket
    peer: str
    outbound: bool
    conn_id: int
    last_rx: float
    last_tx: float = 0.0
    buf: bytearray = field(default_factory=bytearray)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False


class ControlPlane:
    """Listens for peers, connects to peers, and watches every link."""

    def __init__(self, *, agent: str, backend: str, spec: KVLayoutSpec, config: TransferConfig,
                 backend_md: dict[str, Any], on_refused: Callable[[str], None],
                 on_event: Callable[[], None]) -> None:
        self._agent, self._backend, self._spec, self._cfg = agent, backend, spec, config
        self._backend_md = backend_md
        self._on_refused = on_refused
        self._on_event = on_event  # control thread: an event is queued (a write announced...)
        self._events: queue.SimpleQueue[ControlEvent] = queue.SimpleQueue()
        self._pending: queue.SimpleQueue[_Link] = queue.SimpleQueue()
        self._links: dict[tuple[str, bool], _Link] = {}
        self._links_lock = threading.Lock()
        self._conn_ids = itertools.count(1)
        self._closed = threading.Event()
        self._listener = socket.create_server((config.host, config.port))
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"kv-control-{agent}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    # --- caller side -------------------------------------------------------------------------

    def connect(self, address: str, timeout_s: float) -> dict[str, Any]:
        """Handshakes with the agent at `address` ("host:port") and returns its welcome."""
        host, _, port = address.rpartition(":")
        deadline = time.monotonic() + timeout_s
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        except (OSError, ValueError) as e:
            raise TransferError(FailureReason.PEER_LOST, f"cannot reach {address}: {e}") from e
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            challenge = recv_frame(sock)
            hello = handshake.make_hello(self._cfg.token, str(challenge.get("nonce", "")),
                                         agent=self._agent, backend=self._backend,
                                         spec=self._spec)
            sock.sendall(encode_frame(hello))
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            reply = recv_frame(sock)
            if reply.get("t") == "refused":
                raise HandshakeError(str(reply.get("field")),
                                     f"refused by {address}: {reply.get('error')}")
            handshake.verify(self._cfg.token, hello["nonce"], reply, backend=self._backend,
                             spec=self._spec)
        except TransferError:
            sock.close()
            raise
        except TimeoutError as e:
            sock.close()
            raise TransferError(FailureReason.TIMEOUT,
                                f"handshake with {address} took over {timeout_s} s") from e
        except (OSError, ValueError) as e:
            sock.close()
            raise TransferError(FailureReason.PEER_LOST, f"handshake with {address}: {e}") from e
        self._add_link(_Link(sock, str(reply["agent"]), True, int(reply["conn_id"]),
                             time.monotonic()))
        return reply

    def linked(self, peer: str, outbound: bool) -> bool:
        """Whether the link to `peer` is open now, as the control thread knows it (a lost
        link leaves at once, before its "lost" event is drained)."""
        with self._links_lock:
            link = self._links.get((peer, outbound))
        return link is not None and not link.closed

    def send(self, peer: str, outbound: bool, msg: dict[str, Any]) -> bool:
        """Best effort; False if there is no live link (the loss is reported separately)."""
        with self._links_lock:
            link = self._links.get((peer, outbound))
        return link is not None and self._send(link, msg)

    def drop(self, peer: str, outbound: bool) -> None:
        """Closes a link on purpose (no "lost" event follows)."""
        with self._links_lock:
            link = self._links.pop((peer, outbound), None)
        if link is not None:
            self._send(link, {"t": "bye"})
            link.closed = True
            self._wake()

    def _put(self, event: ControlEvent) -> None:
        """Control thread: queues `event` for `drain` and wakes the polling thread."""
        self._events.put(event)
        self._on_event()

    def drain(self) -> list[ControlEvent]:
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        with self._links_lock:
            links = list(self._links.values())
        for link in links:
            self._send(link, {"t": "bye"})
        self._closed.set()
        self._wake()
        self._thread.join(timeout=5)
        for link in links:
            link.sock.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._sel.close()

    # --- the control thread ------------------------------------------------------------------

    def _run(self) -> None:
        tick = self._cfg.heartbeat_interval_s / 2
        while not self._closed.is_set():
            for key, _ in self._sel.select(timeout=tick):
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    self._on_wake()
                else:
                    self._read(key.data)
            self._heartbeat()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        threading.Thread(target=self._serve_handshake, args=(sock,), daemon=True,
                         name=f"kv-handshake-{self._agent}").start()

    def _serve_handshake(self, sock: socket.socket) -> None:
        """Runs on its own short-lived thread, so a silent client cannot stall the others."""
        sock.setblocking(True)
        sock.settimeout(self._cfg.connect_timeout_s)
        try:
            nonce = handshake.new_nonce()
            sock.sendall(encode_frame({"t": "challenge", "nonce": nonce,
                                       "protocol_version": handshake.PROTOCOL_VERSION}))
            hello = recv_frame(sock)
            try:
                handshake.verify(self._cfg.token, nonce, hello, backend=self._backend,
                                 spec=self._spec)
            except HandshakeError as e:
                log.warning("refused KV peer %r: %s", hello.get("agent"), e)
                self._on_refused(e.field)
                sock.sendall(encode_frame(handshake.refusal(e)))
                sock.close()
                return
            peer, conn_id = str(hello["agent"]), next(self._conn_ids)
            link = _Link(sock, peer, False, conn_id, time.monotonic())
            # Reported before the welcome goes out, so the agent knows the link before any data.
            self._put(ControlEvent("accepted", peer, False, conn_id))
            sock.sendall(encode_frame(handshake.make_welcome(
                self._cfg.token, str(hello["nonce"]), agent=self._agent, backend=self._backend,
                spec=self._spec, backend_md=self._backend_md, conn_id=conn_id)))
        except (OSError, ValueError, KeyError) as e:
            log.warning("KV handshake from a peer failed: %s", e)
            sock.close()
            return
        self._add_link(link)

    def _add_link(self, link: _Link) -> None:
        link.sock.settimeout(_SEND_TIMEOUT_S)
        with self._links_lock:
            old = self._links.get((link.peer, link.outbound))
            self._links[(link.peer, link.outbound)] = link
        if old is not None:
            old.closed = True
        self._pending.put(link)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _on_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                link = self._pending.get_nowait()
            except queue.Empty:
                break
            self._sel.register(link.sock, selectors.EVENT_READ, link)
        for key in list(self._sel.get_map().values()):
            if isinstance(key.data, _Link) and key.data.closed:
                self._unregister(key.data)

    def _unregister(self, link: _Link) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(link.sock)
        link.sock.close()

    def _read(self, link: _Link) -> None:
        try:
            data = link.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self._lost(link, f"control link error: {e}")
            return
        if not data:
            self._lost(link, "the peer closed the control link (process exited or was killed)")
            return
        link.last_rx = time.monotonic()
        link.buf += data
        try:
            frames = split_frames(link.buf)
        except ValueError as e:
            self._lost(link, f"garbage on the control link: {e}")
            return
        for msg in frames:
            if msg.get("t") == "abort":
                self._put(ControlEvent("abort", link.peer, link.outbound, link.conn_id,
                                              str(msg.get("r", ""))))
            elif msg.get("t") == "write" and not link.outbound:
                self._put(ControlEvent("write", link.peer, False, link.conn_id,
                                              str(msg.get("r", ""))))
            elif msg.get("t") == "bye":
                self._lost(link, "the peer disconnected")
                return

    def _heartbeat(self) -> None:
        now = time.monotonic()
        with self._links_lock:
            links = list(self._links.values())
        for link in links:
            if link.closed:
                continue
            if now - link.last_rx > self._cfg.peer_timeout_s:
                self._lost(link, f"no heartbeat for {self._cfg.peer_timeout_s} s")
            elif now - link.last_tx >= self._cfg.heartbeat_interval_s:
                self._send(link, {"t": "ping"})

    def _send(self, link: _Link, msg: dict[str, Any]) -> bool:
        if link.closed:
            return False
        try:
            with link.send_lock:
                link.sock.sendall(encode_frame(msg))
            link.last_tx = time.monotonic()
            return True
        except OSError:
            return False  # the reader notices the dead socket and reports it

    def _lost(self, link: _Link, why: str) -> None:
        if link.closed:
            return
        link.closed = True
        with self._links_lock:
            if self._links.get((link.peer, link.outbound)) is link:
                del self._links[(link.peer, link.outbound)]
        self._unregister(link)
        log.warning("KV peer %s lost: %s", link.peer, why)
        self._put(ControlEvent("lost", link.peer, link.outbound, link.conn_id, why))
