"""Receiver-side bookkeeping: which requests are incomplete, complete or failed.

A request is complete when the message carrying `total` has arrived and `total` distinct
messages have landed (notifications may arrive in any order). It fails when its deadline passes,
when its sender's control link is lost, or on a malformed message. Pure Python, no I/O.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from kv_transfer.base import EventKind, FailureReason, TransferEvent
from kv_transfer.wire import Notification

_FORGOTTEN_CAP = 65536  # finished request ids remembered, to drop their late notifications


@dataclass
class _Request:
    deadline: float
    started: float
    peer: str = ""
    seqs: set[int] = field(default_factory=set)
    total: int = 0
    nbytes: int = 0
    trace_context: str = ""


class RequestTracker:
    def __init__(self, default_timeout_s: float) -> None:
        self._default_timeout_s = default_timeout_s
        self._requests: dict[str, _Request] = {}
        self._forgotten: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._requests)

    def next_deadline(self) -> float | None:
        """The earliest deadline of a request still expected (time.monotonic()), or None."""
        return min((req.deadline for req in self._requests.values()), default=None)

    def expect(self, request_id: str, timeout_s: float | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        deadline = now + (self._default_timeout_s if timeout_s is None else timeout_s)
        self._forgotten.pop(request_id, None)
        req = self._requests.get(request_id)
        if req is None:
            self._requests[request_id] = _Request(deadline, now)
        else:
            req.deadline = deadline

    def forget(self, request_id: str) -> str:
        """Drops a request; returns the peer it came from ("" if none yet)."""
        req = self._requests.pop(request_id, None)
        self._remember(request_id)
        return req.peer if req else ""

    def on_message(self, peer: str, msg: Notification,
                   now: float | None = None) -> TransferEvent | None:
        now = time.monotonic() if now is None else now
        if msg.request_id in self._forgotten:
            return None
        req = self._requests.get(msg.request_id)
        if req is None:
            req = self._requests[msg.request_id] = _Request(now + self._default_timeout_s, now)
        if req.peer and req.peer != peer:
            return self._fail(msg.request_id, FailureReason.PROTOCOL,
                              f"messages from two senders ({req.peer}, {peer})")
        req.peer = peer
        req.seqs.add(msg.seq)
        req.nbytes += msg.nbytes
        req.trace_context = msg.trace_context or req.trace_context
        if msg.total:
            req.total = msg.total
        if req.total and len(req.seqs) >= req.total:
            del self._requests[msg.request_id]
            self._remember(msg.request_id)
            return TransferEvent(EventKind.REQUEST_COMPLETE, msg.request_id, peer,
                                 nbytes=req.nbytes, latency_s=now - req.started,
                                 trace_context=req.trace_context)
        return None

    def fail_peer(self, peer: str, why: str) -> list[TransferEvent]:
        ids = [rid for rid, req in self._requests.items() if req.peer == peer]
        return [self._fail(rid, FailureReason.PEER_LOST, f"sender {peer} lost: {why}")
                for rid in ids]

    def fail_request(self, request_id: str, reason: FailureReason,
                     why: str) -> TransferEvent | None:
        return self._fail(request_id, reason, why) if request_id in self._requests else None

    def expired(self, now: float | None = None) -> list[TransferEvent]:
        now = time.monotonic() if now is None else now
        ids = [rid for rid, req in self._requests.items() if req.deadline <= now]
        return [self._fail(rid, FailureReason.TIMEOUT,
                           f"KV incomplete after {now - self._requests[rid].started:.2f} s "
                           f"({len(self._requests[rid].seqs)} of "
                           f"{self._requests[rid].total or '?'} writes landed)")
                for rid in ids]

    def finished(self, request_id: str) -> bool:
        """True for a request completed, failed or forgotten (among the last 65,536)."""
        return request_id in self._forgotten

    def peer_of(self, request_id: str) -> str:
        req = self._requests.get(request_id)
        return req.peer if req else ""

    def _fail(self, request_id: str, reason: FailureReason, why: str) -> TransferEvent:
        req = self._requests.pop(request_id)
        self._remember(request_id)
        return TransferEvent(EventKind.REQUEST_FAILED, request_id, req.peer, reason=reason,
                             message=why, nbytes=req.nbytes, trace_context=req.trace_context)

    def _remember(self, request_id: str) -> None:
        self._forgotten[request_id] = None
        self._forgotten.move_to_end(request_id)
        while len(self._forgotten) > _FORGOTTEN_CAP:
            self._forgotten.popitem(last=False)
