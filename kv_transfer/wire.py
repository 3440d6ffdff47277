"""Byte formats: the per-write notification, and the length-prefixed JSON frames of the control
link."""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

_NOTIF_TAG = "tkv1"  # first element of every notification: lets a receiver reject foreign bytes
_FRAME_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 16 << 20  # backend metadata is a few KiB; anything near this is garbage


@dataclass(frozen=True)
class Notification:
    """Travels with one write and reaches the receiver after the write's bytes landed."""

    request_id: str
    layer_start: int
    layer_end: int  # exclusive
    num_blocks: int
    seq: int  # this write's index among the request's writes to this peer (0, 1, ...)
    total: int  # on the last write: the number of writes of the request; otherwise 0
    nbytes: int
    trace_context: str = ""

    def encode(self) -> bytes:
        return json.dumps(
            [_NOTIF_TAG, self.request_id, self.layer_start, self.layer_end, self.num_blocks,
             self.seq, self.total, self.nbytes, self.trace_context],
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Notification:
        """Parses `encode()`'s output; raises ValueError on anything else."""
        try:
            tag, rid, ls, le, nb, seq, total, nbytes, trace = json.loads(raw)
        except (ValueError, TypeError) as e:
            raise ValueError(f"malformed notification {raw[:64]!r}") from e
        if tag != _NOTIF_TAG or not isinstance(rid, str):
            raise ValueError(f"not a KV notification: {raw[:64]!r}")
        return cls(rid, int(ls), int(le), int(nb), int(seq), int(total), int(nbytes), str(trace))


def encode_frame(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    return _FRAME_HEADER.pack(len(body)) + body


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """Reads one frame from a blocking socket (its timeout bounds the wait)."""
    (size,) = _FRAME_HEADER.unpack(_recv_exact(sock, _FRAME_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"control frame of {size} bytes is too large")
    msg = json.loads(_recv_exact(sock, size))
    if not isinstance(msg, dict):
        raise ValueError("control frame is not a JSON object")
    return msg


def split_frames(buf: bytearray) -> list[dict[str, Any]]:
    """Removes every complete frame from the front of `buf` and returns them."""
    out = []
    while len(buf) >= _FRAME_HEADER.size:
        (size,) = _FRAME_HEADER.unpack_from(buf)
        if size > MAX_FRAME_BYTES:
            raise ValueError(f"control frame of {size} bytes is too large")
        end = _FRAME_HEADER.size + size
        if len(buf) < end:
            break
        out.append(json.loads(bytes(buf[_FRAME_HEADER.size:end])))
        del buf[:end]
    return out


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionError("peer closed the connection during the handshake")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
