"""Moving paged KV blocks between worker processes (prefill → decode), a layer group at a time.

Start with `base.py` (the interface, config, events, errors), then `registry.create_agent`.
Module map: spec (layout compatibility), handshake + control (peers, token, liveness),
agent (shared bookkeeping), tracker (receiver completion), nixl_backend / ucxx_backend (bytes),
stats (metrics hooks), bench (`python -m kv_transfer.bench`).
"""

from kv_transfer.base import (
    EventKind,
    FailureReason,
    HandshakeError,
    KVTransferAgent,
    TransferConfig,
    TransferError,
    TransferEvent,
)
from kv_transfer.registry import BACKENDS, create_agent
from kv_transfer.spec import KVLayoutSpec
from kv_transfer.stats import TransferStats

__all__ = [
    "BACKENDS",
    "EventKind",
    "FailureReason",
    "HandshakeError",
    "KVLayoutSpec",
    "KVTransferAgent",
    "TransferConfig",
    "TransferError",
    "TransferEvent",
    "TransferStats",
    "create_agent",
]
