"""Transfer grants: a decode worker's signed permission to write into one reservation.

The cluster credential on the internal RPCs (`cluster.cluster_secret`) says a call comes from
someone holding the secret, but it is a fixed value a sniffer of plaintext gRPC can replay,
and it says nothing about *where* a Prefill may write. A grant does: the decode worker's
Reserve reply carries an HMAC-SHA256, under a key derived from the cluster secret, over

    (the attempt id, the signer's role and worker id, its transfer endpoint — agent address and
     compatibility hash —, the reserved block ids, the cached block count, the lease expiry)

and the router passes it unchanged in the Prefill's `DecodeTarget`. The prefill worker checks
it before it computes or writes anything: a Prefill whose target is not the endpoint a decode
worker signed (a forged address, a prefill or aggregated worker's agent, another decode
worker), whose block ids are not the ones reserved for that attempt (block ids 0–1023 aimed
at the cached prefix), or whose lease has ended is refused with PERMISSION_DENIED naming what
differs. The agent's handshake (an HMAC challenge with the same secret) then proves the peer
at the signed address is a cluster member.

A grant is bound to a lease, not to the reservation's life: a reservation released early
(a cancel) leaves its grant valid until the lease ends; the decode worker's quarantine covers
writes that race the release.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.errors import Forbidden

_LABEL = b"tandem.v1 transfer grant"  # domain separation from the other uses of the secret
_VERSION = 1
SIGNER_ROLE = "decode"  # only a decode worker's reservations may receive a prefill's KV


@dataclass(frozen=True)
class GrantedTarget:
    """What a grant covers: one attempt's reservation on one decode worker."""

    request_id: str
    worker_id: str
    endpoint_metadata: str  # the decode worker's transfer agent address
    compat_hash: str
    block_ids: tuple[int, ...]
    num_cached_blocks: int
    expires_unix_ms: int

    def message(self, role: str) -> bytes:
        """The signed bytes: canonical JSON of every field, the signer's role included."""
        return json.dumps([_VERSION, role, self.request_id, self.worker_id,
                           self.endpoint_metadata, self.compat_hash, list(self.block_ids),
                           self.num_cached_blocks, self.expires_unix_ms],
                          separators=(",", ":")).encode()


def _key(secret: str) -> bytes:
    return hmac.new(secret.encode(), _LABEL, hashlib.sha256).digest()


def sign(secret: str, target: GrantedTarget, role: str = SIGNER_ROLE) -> bytes:
    """The grant's MAC (32 bytes), by a worker of `role`."""
    return hmac.new(_key(secret), target.message(role), hashlib.sha256).digest()


def verify(secret: str, target: GrantedTarget, mac: bytes, now_unix_ms: int) -> None:
    """Raises `Forbidden` unless `mac` is a decode worker's grant of exactly `target` and its
    lease has not ended at `now_unix_ms`."""
    if not mac:
        raise Forbidden("target.grant: missing: a Prefill may write only into blocks a decode "
                        "worker reserved (pass the grant of its Reserve reply)")
    if not hmac.compare_digest(sign(secret, target), mac):
        raise Forbidden(f"target.grant: does not cover this target: the endpoint, block ids, "
                        f"cached blocks or lease differ from what decode worker "
                        f"{target.worker_id!r} reserved for {target.request_id!r}, or it was "
                        f"not signed by a decode worker of this cluster")
    if now_unix_ms >= target.expires_unix_ms:
        raise Forbidden(f"target.grant: expired: the lease on decode worker "
                        f"{target.worker_id!r} ended {now_unix_ms - target.expires_unix_ms} ms "
                        f"ago")


def target_of(request_id: str, worker_id: str, endpoint_metadata: str, compat_hash: str,
              block_ids: Sequence[int], num_cached_blocks: int,
              expires_unix_ms: int) -> GrantedTarget:
    return GrantedTarget(request_id, worker_id, endpoint_metadata, compat_hash,
                         tuple(int(b) for b in block_ids), num_cached_blocks, expires_unix_ms)
