"""The second backend: `ucxx` (the maintained successor of ucx-py), two-sided.

ucxx's Python API has no one-sided put, so a write is a header message followed by one tag
message per contiguous region: a run of (layer, block) units adjacent in memory on both sides
(kv_transfer/spec.py; a whole layer group of a run of adjacent blocks is one region). The
receiver's `poll()` reads the header and posts a receive for each region directly into the
reserved blocks of its registered cache: zero-copy on both sides, no staging buffer, but the
receiver must call `poll()` for bytes to move. The notification is the header; the message
"lands" when every region's receive completed.

`TransferConfig.ucxx_error_handling`: True (default) creates endpoints with peer error handling,
which UCX only offers over TCP here (~1 GB/s) but which turns a dead peer into an error; False
lets UCX use shared memory (several times faster) but a peer dying mid-transfer can abort the
*receiving process* inside UCX, which no Python code can catch. Use False only where a crashed
peer may take its partner down with it.

Tags (64 bits): conn id (20) | write sequence on this link (24) | region index (20, 0 = header).
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kv_transfer.agent import BaseAgent
from kv_transfer.base import FailureReason, TransferConfig, TransferError
from kv_transfer.buffers import ucx_buffer
from kv_transfer.netdev import ucx_net_devices
from kv_transfer.spec import KVLayoutSpec

log = logging.getLogger(__name__)

_SEQ_BITS, _REGION_BITS = 24, 20
_MAX_REGIONS = (1 << _REGION_BITS) - 1


def _tag(conn_id: int, seq: int, region: int) -> int:
    return ((conn_id << (_SEQ_BITS + _REGION_BITS)) | ((seq % (1 << _SEQ_BITS)) << _REGION_BITS)
            | region)


def coalesce(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) runs of id pairs adjacent on both sides, in order (ids of
    blocks or of (layer, block) units)."""
    brk = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1  # run starts after 0
    starts = np.concatenate(([0], brk))
    lengths = np.diff(np.concatenate((starts, [len(src)])))
    return [(int(src[s]), int(dst[s]), int(n)) for s, n in zip(starts, lengths, strict=True)]


@dataclass
class _OutWrite:
    requests: list[Any]
    keepalive: list[Any]  # the header buffer must outlive its send
    done_upto: int = 0


@dataclass
class _Outbound:
    endpoint: Any
    conn_id: int
    num_blocks: int  # the peer's
    next_seq: int = 0


@dataclass
class _InMsg:
    notif: bytes
    requests: list[Any]
    done_upto: int = 0


@dataclass
class _Inbound:
    peer: str
    next_seq: int = 0
    header_buf: np.ndarray | None = None
    header_req: Any = None
    messages: list[_InMsg] = field(default_factory=list)


class UcxxAgent(BaseAgent):
    """`KVTransferAgent` over ucxx tag messages (two-sided; see the module docstring)."""

    backend_name = "ucxx"

    def __init__(self, spec: KVLayoutSpec, config: TransferConfig) -> None:
        super().__init__(spec, config)
        import ucxx._lib.libucxx as ucx
        from ucxx._lib.arr import Array

        self._ucx, self._Array = ucx, Array
        devices = ucx_net_devices(config.host)  # UCX's listeners on that interface only
        self._context = ucx.UCXContext({"NET_DEVICES": devices} if devices else {},
                                       feature_flags=(ucx.Feature.TAG,))
        self._worker = ucx.UCXWorker(self._context)
        self._cache_u8: torch.Tensor | None = None  # [L * N, block_bytes]: the cache's units
        self._out: dict[str, _Outbound] = {}
        self._in: dict[int, _Inbound] = {}

    def _register(self, kv_cache: torch.Tensor, num_blocks: int) -> dict[str, Any]:
        # [L * N, block_bytes], shares memory with kv_cache (on its device)
        self._cache_u8 = kv_cache.view(torch.uint8).view(self.spec.num_layers * num_blocks, -1)
        address = self._worker.address
        return {"ucx_address": base64.b64encode(bytes(address)).decode(),
                "block_bytes": self.spec.block_bytes}

    def _open_peer(self, peer: str, backend_md: dict[str, Any], conn_id: int,
                   timeout_s: float) -> None:
        address = self._ucx.UCXAddress.create_from_buffer(
            base64.b64decode(backend_md["ucx_address"]))
        endpoint = self._worker.create_endpoint_from_worker_address(
            address, self.config.ucxx_error_handling)
        self._out[peer] = _Outbound(endpoint, conn_id, int(backend_md["num_blocks"]))

    def _close_peer(self, peer: str) -> None:
        # Only drop the reference: ucxx's destructor closes the endpoint safely, while an
        # explicit `close()` on an endpoint whose peer died crashes the process (ucxx 0.52).
        self._out.pop(peer, None)

    def _post_write(self, peer: str, src: np.ndarray, dst: np.ndarray, layers: range,
                    notif: bytes) -> Any:
        assert self._cache_u8 is not None
        out = self._out[peer]
        regions = coalesce(self.spec.unit_ids(layers, src, self._num_blocks),
                           self.spec.unit_ids(layers, dst, out.num_blocks))
        if len(regions) > _MAX_REGIONS:
            raise ValueError(f"one write may carry at most {_MAX_REGIONS} regions")
        header = np.frombuffer(bytearray(json.dumps(
            {"n": notif.decode(), "r": [[d, n] for _, d, n in regions]}).encode()),
            dtype=np.uint8)
        seq = out.next_seq
        out.next_seq += 1
        ucx = self._ucx
        try:
            reqs = [out.endpoint.tag_send(self._Array(header), ucx.UCXXTag(_tag(out.conn_id, seq,
                                                                                 0)))]
            for i, (s, _, n) in enumerate(regions, start=1):
                region = self._cache_u8[s:s + n].view(-1)  # [n * block_bytes], a view
                reqs.append(out.endpoint.tag_send(self._Array(ucx_buffer(region)),
                                                  ucx.UCXXTag(_tag(out.conn_id, seq, i))))
            self._worker.progress()
        except Exception as e:
            raise TransferError(FailureReason.PEER_LOST, f"posting a write to {peer}: {e}") from e
        return _OutWrite(reqs, [header])

    def _check_write(self, handle: Any) -> bool:
        self._worker.progress()
        return self._advance(handle)

    def _advance(self, op: _OutWrite | _InMsg) -> bool:
        reqs = op.requests
        while op.done_upto < len(reqs) and reqs[op.done_upto].completed:
            try:
                reqs[op.done_upto].check_error()
            except Exception as e:
                raise TransferError(FailureReason.PEER_LOST,
                                    f"UCX: {type(e).__name__}: {e}") from e
            op.done_upto += 1
        return op.done_upto == len(reqs)

    def _cancel_write(self, handle: Any) -> None:
        pass  # ucxx has no per-request cancel; the requests die with their endpoint

    def _receiving(self) -> bool:
        return any(inb.header_req is not None or inb.messages for inb in self._in.values())

    def _accept_peer(self, peer: str, conn_id: int) -> None:
        self._in[conn_id] = _Inbound(peer)

    def _drop_inbound(self, peer: str) -> None:
        for conn_id in [c for c, inb in self._in.items() if inb.peer == peer]:
            del self._in[conn_id]

    def _landed(self) -> list[tuple[str, bytes]]:
        self._worker.progress()
        landed = []
        for conn_id, inb in self._in.items():
            self._read_headers(conn_id, inb)
            while inb.messages:
                try:
                    if not self._advance(inb.messages[0]):
                        break
                except TransferError as e:
                    log.warning("dropping a write from %s: %s", inb.peer, e)
                landed.append((inb.peer, inb.messages.pop(0).notif))
        return landed

    def _read_headers(self, conn_id: int, inb: _Inbound) -> None:
        """Takes every header that has arrived and posts its region receives."""
        ucx = self._ucx
        while True:
            tag = ucx.UCXXTag(_tag(conn_id, inb.next_seq, 0))
            if inb.header_req is None:
                probe = self._worker.tag_probe(tag)
                if not probe.matched:
                    return
                inb.header_buf = np.empty(probe.length, dtype=np.uint8)  # [header bytes]
                inb.header_req = self._worker.tag_recv(self._Array(inb.header_buf), tag)
                self._worker.progress()
            if not inb.header_req.completed:
                return
            assert inb.header_buf is not None
            header_bytes = inb.header_buf.tobytes()
            inb.header_req = inb.header_buf = None
            seq = inb.next_seq
            inb.next_seq += 1
            try:
                self._post_receives(conn_id, inb, seq, header_bytes)
            except (ValueError, KeyError, TypeError) as e:
                log.error("bad write header from %s (write dropped): %s", inb.peer, e)

    def _post_receives(self, conn_id: int, inb: _Inbound, seq: int, raw: bytes) -> None:
        assert self._cache_u8 is not None
        header = json.loads(raw)
        num_units = self._cache_u8.shape[0]
        reqs = []
        for i, (d, n) in enumerate(header["r"], start=1):
            if not (d >= 0 and n > 0 and d + n <= num_units):
                raise ValueError(f"region {(d, n)} outside the cache")
            region = self._cache_u8[d:d + n].view(-1)  # [n * block_bytes], a view
            reqs.append(self._worker.tag_recv(self._Array(ucx_buffer(region)),
                                              self._ucx.UCXXTag(_tag(conn_id, seq, i))))
        inb.messages.append(_InMsg(str(header["n"]).encode(), reqs))

    def _shutdown(self) -> None:
        for peer in list(self._out):
            self._close_peer(peer)
        self._in.clear()
        self._cache_u8 = None
