"""What every backend shares: peers and their control links, write bookkeeping and timeouts,
request completion on the receiver, events and stats. A backend (nixl_backend.py,
ucxx_backend.py) only moves bytes and notifications, through the abstract hooks at the bottom.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from kv_transfer.base import (
    EventKind,
    FailureReason,
    TransferConfig,
    TransferError,
    TransferEvent,
)
from kv_transfer.control import ControlEvent, ControlPlane
from kv_transfer.spec import KVLayoutSpec
from kv_transfer.stats import TransferStats
from kv_transfer.tracker import RequestTracker
from kv_transfer.wire import Notification

log = logging.getLogger(__name__)

_ABORTED_CAP = 65536  # (peer, request) pairs the receiver gave up on, remembered by the sender


@dataclass
class _Write:
    write_id: int
    peer: str
    request_id: str
    nbytes: int
    posted: float
    deadline: float
    trace_context: str
    handle: Any  # the backend's in-flight transfer


@dataclass
class _Peer:
    """A receiver this agent connected to."""

    name: str
    address: str
    conn_id: int
    num_blocks: int
    alive: bool = True


class BaseAgent(ABC):
    """Implements `kv_transfer.base.KVTransferAgent` on top of a byte-moving backend."""

    backend_name: ClassVar[str]

    def __init__(self, spec: KVLayoutSpec, config: TransferConfig) -> None:
        self.spec, self.config = spec, config
        self.stats = TransferStats()
        self.name = (f"{self.backend_name}-{socket.gethostname()}-{os.getpid()}-"
                     f"{secrets.token_hex(4)}")
        self._lock = threading.RLock()  # serialises backend calls (connect may run off-loop)
        self._control: ControlPlane | None = None
        self._cache: torch.Tensor | None = None
        self._num_blocks = 0
        self._peers: dict[str, _Peer] = {}
        self._by_address: dict[str, str] = {}
        self._writes: dict[int, _Write] = {}
        self._write_ids = itertools.count(1)
        self._send_seq: dict[tuple[str, str], int] = {}
        self._aborted: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lost_inbound: dict[str, tuple[float, str]] = {}  # peer → (fail its requests at, why)
        self._tracker = RequestTracker(config.request_timeout_s)
        # receiver: request id → writes announced on the control link minus writes landed
        # (negative while a notification beat its announcement)
        self._announced: dict[str, int] = {}
        self._wakeup: Callable[[], None] | None = None
        self._events: list[TransferEvent] = []
        self._closed = False

    # --- the interface -----------------------------------------------------------------------

    def register_cache(self, kv_cache: torch.Tensor) -> None:
        if self._control is not None:
            raise RuntimeError("register_cache: the cache is already registered")
        num_blocks = self.spec.check_tensor(kv_cache)  # kv_cache: [G, N, g, 2, bs, Hkv, D]
        with self._lock:
            backend_md = self._register(kv_cache, num_blocks)
        self._cache = kv_cache  # registered memory must outlive the agent, whoever else holds it
        self._num_blocks = num_blocks
        backend_md["num_blocks"] = num_blocks
        self._control = ControlPlane(
            agent=self.name, backend=self.backend_name, spec=self.spec, config=self.config,
            backend_md=backend_md,
            on_refused=lambda f: self.stats.record_failure(
                "handshake", FailureReason.AUTH if f == "token" else FailureReason.HANDSHAKE),
            on_event=self._on_control_event)

    def metadata(self) -> str:
        return self._require_control().address

    def connect(self, peer_metadata: str, timeout_s: float | None = None) -> str:
        control = self._require_control()
        timeout = self.config.connect_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            known = self._by_address.get(peer_metadata)
            if known is not None and self._peers[known].alive:
                if control.linked(known, True):
                    return known
                # The link closed (the peer died or restarted) and no poll has told us yet:
                # never hand out a dead peer, dial the address again.
                self._peer_lost(known, "its control link closed")
        deadline = time.monotonic() + timeout
        try:
            welcome = control.connect(peer_metadata, timeout)
        except TransferError as e:
            self.stats.record_failure("handshake", e.reason)
            raise
        name, md = str(welcome["agent"]), dict(welcome["backend_md"])
        with self._lock:
            if name in self._peers:
                self._forget_peer(name)
            stale = self._by_address.get(peer_metadata)
            if stale is not None and stale != name:
                # a new agent (a restarted process) answers at a known peer's address
                log.info("KV peer at %s restarted: %s replaces %s", peer_metadata, name, stale)
                self._require_control().drop(stale, True)
                self._peer_lost(stale, f"replaced by {name} at the same address")
            try:
                self._open_peer(name, md, int(welcome["conn_id"]),
                                max(deadline - time.monotonic(), 0.001))
            except Exception as e:
                control.drop(name, True)
                self.stats.record_failure("handshake", FailureReason.BACKEND)
                raise TransferError(FailureReason.BACKEND,
                                    f"backend connection to {name} failed: {e}") from e
            self._peers[name] = _Peer(name, peer_metadata, int(welcome["conn_id"]),
                                      int(md["num_blocks"]))
            self._by_address[peer_metadata] = name
        self.stats.record_peer()
        log.info("connected to KV peer %s at %s", name, peer_metadata)
        return name

    def disconnect(self, peer: str) -> None:
        with self._lock:
            if peer in self._peers:
                self._require_control().drop(peer, True)
                self._peer_lost(peer, "disconnected by this agent")

    def write(self, peer: str, request_id: str, src_blocks: Sequence[int] | np.ndarray,
              dst_blocks: Sequence[int] | np.ndarray, layers: range, *, last: bool,
              trace_context: str = "") -> int:
        if self._closed:
            raise TransferError(FailureReason.CLOSED, "the agent is closed")
        state = self._peers.get(peer)
        if state is None or not state.alive:
            raise TransferError(FailureReason.PEER_LOST, f"no live connection to {peer}")
        if (peer, request_id) in self._aborted:
            raise TransferError(FailureReason.ABORTED,
                                f"{peer} gave up on request {request_id}")
        src = np.asarray(src_blocks, dtype=np.int64)  # [n]
        dst = np.asarray(dst_blocks, dtype=np.int64)  # [n]
        self._check_write_args(src, dst, layers, state)
        key = (peer, request_id)
        seq = self._send_seq.get(key, 0)
        if last:
            self._send_seq.pop(key, None)
        else:
            self._send_seq[key] = seq + 1
        nbytes = len(src) * len(layers) * self.spec.block_bytes
        notif = Notification(request_id, layers.start, layers.stop, len(src), seq,
                             seq + 1 if last else 0, nbytes, trace_context).encode()
        now = time.monotonic()
        with self._lock:
            handle = self._post_write(peer, src, dst, layers, notif)
        write_id = next(self._write_ids)
        self._writes[write_id] = _Write(write_id, peer, request_id, nbytes, now,
                                        now + self.config.write_timeout_s, trace_context, handle)
        # wakes the receiver, whose progress the write needs to complete (best effort: a lost
        # link is reported by the control plane)
        self._require_control().send(peer, True, {"t": "write", "r": request_id})
        return write_id

    def expect(self, request_id: str, timeout_s: float | None = None) -> None:
        self._tracker.expect(request_id, timeout_s)

    def set_wakeup(self, wake: Callable[[], None]) -> None:
        self._wakeup = wake

    def release(self, request_id: str) -> None:
        self._announced.pop(request_id, None)
        peer = self._tracker.forget(request_id)
        if peer and self._control is not None:
            self._control.send(peer, False, {"t": "abort", "r": request_id})

    def poll(self) -> list[TransferEvent]:
        if self._closed:
            return []
        with self._lock:
            now = time.monotonic()
            if self._control is not None:
                for cev in self._control.drain():
                    self._on_control(cev, now)
            self._poll_writes(now)
            self._poll_landed(now)
            for peer, (at, why) in list(self._lost_inbound.items()):
                if now >= at:
                    del self._lost_inbound[peer]
                    self._emit_all(self._tracker.fail_peer(peer, why))
                    self._drop_inbound(peer)
            for ev in self._tracker.expired(now):
                self._emit(ev)
                if ev.peer and self._control is not None:
                    self._control.send(ev.peer, False, {"t": "abort", "r": ev.request_id})
            events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        times = [at for at, _ in self._lost_inbound.values()]
        tracked = self._tracker.next_deadline()
        if tracked is not None:
            times.append(tracked)
        return min(times, default=None) if not self._closed else None

    def in_flight(self) -> bool:
        return not self._closed and (bool(self._writes) or self._receiving() or any(
            n > 0 for n in self._announced.values()))

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            for w in list(self._writes.values()):
                self._fail_write(w, FailureReason.CLOSED, "the agent was closed")
            if self._control is not None:
                self._control.close()
            for peer in list(self._peers):
                self._forget_peer(peer)
            self._closed = True
            self._shutdown()
            self._cache = None

    def __enter__(self) -> BaseAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- bookkeeping -------------------------------------------------------------------------

    def _require_control(self) -> ControlPlane:
        if self._control is None:
            raise RuntimeError("call register_cache() first")
        return self._control

    def _check_write_args(self, src: np.ndarray, dst: np.ndarray, layers: range,
                          peer: _Peer) -> None:
        if src.ndim != 1 or src.shape != dst.shape or len(src) == 0:
            raise ValueError(f"src_blocks/dst_blocks: need two equal non-empty 1-D lists, got "
                             f"{src.shape} and {dst.shape}")
        if layers.step != 1 or not 0 <= layers.start < layers.stop <= self.spec.num_layers:
            raise ValueError(f"layers: need a range within [0, {self.spec.num_layers}) with "
                             f"step 1, got {layers}")
        if src.min() < 0 or src.max() >= self._num_blocks:
            raise ValueError(f"src_blocks: ids must be in [0, {self._num_blocks})")
        if dst.min() < 0 or dst.max() >= peer.num_blocks:
            raise ValueError(f"dst_blocks: ids must be in [0, {peer.num_blocks}) for {peer.name}")

    def _on_control(self, cev: ControlEvent, now: float) -> None:
        if cev.kind == "accepted":
            self._lost_inbound.pop(cev.peer, None)
            self._accept_peer(cev.peer, cev.conn_id)
        elif cev.kind == "lost" and cev.outbound:
            state = self._peers.get(cev.peer)
            if state is not None and state.conn_id == cev.conn_id:
                self._peer_lost(cev.peer, cev.detail)
        elif cev.kind == "lost":
            # Notifications already on the wire still land during the grace period.
            self._lost_inbound[cev.peer] = (now + self.config.disconnect_grace_s, cev.detail)
        elif cev.kind == "write":
            rid = cev.detail
            if not self._tracker.finished(rid):  # not a late announcement of a finished one
                self._count_announced(rid, 1)
        elif cev.kind == "abort":
            self._aborted[(cev.peer, cev.detail)] = None
            while len(self._aborted) > _ABORTED_CAP:
                self._aborted.popitem(last=False)

    def _poll_writes(self, now: float) -> None:
        for w in list(self._writes.values()):
            try:
                done = self._check_write(w.handle)
            except TransferError as e:
                self._fail_write(w, e.reason, e.message)
                continue
            if done:
                del self._writes[w.write_id]
                latency = now - w.posted
                self.stats.record_write(w.nbytes, latency)
                self._events.append(TransferEvent(
                    EventKind.WRITE_DONE, w.request_id, w.peer, write_id=w.write_id,
                    nbytes=w.nbytes, latency_s=latency, trace_context=w.trace_context))
            elif now > w.deadline:
                self._fail_write(w, FailureReason.TIMEOUT,
                                 f"write not done after {self.config.write_timeout_s} s")

    def _poll_landed(self, now: float) -> None:
        for peer, raw in self._landed():
            try:
                msg = Notification.decode(raw)
            except ValueError as e:
                log.warning("dropping a message from %s: %s", peer, e)
                self.stats.record_failure("request", FailureReason.PROTOCOL)
                continue
            if not self._tracker.finished(msg.request_id):
                self._count_announced(msg.request_id, -1)
            ev = self._tracker.on_message(peer, msg, now)
            if ev is not None:
                self._emit(ev)

    def _count_announced(self, request_id: str, delta: int) -> None:
        n = self._announced.get(request_id, 0) + delta
        if n:
            self._announced[request_id] = n
        else:
            self._announced.pop(request_id, None)

    def _on_control_event(self) -> None:
        """Control thread: an event is queued (a sender announced a write, a link was lost...);
        wake the polling thread."""
        wake = self._wakeup
        if wake is not None:
            wake()

    def _emit(self, ev: TransferEvent) -> None:
        if ev.kind in (EventKind.REQUEST_COMPLETE, EventKind.REQUEST_FAILED):
            self._announced.pop(ev.request_id, None)
        if ev.kind == EventKind.REQUEST_COMPLETE:
            self.stats.record_request(ev.nbytes, ev.latency_s)
        elif ev.reason is not None:
            self.stats.record_failure("request", ev.reason)
            log.warning("KV of request %s failed (%s): %s", ev.request_id, ev.reason, ev.message)
        self._events.append(ev)

    def _emit_all(self, events: list[TransferEvent]) -> None:
        for ev in events:
            self._emit(ev)

    def _fail_write(self, w: _Write, reason: FailureReason, why: str) -> None:
        self._writes.pop(w.write_id, None)
        try:
            self._cancel_write(w.handle)
        except Exception as e:  # the backend may refuse to cancel: the handle leaks, we go on
            log.debug("cancel of write %d failed: %s", w.write_id, e)
        self.stats.record_failure("write", reason)
        log.warning("KV write %d of request %s to %s failed (%s): %s", w.write_id,
                    w.request_id, w.peer, reason, why)
        self._events.append(TransferEvent(
            EventKind.WRITE_FAILED, w.request_id, w.peer, write_id=w.write_id, reason=reason,
            message=why, nbytes=w.nbytes, latency_s=time.monotonic() - w.posted,
            trace_context=w.trace_context))

    def _peer_lost(self, peer: str, why: str) -> None:
        """An outbound peer is gone: settle what finished, fail the rest, free its resources."""
        self._poll_writes(time.monotonic())
        for w in [w for w in self._writes.values() if w.peer == peer]:
            self._fail_write(w, FailureReason.PEER_LOST, f"receiver {peer} lost: {why}")
        self._forget_peer(peer)

    def _forget_peer(self, peer: str) -> None:
        state = self._peers.pop(peer, None)
        if state is None:
            return
        state.alive = False
        self._by_address.pop(state.address, None)
        for key in [k for k in self._send_seq if k[0] == peer]:
            del self._send_seq[key]
        try:
            self._close_peer(peer)
        except Exception as e:
            log.warning("closing backend connection to %s: %s", peer, e)

    # --- backend hooks -----------------------------------------------------------------------

    @abstractmethod
    def _register(self, kv_cache: torch.Tensor, num_blocks: int) -> dict[str, Any]:
        """Registers the cache; returns the JSON-able metadata a sender needs to write to it."""

    @abstractmethod
    def _open_peer(self, peer: str, backend_md: dict[str, Any], conn_id: int,
                   timeout_s: float) -> None:
        """Prepares to write to `peer` (load its metadata, prepare descriptors, endpoints);
        `conn_id` is the number the peer gave this link (unique among its inbound links)."""

    @abstractmethod
    def _close_peer(self, peer: str) -> None:
        """Frees what `_open_peer` made."""

    @abstractmethod
    def _post_write(self, peer: str, src: np.ndarray, dst: np.ndarray, layers: range,
                    notif: bytes) -> Any:
        """Starts the write (and its notification); returns a handle for `_check_write`."""

    @abstractmethod
    def _check_write(self, handle: Any) -> bool:
        """True when done, False while in flight; raises `TransferError` when it failed."""

    @abstractmethod
    def _cancel_write(self, handle: Any) -> None:
        """Gives up on an in-flight write (best effort)."""

    def _receiving(self) -> bool:
        """True while the backend moves bytes of a write into this cache that have not
        landed yet (and need `poll()` to progress); one-sided backends never know."""
        return False

    def _accept_peer(self, peer: str, conn_id: int) -> None:  # noqa: B027 (optional hook)
        """A sender passed the handshake (receiver side)."""

    def _drop_inbound(self, peer: str) -> None:  # noqa: B027 (optional hook)
        """A sender's link is gone for good (receiver side)."""

    @abstractmethod
    def _landed(self) -> list[tuple[str, bytes]]:
        """Progresses the backend; returns (sender name, notification) of writes that landed."""

    @abstractmethod
    def _shutdown(self) -> None:
        """Deregisters memory and frees the backend."""
