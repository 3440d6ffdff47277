"""The cluster secret: the one shared secret (`transfer_token`, `TANDEM_TRANSFER_TOKEN`) that
authenticates the KV transfer links (an HMAC challenge, `kv_transfer/control.py`) and the
router's calls to the workers' internal gRPC services (`tandem.v1.Prefill`, `Decode`,
`Worker`).

On gRPC the router sends, in metadata `x-tandem-cluster-auth`, a credential derived from the
secret (an HMAC-SHA256 of a fixed label), not the secret: a sniffer of plaintext gRPC may
replay calls (TLS is what stops that) but cannot join the transfer links. Workers compare it in
constant time. Unset on loopback, router and workers use the local development secret, with a
warning; on any other address a worker refuses to start without one, and so does the router.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Collection

from grpc import aio

from cluster.grpc_auth import MetadataAuthInterceptor, metadata_interceptors

log = logging.getLogger(__name__)

# The secret of a process left without one; accepted on loopback only, where every peer is a
# process of the same machine.
LOCAL_DEV_TOKEN = "tandem-dev-token"
METADATA_KEY = "x-tandem-cluster-auth"
INTERNAL_SERVICES = ("tandem.v1.Prefill", "tandem.v1.Decode", "tandem.v1.Worker")
_LABEL = b"tandem.v1 internal gRPC"  # domain separation from the transfer handshake's HMACs


def secret_or_dev(token: str | None, who: str) -> str:
    """`token`, or the development secret with a warning (the config checked it may be)."""
    if token is not None:
        return token
    log.warning("%s: transfer_token is unset: the cluster secret is the local development "
                "secret (allowed on loopback only; set --transfer-token or "
                "TANDEM_TRANSFER_TOKEN for a real cluster)", who)
    return LOCAL_DEV_TOKEN


def credential(secret: str) -> str:
    """What a caller of the internal services presents: HMAC-SHA256(secret, label), hex."""
    return hmac.new(secret.encode(), _LABEL, hashlib.sha256).hexdigest()


def client_interceptors(secret: str) -> list[aio.ClientInterceptor]:
    """For a channel to workers whose every call should carry the credential."""
    return metadata_interceptors(call_metadata(secret))


def call_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """The metadata a call to an internal service carries (`metadata=` of each call: what the
    router's clients pass, cheaper than an interceptor, which adds a task to every call)."""
    return ((METADATA_KEY, credential(secret)),)


def server_interceptor(secret: str, services: Collection[str] = INTERNAL_SERVICES,
                       on_refused: Callable[[str], None] | None = None,
                       ) -> MetadataAuthInterceptor:
    """For a worker's server: calls to `services` without the credential get
    UNAUTHENTICATED (health and reflection stay open)."""
    expected = credential(secret).encode()

    def accepts(value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), expected)

    return MetadataAuthInterceptor(
        services, METADATA_KEY, accepts, on_refused=on_refused,
        hint=f"internal service: metadata {METADATA_KEY!r} must carry the cluster secret's "
             f"credential (the router's transfer_token must be the workers')")
