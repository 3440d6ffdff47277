"""The default backend: NIXL over UCX, one-sided WRITE from the sender's cache straight into the
receiver's reserved blocks, zero-copy on both sides (single-copy CMA between processes on one
host, RDMA across hosts), with NIXL's notification delivered after the bytes.

Descriptor lists are prepared once: the local cache at `register_cache`, each peer's cache at
`connect`, both as one descriptor per (layer, block) unit in memory order (kv_transfer/spec.py).
A write is then one `make_prepped_xfer` with two index arrays, listed in memory order
(`spec.unit_ids`). NIXL merges consecutive descriptors that are adjacent on both sides when it
builds the request (its telemetry, `descCount`, reports one descriptor per merged region), so a
write of whole layer groups costs one descriptor per (group, run of blocks adjacent on both
sides), and any other layer range still works, with smaller regions.

Memory. The cache registers as what it is (NIXL reads a tensor's device: DRAM, or VRAM with its
CUDA ordinal); the descriptor lists say the same, ours from our spec, the peer's from the
`memory_type` and `device_id` of its spec, sent in its backend metadata (the handshake has
already refused a peer whose memory type differs from ours).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kv_transfer.agent import BaseAgent
from kv_transfer.base import FailureReason, TransferConfig, TransferError
from kv_transfer.netdev import ucx_env, ucx_net_devices
from kv_transfer.spec import KVLayoutSpec

log = logging.getLogger(__name__)


@dataclass
class _Remote:
    nixl_name: str
    dlist: Any  # nixl_prepped_dlist_handle over the peer's L * N_peer (layer, block) units
    num_blocks: int


def block_descs(base: int, count: int, block_bytes: int, device_id: int) -> np.ndarray:
    """[count, 3] (address, length, device id) rows, one per (layer, block) unit in memory
    order."""
    addrs = base + np.arange(count, dtype=np.uint64) * np.uint64(block_bytes)  # [count]
    descs = np.zeros((count, 3), dtype=np.uint64)  # [count, 3]
    descs[:, 0] = addrs
    descs[:, 1] = block_bytes
    descs[:, 2] = device_id
    return descs


def peer_memory(backend_md: dict[str, Any]) -> tuple[str, int]:
    """(memory type, device id) of a peer's cache, from the metadata its welcome carried."""
    return str(backend_md["memory_type"]), int(backend_md["device_id"])


def _as_transfer_error(e: Exception, what: str) -> TransferError:
    if type(e).__name__ == "nixlRemoteDisconnectError":
        return TransferError(FailureReason.PEER_LOST, f"{what}: the peer disconnected ({e})")
    return TransferError(FailureReason.BACKEND, f"{what}: {type(e).__name__}: {e}")


class NixlAgent(BaseAgent):
    """`KVTransferAgent` over NIXL (`nixl-cu12`, UCX backend)."""

    backend_name = "nixl"

    def __init__(self, spec: KVLayoutSpec, config: TransferConfig) -> None:
        super().__init__(spec, config)
        from nixl_cu12._api import nixl_agent, nixl_agent_config

        # NIXL's UCX backend reads UCX_NET_DEVICES when it builds its context (its own
        # `ucx_devices` parameter still left a listener on every interface, NIXL 1.5.1)
        with ucx_env(NET_DEVICES=ucx_net_devices(config.host)):
            self._nixl = nixl_agent(self.name, nixl_agent_config(
                enable_prog_thread=config.nixl_progress_thread, enable_listen_thread=False,
                backends=["UCX"]))
        self._reg: Any = None
        self._local: Any = None  # prepped dlist over our L * N (layer, block) units
        self._remotes: dict[str, _Remote] = {}

    def _register(self, kv_cache: torch.Tensor, num_blocks: int) -> dict[str, Any]:
        self._reg = self._nixl.register_memory(kv_cache)  # the whole [G, N, g, 2, bs, Hkv, D]
        count = self.spec.num_layers * num_blocks
        spec = self.spec
        self._local = self._nixl.prep_xfer_dlist(
            "NIXL_INIT_AGENT",
            block_descs(kv_cache.data_ptr(), count, spec.block_bytes, spec.device_id),
            spec.memory_type)
        return {"nixl_md": base64.b64encode(self._nixl.get_agent_metadata()).decode(),
                "base": kv_cache.data_ptr(), "block_bytes": spec.block_bytes,
                "memory_type": spec.memory_type, "device_id": spec.device_id}

    def _open_peer(self, peer: str, backend_md: dict[str, Any], conn_id: int,
                   timeout_s: float) -> None:
        if backend_md["block_bytes"] != self.spec.block_bytes:
            raise ValueError(f"peer block_bytes {backend_md['block_bytes']} != "
                             f"{self.spec.block_bytes}")
        nixl_name = self._nixl.add_remote_agent(base64.b64decode(backend_md["nixl_md"]))
        num_blocks = int(backend_md["num_blocks"])
        memory_type, device_id = peer_memory(backend_md)
        dlist = self._nixl.prep_xfer_dlist(nixl_name, block_descs(
            int(backend_md["base"]), self.spec.num_layers * num_blocks, self.spec.block_bytes,
            device_id), memory_type)
        self._nixl.make_connection(nixl_name)  # wire up now, not on the first write
        self._remotes[peer] = _Remote(nixl_name, dlist, num_blocks)

    def _close_peer(self, peer: str) -> None:
        remote = self._remotes.pop(peer, None)
        if remote is not None:
            remote.dlist.release()
            self._nixl.remove_remote_agent(remote.nixl_name)

    def _post_write(self, peer: str, src: np.ndarray, dst: np.ndarray, layers: range,
                    notif: bytes) -> Any:
        remote = self._remotes[peer]
        local_idx = self.spec.unit_ids(layers, src, self._num_blocks).astype(np.int32)  # [nl*n]
        remote_idx = self.spec.unit_ids(layers, dst, remote.num_blocks).astype(np.int32)  # [nl*n]
        try:
            xfer = self._nixl.make_prepped_xfer("WRITE", self._local, local_idx, remote.dlist,
                                                remote_idx, notif)
            state = self._nixl.transfer(xfer)
        except Exception as e:
            raise _as_transfer_error(e, f"posting a write to {peer}") from e
        if state == "ERR":
            self._cancel_write(xfer)
            raise TransferError(FailureReason.BACKEND, f"NIXL refused a write to {peer}")
        return xfer

    def _check_write(self, handle: Any) -> bool:
        try:
            state = self._nixl.check_xfer_state(handle)
        except Exception as e:
            raise _as_transfer_error(e, "write") from e
        if state == "DONE":
            handle.release()
            return True
        if state == "ERR":
            raise TransferError(FailureReason.BACKEND, "NIXL reported the write failed")
        return False

    def _cancel_write(self, handle: Any) -> None:
        handle.release()

    def _landed(self) -> list[tuple[str, bytes]]:
        notifs = self._nixl.get_new_notifs()
        return [(name, msg) for name, msgs in notifs.items() for msg in msgs]

    def _shutdown(self) -> None:
        if self._local is not None:
            self._local.release()
        if self._reg is not None:
            self._nixl.deregister_memory(self._reg)
        self._reg = self._local = None
