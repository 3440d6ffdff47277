"""The versioned connect handshake: token check (HMAC challenge-response both ways), protocol
version, backend and every KV layout field, refused with the name of the field that differs.

    client                                  server (the agent being connected to)
      ── TCP connect ──────────────────────▶
      ◀── challenge {nonce_s, version} ─────
      ── hello {version, backend, agent, spec, spec_hash, nonce_c, mac(token, nonce_s)} ─▶
      ◀── welcome {agent, spec, backend_md, conn_id, mac(token, nonce_c)}  or  refused {field} ─
The spec fields travel in clear (not only the hash) so a refusal can name the field. The token
never travels: a MAC over a fresh nonce proves each side knows it. The backend metadata (which
lets a peer write into our memory) is only sent after the client proved it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

from kv_transfer.base import HandshakeError
from kv_transfer.spec import KVLayoutSpec

PROTOCOL_VERSION = 1


def new_nonce() -> str:
    return secrets.token_hex(16)


def mac(token: str, nonce: str, body: dict[str, Any]) -> str:
    """HMAC-SHA256 over the nonce and the canonical JSON of `body` (without its "mac")."""
    payload = {k: v for k, v in body.items() if k != "mac"}
    blob = nonce.encode() + json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(token.encode(), blob, hashlib.sha256).hexdigest()


def make_hello(token: str, server_nonce: str, *, agent: str, backend: str,
               spec: KVLayoutSpec) -> dict[str, Any]:
    hello: dict[str, Any] = {
        "t": "hello", "protocol_version": PROTOCOL_VERSION, "backend": backend, "agent": agent,
        "spec": spec.to_dict(), "spec_hash": spec.compat_hash, "nonce": new_nonce(),
    }
    hello["mac"] = mac(token, server_nonce, hello)
    return hello


def make_welcome(token: str, client_nonce: str, *, agent: str, backend: str, spec: KVLayoutSpec,
                 backend_md: dict[str, Any], conn_id: int) -> dict[str, Any]:
    welcome: dict[str, Any] = {
        "t": "welcome", "protocol_version": PROTOCOL_VERSION, "backend": backend, "agent": agent,
        "spec": spec.to_dict(), "spec_hash": spec.compat_hash, "backend_md": backend_md,
        "conn_id": conn_id,
    }
    welcome["mac"] = mac(token, client_nonce, welcome)
    return welcome


def refusal(err: HandshakeError) -> dict[str, Any]:
    return {"t": "refused", "field": err.field, "error": err.message}


def verify(token: str, nonce: str, msg: dict[str, Any], *, backend: str,
           spec: KVLayoutSpec) -> None:
    """Checks a peer's hello or welcome against ours; raises `HandshakeError` naming the first
    field that differs. The token is checked first so an outsider learns nothing else."""
    if not isinstance(msg.get("mac"), str) or not hmac.compare_digest(
            msg["mac"], mac(token, nonce, msg)):
        raise HandshakeError("token", "the peer did not present the cluster's shared token")
    if msg.get("protocol_version") != PROTOCOL_VERSION:
        raise HandshakeError("protocol_version", f"this agent speaks {PROTOCOL_VERSION}, "
                                                 f"the peer {msg.get('protocol_version')!r}")
    if msg.get("backend") != backend:
        raise HandshakeError("backend", f"this agent uses {backend!r}, the peer "
                                        f"{msg['backend']!r}")
    peer_spec = msg.get("spec")
    if not isinstance(peer_spec, dict):
        raise HandshakeError("spec", "the peer sent no KV layout spec")
    diff = spec.differing_fields(peer_spec)
    if diff:
        name = diff[0]
        raise HandshakeError(name, f"KV layout mismatch: this worker has "
                                   f"{getattr(spec, name)!r}, the peer {peer_spec.get(name)!r}"
                                   + (f" (also differ: {', '.join(diff[1:])})" if diff[1:]
                                      else ""))
    if msg.get("spec_hash") != spec.compat_hash:
        raise HandshakeError("spec_hash", "same fields but a different compatibility hash "
                                          "(different hash function version?)")
