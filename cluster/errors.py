"""Domain errors shared by the router and the workers.

Plain exceptions with no gRPC import, so that pure code (routing policies, the prefix index)
can raise them; `cluster.grpc_errors` maps them to gRPC status codes at the service edge.
"""

from __future__ import annotations


class TandemError(Exception):
    """Base of the errors that reach a client as a specific gRPC status code."""


class InvalidRequest(TandemError):
    """The request is malformed; `field` names the offending field (e.g. "sampling.top_p")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class AlreadyRunning(TandemError):
    """A request with this id is already running (ids must be unique among running requests)."""


class NoCapacity(TandemError):
    """No worker can take the request now (blocks or queue full); the client may retry."""


class NoWorker(TandemError):
    """No live (or compatible) worker of a needed role."""


class DeadlineExceeded(TandemError):
    """A wait ran past its deadline (transfer, reservation lease, request deadline)."""


class Cancelled(TandemError):
    """The request was cancelled (by the client, the router or a peer)."""


class UnknownRequest(TandemError):
    """A request id the worker does not hold (never reserved, or already released)."""


class HandshakeMismatch(TandemError):
    """Two workers cannot exchange KV blocks: their transfer compatibility hashes differ."""

    def __init__(self, prefill_worker_id: str, decode_worker_id: str, detail: str) -> None:
        super().__init__(f"{prefill_worker_id} -> {decode_worker_id}: {detail}")
        self.prefill_worker_id = prefill_worker_id
        self.decode_worker_id = decode_worker_id
        self.detail = detail


class Forbidden(TandemError):
    """An authenticated caller asked for something it holds no grant for (a Prefill whose
    target is not a live reservation of a decode worker: `cluster.transfer_grant`)."""


class LimitExceeded(TandemError):
    """A request is over a configured limit (stream count per API token, ...); the message
    names the limit and its value."""


class IndexUnavailable(TandemError):
    """Redis (prefix index or registry) did not answer in time; the router degrades."""


class TransferFailed(TandemError):
    """The KV transfer to the chosen decode worker failed; the router tries another pair."""
