"""Fast in-process tests of the pieces without I/O: spec, wire formats, tracker, handshake
checks, coalescing and stats."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from engine.kv_cache import CacheShape, allocate_kv_cache, kv_layer
from kv_transfer import EventKind, FailureReason, HandshakeError, KVLayoutSpec, TransferConfig
from kv_transfer.handshake import make_hello, make_welcome, new_nonce, verify
from kv_transfer.nixl_backend import block_descs, peer_memory
from kv_transfer.stats import TransferStats
from kv_transfer.tracker import RequestTracker
from kv_transfer.ucxx_backend import coalesce
from kv_transfer.wire import Notification, encode_frame, split_frames

SHAPE = CacheShape(num_layers=32, num_blocks=100, block_size=16, num_kv_heads=8, head_dim=128,
                   dtype=torch.bfloat16, layer_group=8)


def test_spec_from_cache_shape() -> None:
    spec = KVLayoutSpec.from_cache_shape(SHAPE, "llama-3-8b")
    assert spec.dtype == "bfloat16" and spec.layout == SHAPE.layout_name == "GBgTSHD/g=8"
    assert spec.block_bytes == SHAPE.block_bytes_per_layer == 64 * 1024
    assert spec.layer_group == 8 and spec.dims(100) == SHAPE.dims
    assert spec.compat_hash == KVLayoutSpec.from_cache_shape(SHAPE, "llama-3-8b").compat_hash
    other = KVLayoutSpec.from_cache_shape(SHAPE, "llama-3-8b-instruct")
    assert other.compat_hash != spec.compat_hash
    assert spec.differing_fields(other.to_dict()) == ["model_name"]


def test_spec_memory_type_is_compared_and_device_id_is_carried() -> None:
    """A CPU worker and a GPU worker refuse each other; two GPUs of different ordinals do not."""
    cpu = KVLayoutSpec.from_cache_shape(SHAPE, "llama-3-8b")
    gpu0 = KVLayoutSpec.from_cache_shape(SHAPE, "llama-3-8b", "cuda")
    gpu1 = KVLayoutSpec.from_cache_shape(SHAPE, "llama-3-8b", torch.device("cuda", 1))
    assert (cpu.memory_type, cpu.device_id) == ("DRAM", 0)
    assert (gpu0.memory_type, gpu0.device_id, gpu1.device_id) == ("VRAM", 0, 1)
    assert gpu1.torch_device == torch.device("cuda", 1) and cpu.torch_device.type == "cpu"
    assert cpu.differing_fields(gpu0.to_dict()) == ["memory_type"]
    assert cpu.compat_hash != gpu0.compat_hash
    assert gpu0.differing_fields(gpu1.to_dict()) == [] and gpu0.compat_hash == gpu1.compat_hash
    assert gpu1.to_dict()["device_id"] == 1  # travels in the handshake all the same
    nonce = new_nonce()
    hello = make_hello("tok", nonce, agent="gpu", backend="nixl", spec=gpu0)
    with pytest.raises(HandshakeError, match="memory_type.*'DRAM'.*'VRAM'") as err:
        verify("tok", nonce, hello, backend="nixl", spec=cpu)
    assert err.value.field == "memory_type"
    verify("tok", nonce, make_hello("tok", nonce, agent="gpu1", backend="nixl", spec=gpu1),
           backend="nixl", spec=gpu0)
    with pytest.raises(ValueError, match="^memory_type"):
        replace(cpu, memory_type="HBM")
    with pytest.raises(ValueError, match="^device_id"):
        replace(cpu, device_id=1)
    with pytest.raises(ValueError, match="^device"):
        KVLayoutSpec.from_cache_shape(SHAPE, "m", "meta")


def test_spec_refuses_a_cache_on_another_device() -> None:
    spec = KVLayoutSpec("m", "float32", 2, 1, 4, 2, memory_type="VRAM")
    with pytest.raises(ValueError, match="^kv_cache: on cpu, but the spec says VRAM device 0"):
        spec.check_tensor(torch.zeros(spec.dims(3)))


def test_nixl_descriptors_carry_the_device_id() -> None:
    descs = block_descs(4096, 3, 256, device_id=2)  # [3, (address, length, device)]
    assert descs.tolist() == [[4096, 256, 2], [4352, 256, 2], [4608, 256, 2]]
    assert peer_memory({"memory_type": "VRAM", "device_id": 2}) == ("VRAM", 2)


def test_spec_layer_group_is_part_of_the_hash() -> None:
    spec = KVLayoutSpec.from_cache_shape(SHAPE, "llama-3-8b")
    other = replace(spec, layer_group=4)
    assert other.layout == "GBgTSHD/g=4" and other.compat_hash != spec.compat_hash
    assert spec.differing_fields(other.to_dict()) == ["layer_group", "layout"]
    with pytest.raises(ValueError, match="^layer_group: must divide num_layers"):
        replace(spec, layer_group=3)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_unit_ids_address_the_layer_views(group: int) -> None:
    """Unit u of the flat cache is the block `kv_layer(cache, l)[b]` that `unit_ids` says."""
    spec = KVLayoutSpec("m", "float32", 4, 2, 3, 2, layer_group=group)
    cache = torch.randn(spec.dims(5))  # [G, N, g, 2, bs, Hkv, D]
    units = cache.view(-1, spec.block_bytes // 4)  # [L * N, unit]
    for layer in range(4):
        ids = spec.unit_ids(range(layer, layer + 1), np.array([3, 0, 4]), 5)
        assert torch.equal(units[ids].view(3, 2, 2, 2, 3), kv_layer(cache, layer)[[3, 0, 4]])


def test_unit_ids_coalesce_per_group_and_block_run() -> None:
    spec = KVLayoutSpec("m", "bfloat16", 8, 1, 64, 16, layer_group=4)  # 2 groups
    src, dst = np.array([0, 1, 2, 9, 5]), np.array([4, 5, 6, 7, 1])  # runs: [0:3], [9], [5]
    whole = spec.unit_ids(range(0, 8), src, 16)
    assert len(whole) == 8 * 5
    # one region per (group, run of blocks adjacent on both sides): 2 groups x 3 runs
    assert len(coalesce(whole, spec.unit_ids(range(0, 8), dst, 16))) == 6
    assert len(coalesce(spec.unit_ids(range(4, 8), src, 16),
                        spec.unit_ids(range(4, 8), dst, 16))) == 3
    # a range that is not whole groups: layers 2-3 of group 0, all of group 1
    part = coalesce(spec.unit_ids(range(2, 8), src, 16), spec.unit_ids(range(2, 8), dst, 16))
    assert len(part) == 5 + 3  # layers 2-3 of each block of group 0, then group 1's runs
    assert sum(n for _, _, n in part) == 6 * 5
    g1 = replace(spec, layer_group=1)  # layer-major: one region per (layer, run)
    assert len(coalesce(g1.unit_ids(range(0, 8), src, 16),
                        g1.unit_ids(range(0, 8), dst, 16))) == 8 * 3


def test_spec_validates() -> None:
    with pytest.raises(ValueError, match="block_size"):
        KVLayoutSpec("m", "float32", 1, 1, 1, 0)
    with pytest.raises(ValueError, match="dtype"):
        KVLayoutSpec("m", "float33", 1, 1, 1, 1)
    with pytest.raises(ValueError, match="layer_group"):
        KVLayoutSpec("m", "float32", 4, 1, 1, 1, layer_group=0)
    spec = KVLayoutSpec("m", "float32", 2, 1, 4, 2)
    assert spec.check_tensor(torch.zeros(2, 7, 1, 2, 2, 1, 4)) == 7
    with pytest.raises(ValueError, match="shape"):
        spec.check_tensor(torch.zeros(2, 7, 1, 2, 3, 1, 4))
    with pytest.raises(ValueError, match="shape"):  # the same bytes in groups of 2 layers
        spec.check_tensor(torch.zeros(1, 7, 2, 2, 2, 1, 4))
    with pytest.raises(ValueError, match="7 dims"):  # the old layer-major [L, N, ...] cache
        spec.check_tensor(torch.zeros(2, 7, 2, 2, 1, 4))
    with pytest.raises(ValueError, match="dtype"):
        spec.check_tensor(torch.zeros(2, 7, 1, 2, 2, 1, 4, dtype=torch.float16))
    shape = CacheShape(4, 7, 2, 1, 4, torch.float32, layer_group=2)
    assert replace(spec, num_layers=4, layer_group=2).check_tensor(allocate_kv_cache(shape)) == 7


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="token"):
        TransferConfig(token="")
    with pytest.raises(ValueError, match="peer_timeout_s"):
        TransferConfig(token="t", heartbeat_interval_s=2.0, peer_timeout_s=1.0)


def test_notification_roundtrip_and_garbage() -> None:
    n = Notification("req-1", 3, 4, 17, 5, 6, 1 << 20, "00-abc-def-01")
    assert Notification.decode(n.encode()) == n
    for garbage in (b"", b"[1,2]", b'["other","r",0,1,1,0,0,0,""]', b"\xff"):
        with pytest.raises(ValueError):
            Notification.decode(garbage)


def test_frames_split_across_reads() -> None:
    raw = encode_frame({"t": "ping"}) + encode_frame({"t": "abort", "r": "x"})
    buf = bytearray(raw[:7])
    assert split_frames(buf) == []
    buf += raw[7:]
    assert split_frames(buf) == [{"t": "ping"}, {"t": "abort", "r": "x"}]
    assert buf == b""


def test_tracker_completes_out_of_order() -> None:
    tr = RequestTracker(default_timeout_s=10)
    tr.expect("r", None, now=0.0)
    assert tr.on_message("P", Notification("r", 3, 4, 2, 3, 4, 10, "tp"), now=1.0) is None
    assert tr.on_message("P", Notification("r", 0, 1, 2, 0, 0, 10), now=1.0) is None
    assert tr.on_message("P", Notification("r", 2, 3, 2, 2, 0, 10), now=1.0) is None
    ev = tr.on_message("P", Notification("r", 1, 2, 2, 1, 0, 10), now=2.5)
    assert ev is not None and ev.kind == EventKind.REQUEST_COMPLETE
    assert (ev.nbytes, ev.latency_s, ev.trace_context, ev.peer) == (40, 2.5, "tp", "P")
    assert len(tr) == 0
    # A late duplicate of a finished request is dropped, not resurrected.
    assert tr.on_message("P", Notification("r", 0, 1, 2, 0, 0, 10), now=3.0) is None
    assert len(tr) == 0


def test_tracker_deadline_and_peer_loss() -> None:
    tr = RequestTracker(default_timeout_s=5)
    tr.expect("silent", 1.0, now=0.0)
    tr.on_message("P", Notification("a", 0, 1, 1, 0, 0, 1), now=0.0)
    tr.on_message("Q", Notification("b", 0, 1, 1, 0, 0, 1), now=0.0)
    assert tr.expired(now=0.5) == []
    [ev] = tr.expired(now=1.0)
    assert (ev.request_id, ev.reason) == ("silent", FailureReason.TIMEOUT)
    [ev] = tr.fail_peer("P", "killed")
    assert (ev.request_id, ev.reason, ev.peer) == ("a", FailureReason.PEER_LOST, "P")
    [ev] = tr.expired(now=5.0)
    assert ev.request_id == "b"
    assert len(tr) == 0


def test_tracker_next_deadline_is_the_earliest_expected_request() -> None:
    """What an idle polling thread must wake for: the earliest deadline, None when nothing is
    expected (a finished or failed request no longer counts)."""
    tr = RequestTracker(default_timeout_s=5)
    assert tr.next_deadline() is None
    tr.expect("late", 3.0, now=0.0)
    tr.expect("early", 1.0, now=0.5)
    assert tr.next_deadline() == 1.5
    [ev] = tr.expired(now=1.5)
    assert ev.request_id == "early" and tr.next_deadline() == 3.0
    tr.on_message("P", Notification("late", 0, 1, 1, 0, 1, 1), now=2.0)  # its only write
    assert tr.next_deadline() is None


def test_tracker_refuses_two_senders_for_one_request() -> None:
    tr = RequestTracker(default_timeout_s=5)
    tr.on_message("P", Notification("a", 0, 1, 1, 0, 0, 1), now=0.0)
    ev = tr.on_message("Q", Notification("a", 1, 2, 1, 1, 2, 1), now=0.0)
    assert ev is not None and ev.reason == FailureReason.PROTOCOL


def test_handshake_verify_names_the_field() -> None:
    spec = KVLayoutSpec("m", "bfloat16", 4, 2, 16, 16)
    nonce = new_nonce()
    hello = make_hello("tok", nonce, agent="a", backend="nixl", spec=spec)
    verify("tok", nonce, hello, backend="nixl", spec=spec)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("token", dict(token="bad")),
        ("backend", dict(backend="ucxx")),
        ("block_size", dict(spec=KVLayoutSpec("m", "bfloat16", 4, 2, 16, 32))),
        ("dtype", dict(spec=KVLayoutSpec("m", "float16", 4, 2, 16, 16))),
        ("layer_group", dict(spec=KVLayoutSpec("m", "bfloat16", 4, 2, 16, 16, layer_group=2))),
        ("memory_type", dict(spec=KVLayoutSpec("m", "bfloat16", 4, 2, 16, 16,
                                               memory_type="VRAM"))),
    ]
    for field, change in cases:
        kwargs: dict[str, Any] = {"token": "tok", "backend": "nixl", "spec": spec, **change}
        with pytest.raises(HandshakeError, match=field) as err:
            verify(kwargs["token"], nonce, hello, backend=kwargs["backend"], spec=kwargs["spec"])
        assert err.value.field == field
    welcome = make_welcome("tok", hello["nonce"], agent="b", backend="nixl", spec=spec,
                           backend_md={}, conn_id=1)
    verify("tok", hello["nonce"], welcome, backend="nixl", spec=spec)
    with pytest.raises(HandshakeError, match="token"):  # replayed against another nonce
        verify("tok", new_nonce(), welcome, backend="nixl", spec=spec)
    tampered = {**hello, "protocol_version": 99}
    with pytest.raises(HandshakeError, match="token"):  # the MAC covers every field
        verify("tok", nonce, tampered, backend="nixl", spec=spec)


def test_coalesce_runs() -> None:
    src = np.array([0, 1, 2, 7, 8, 3])
    dst = np.array([5, 6, 9, 10, 11, 12])
    assert coalesce(src, dst) == [(0, 5, 2), (2, 9, 1), (7, 10, 2), (3, 12, 1)]
    assert coalesce(np.array([4]), np.array([9])) == [(4, 9, 1)]


def test_stats_snapshot() -> None:
    st = TransferStats()
    st.record_write(100, 0.002)
    st.record_write(50, 20.0)
    st.record_failure("write", FailureReason.PEER_LOST)
    snap = st.snapshot()
    assert snap["bytes_sent"] == 150 and snap["failures"] == {"write:peer_lost": 1}
    assert sum(snap["write_latency"]["counts"]) == 2 and snap["write_latency"]["counts"][-1] == 1
