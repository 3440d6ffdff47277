"""The KV transfer interface both workers use, its config, events and errors.

The picture (push, a layer group at a time; see kv_transfer/README.md):

    D: agent.register_cache(kv_cache); publish agent.metadata()        # once, at start-up
    D: agent.expect(request_id, timeout_s)                              # when it reserves blocks
    P: peer = agent.connect(d_metadata)                                 # once per decode worker
    P: for each layer group k (g layers, spec.layer_group): compute its layers;
           agent.write(peer, request_id, src_blocks, dst_blocks, range(k * g, k * g + g),
                       last=(k == G - 1), trace_context=tp)            # one-sided, non-blocking
    P: agent.poll() -> WRITE_DONE / WRITE_FAILED events                # sender side
    D: agent.poll() -> REQUEST_COMPLETE / REQUEST_FAILED events        # receiver side

The sender never talks to the receiver's scheduler; the receiver learns that a request's KV is
complete from the notifications attached to the writes, and that it failed from a dead control
link or from its own per-request deadline. Every method returns promptly: `connect` is the only
blocking call and it is bounded by a timeout; everything else is driven by `poll()`, which an
asyncio loop (or an engine thread) calls every millisecond or so.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from kv_transfer.spec import KVLayoutSpec
from kv_transfer.stats import TransferStats


class FailureReason(enum.StrEnum):
    """Why a transfer failed; also the label of the failure counters in `TransferStats`."""

    TIMEOUT = "timeout"  # a write or a request passed its deadline
    PEER_LOST = "peer_lost"  # the peer died, disconnected or stopped answering heartbeats
    HANDSHAKE = "handshake"  # the peer's protocol version, backend or KV layout differs
    AUTH = "auth"  # the peer did not present the cluster's shared token
    ABORTED = "aborted"  # the receiver gave up on the request (deadline, cancel)
    PROTOCOL = "protocol"  # a malformed notification or header
    BACKEND = "backend"  # NIXL / UCX reported an error
    CLOSED = "closed"  # this agent was closed


class TransferError(Exception):
    """A KV transfer failed; `reason` says why in a form a metric can count."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


class HandshakeError(TransferError):
    """A peer was refused on connect; `field` names what differs (e.g. "block_size", "token")."""

    def __init__(self, field: str, message: str) -> None:
        reason = FailureReason.AUTH if field == "token" else FailureReason.HANDSHAKE
        super().__init__(reason, f"{field}: {message}")
        self.field = field


class EventKind(enum.StrEnum):
    WRITE_DONE = "write_done"  # sender: the write's bytes landed in the peer's cache
    WRITE_FAILED = "write_failed"  # sender: the write did not complete (see `reason`)
    REQUEST_COMPLETE = "request_complete"  # receiver: every message of the request has landed
    REQUEST_FAILED = "request_failed"  # receiver: release the request's reserved blocks


@dataclass(frozen=True)
class TransferEvent:
    """One thing `poll()` observed. Sender events carry `write_id`; receiver events do not."""

    kind: EventKind
    request_id: str
    peer: str  # the other agent's name ("" when a receiver never heard from any sender)
    write_id: int | None = None
    reason: FailureReason | None = None
    message: str = ""
    nbytes: int = 0
    latency_s: float = 0.0  # write: post → done; request: first message (or expect) → complete
    trace_context: str = ""  # the opaque string the sender attached (last message's)

    @property
    def ok(self) -> bool:
        return self.kind in (EventKind.WRITE_DONE, EventKind.REQUEST_COMPLETE)

    def raise_for_failure(self) -> None:
        """Raises the event's failure as a `TransferError` (no-op for a success)."""
        if not self.ok:
            raise TransferError(self.reason or FailureReason.BACKEND, self.message)


@dataclass(frozen=True)
class TransferConfig:
    """How an agent talks to its peers. Every wait in the package is bounded by one of these."""

    token: str  # the cluster's shared secret; a peer without it is refused
    backend: str = "nixl"
    host: str = "127.0.0.1"  # where the control listener binds and what metadata() advertises
    port: int = 0  # 0: any free port
    connect_timeout_s: float = 10.0  # TCP connect + handshake + backend connection set-up
    write_timeout_s: float = 30.0  # one write's bytes must land within this
    request_timeout_s: float = 60.0  # receiver: default deadline for a request's KV to complete
    heartbeat_interval_s: float = 0.5  # control-link ping period
    peer_timeout_s: float = 5.0  # no bytes on the control link for this long → peer lost
    disconnect_grace_s: float = 0.2  # after a link drops, notifications still in flight land
    nixl_progress_thread: bool = False  # see README: the spinning thread costs a core here
    ucxx_error_handling: bool = True  # True: survives peer death (TCP); False: shared memory

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("token: must be a non-empty shared secret")
        for name in ("connect_timeout_s", "write_timeout_s", "request_timeout_s",
                     "heartbeat_interval_s", "peer_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.peer_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("peer_timeout_s: must exceed heartbeat_interval_s")
        if self.disconnect_grace_s < 0:
            raise ValueError(f"disconnect_grace_s: must be >= 0, got {self.disconnect_grace_s}")


class KVTransferAgent(Protocol):
    """Moves paged KV blocks between worker processes. One agent per process; any agent can
    both send and receive. Not thread-safe for concurrent callers beyond what each method says:
    call `write` and `poll` from one thread (an asyncio loop or the engine thread)."""

    name: str  # unique per process incarnation: a restarted worker is a new peer
    spec: KVLayoutSpec
    config: TransferConfig
    stats: TransferStats

    def register_cache(self, kv_cache: torch.Tensor) -> None:
        """Registers this worker's whole cache, `[G, N, g, 2, bs, Hkv, D]` (one allocation in
        groups of g = `spec.layer_group` layers, see engine/kv_cache.py), with the backend,
        once, and starts accepting peers. Raises `ValueError` if the tensor does not match
        `spec`."""
        ...

    def metadata(self) -> str:
        """What a peer passes to `connect` to reach this agent (an address string; it grants
        nothing by itself: the peer must still pass the token handshake). Valid after
        `register_cache`."""
        ...

    def connect(self, peer_metadata: str, timeout_s: float | None = None) -> str:
        """Connects to a peer (idempotent while the link is alive) and returns its name.

        Runs the versioned handshake: protocol version, backend, the shared token (HMAC
        challenge-response both ways) and every field of the KV layout spec. Blocks for at most
        `timeout_s` (default `config.connect_timeout_s`). Raises `HandshakeError` naming the
        field that differs, or `TransferError(PEER_LOST / TIMEOUT)` when it cannot reach the peer.
        A peer that died and restarted has a new name: connect to its new metadata."""
        ...

    def disconnect(self, peer: str) -> None:
        """Drops the link to `peer`; its incomplete writes fail with PEER_LOST, and the peer's
        incomplete requests from us fail on its side."""
        ...

    def write(self, peer: str, request_id: str, src_blocks: Sequence[int] | np.ndarray,
              dst_blocks: Sequence[int] | np.ndarray, layers: range, *, last: bool,
              trace_context: str = "") -> int:
        """Posts a one-sided write of `kv_layer(kv_cache, l)[src_blocks[i]]` into the peer's
        `kv_layer(kv_cache, l)[dst_blocks[i]]` for every `l` in `layers`, and returns a write id.

        Any layer range works; one that covers whole layer groups moves each group of a run of
        blocks adjacent on both sides as one contiguous region (the fast case: send a group as
        soon as its last layer is computed). Other ranges move smaller regions.

        Non-blocking: completion arrives as a WRITE_DONE / WRITE_FAILED event from `poll()`
        (failed after `config.write_timeout_s` at the latest). A notification travels with the
        bytes and reaches the peer only after they landed: it names the request, the layers and
        blocks, this write's sequence number within the request, the opaque `trace_context`, and
        on the `last=True` write the total number of writes, so the receiver can mark the
        request complete whatever order the notifications arrive in. A request's writes may be
        any mix of layer ranges and block lists (group by group, chunk by chunk).

        Raises `ValueError` for block ids or layers out of range, `TransferError(PEER_LOST)` for
        a peer that is gone, `TransferError(ABORTED)` if the receiver already gave up on
        `request_id`. The source blocks must not change until the write is done."""
        ...

    def expect(self, request_id: str, timeout_s: float | None = None) -> None:
        """Receiver: starts the request's deadline now (default `config.request_timeout_s`).
        Without it the deadline starts at the first notification, so a sender that dies before
        sending anything would go unnoticed; call it when reserving the blocks."""
        ...

    def release(self, request_id: str) -> None:
        """Receiver: forgets a request (cancelled, or its events handled); later notifications
        for it are dropped and the sender is told to stop writing it. NOTE: a write already in
        flight may still land in the request's blocks; see README ("reusing blocks")."""
        ...

    def poll(self) -> list[TransferEvent]:
        """Drives the backend and returns every event since the last call, each exactly once.
        Never blocks for long (no network waits); call it often (~1 ms) while transfers run."""
        ...

    def in_flight(self) -> bool:
        """True while `poll()` has work to settle: a write this agent posted that is not yet
        done or failed, or a write a sender announced to this agent that has not landed yet.
        Poll every ~1 ms while it is: polling also moves transfers on (a NIXL write completes
        only once the receiver's worker has progressed; ucxx receives progress only in
        `poll()`). Cheap; call it from the polling thread."""
        ...

    def next_deadline(self) -> float | None:
        """The earliest time (time.monotonic()) at which `poll()` has a timer to fire while
        nothing is in flight — a receiver's request deadline (`expect`), a lost sender's grace
        —, or None. A thread that polls only when woken (`set_wakeup`) must poll by then."""
        ...

    def set_wakeup(self, wake: Callable[[], None]) -> None:
        """`wake()` is called, from a background thread, as soon as something reaches this
        agent's control link: a sender announces a write (each `write` is announced), a peer
        connects, aborts or is lost. A thread that polls only while `in_flight()` and
        otherwise sleeps until woken or until `next_deadline()` misses nothing."""
        ...

    def close(self) -> None:
        """Fails everything in flight with CLOSED, drops all links, deregisters the cache."""
        ...
