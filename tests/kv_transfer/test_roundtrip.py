"""Two real processes on loopback: every byte lands in the right destination block, nothing
else changes, for both backends and both dtypes, caches in layer groups of 1, 2 and all layers,
writes of whole groups or of any other layer range, one request or many interleaved."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import poll_until, scattered_ids
from kvt_peer import SPEC, Peer, random_cache

from engine.kv_cache import kv_layer
from kv_transfer import EventKind

BACKENDS = ["nixl", "ucxx"]


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Bit-exact view for comparison (bf16 has no exact numpy/equality path worth trusting)."""
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("dtype", "group"), [("float32", 1), ("bfloat16", 2), ("float32", 4)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_groupwise_scattered_blocks_land_exactly(make_agent, backend: str, dtype: str,
                                                 group: int) -> None:
    spec = replace(SPEC, dtype=dtype, layer_group=group)
    receiver, cache = make_agent(backend, spec, num_blocks=64, seed=11)
    before = cache.clone()  # [G, N, g, 2, bs, Hkv, D]
    sender = Peer(backend, spec=spec, num_blocks=48, seed=22)
    try:
        peer = sender.call("connect", receiver.metadata())
        rng = np.random.default_rng(0)
        src = scattered_ids(rng, 20, 48)
        dst = scattered_ids(rng, 20, 64)
        receiver.expect("req-A", 20.0)
        # A layer group at a time, as prefill sends them; the last write says how many in all.
        num_writes = spec.num_layers // group
        plan = [(peer, "req-A", src, dst, (lo, lo + group), lo + group == spec.num_layers)
                for lo in range(0, spec.num_layers, group)]
        sender.call("write", plan)
        [done] = poll_until(receiver, 1, 20.0)
        assert done.kind == EventKind.REQUEST_COMPLETE, done
        assert done.nbytes == 20 * spec.num_layers * spec.block_bytes
        writes = sender.wait_events(num_writes, 20.0)
        assert [e.kind for e in writes] == [EventKind.WRITE_DONE] * num_writes

        expected = before.clone()
        expected[:, dst] = random_cache(spec, 48, 22)[:, src]  # blocks dst of every layer
        assert torch.equal(as_bits(cache), as_bits(expected))
        assert not torch.equal(as_bits(cache), as_bits(before))  # the test can fail
        assert receiver.stats.snapshot()["bytes_received"] == done.nbytes
    finally:
        sender.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_ranges_across_groups_land_exactly(make_agent, backend: str) -> None:
    """Writes whose layers are not whole groups: (0, 3) is group 0 and half of group 1; a
    write of layer 1 alone leaves layer 0 of the same blocks (the same group) untouched."""
    spec = replace(SPEC, layer_group=2)
    receiver, cache = make_agent(backend, spec, num_blocks=40, seed=3)
    before = cache.clone()  # [G, N, g, 2, bs, Hkv, D]
    sender = Peer(backend, spec=spec, num_blocks=32, seed=4)
    try:
        peer = sender.call("connect", receiver.metadata())
        rng = np.random.default_rng(2)
        src, dst = scattered_ids(rng, 16, 32), scattered_ids(rng, 16, 40)
        src_a, dst_a, src_b, dst_b = src[:10], dst[:10], src[10:], dst[10:]
        sender.call("write", [(peer, "A", src_a, dst_a, (0, 3), False),
                              (peer, "A", src_a, dst_a, (3, 4), True),
                              (peer, "B", src_b, dst_b, (1, 2), True)])
        events = poll_until(receiver, 2, 20.0)
        assert sorted((e.request_id, e.kind) for e in events) == [
            ("A", EventKind.REQUEST_COMPLETE), ("B", EventKind.REQUEST_COMPLETE)]
        theirs = random_cache(spec, 32, 4)
        expected = before.clone()
        expected[:, dst_a] = theirs[:, src_a]
        kv_layer(expected, 1)[dst_b] = kv_layer(theirs, 1)[src_b]
        assert torch.equal(cache, expected)
        assert torch.equal(kv_layer(cache, 0)[dst_b], kv_layer(before, 0)[dst_b])
    finally:
        sender.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_interleaved_requests(make_agent, backend: str) -> None:
    spec = replace(SPEC, layer_group=2)  # two-layer writes are whole groups, one-layer not
    receiver, cache = make_agent(backend, spec, num_blocks=128, seed=5)
    before = cache.clone()
    sender = Peer(backend, spec=spec, num_blocks=96, seed=6)
    try:
        peer = sender.call("connect", receiver.metadata())
        rng = np.random.default_rng(1)
        num_req, per_req = 12, 8
        src_all = scattered_ids(rng, num_req * per_req, 96)
        dst_all = scattered_ids(rng, num_req * per_req, 128)
        reqs = {f"req-{i}": (src_all[i * per_req:(i + 1) * per_req],
                             dst_all[i * per_req:(i + 1) * per_req]) for i in range(num_req)}
        for rid in reqs:
            receiver.expect(rid, 30.0)
        # Round-robin over requests, layer by layer, in chunks of two layers for some: all of
        # the requests' writes are in flight at the same time.
        plan = []
        for layer in range(SPEC.num_layers):
            for i, (rid, (src, dst)) in enumerate(reqs.items()):
                if i % 3 == 0:  # these requests send two layers per write
                    if layer % 2:
                        continue
                    lay = (layer, layer + 2)
                else:
                    lay = (layer, layer + 1)
                plan.append((peer, rid, src, dst, lay, lay[1] == SPEC.num_layers))
        sender.call("write", plan)
        events = poll_until(receiver, num_req, 30.0)
        assert sorted(e.request_id for e in events) == sorted(reqs)
        assert all(e.kind == EventKind.REQUEST_COMPLETE for e in events), events
        expected = before.clone()
        theirs = random_cache(spec, 96, 6)
        expected[:, dst_all] = theirs[:, src_all]
        assert torch.equal(cache, expected)
    finally:
        sender.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_announced_writes_wake_the_receiver_and_are_in_flight_until_landed(
        make_agent, backend: str) -> None:
    """`in_flight()` says when polling is needed: on the sender from a write posted until its
    WRITE_DONE was polled; on the receiver from a sender's announcement of a write (which
    calls the wakeup at once) until that write landed. A request only expected is not in
    flight: nothing is moving yet."""
    sender, _ = make_agent(backend, num_blocks=32, seed=7)
    receiver, _ = make_agent(backend, num_blocks=32, seed=8)
    woken = threading.Event()
    receiver.set_wakeup(woken.set)
    remote_receiver = Peer(backend, num_blocks=32, seed=9)
    remote_sender = Peer(backend, num_blocks=32, seed=10)
    try:
        assert not sender.in_flight() and not receiver.in_flight()
        peer = sender.connect(remote_receiver.metadata)
        sender.write(peer, "A", [0, 1], [2, 3], range(SPEC.num_layers), last=True)
        assert sender.in_flight()  # posted, not yet polled
        [done] = poll_until(sender, 1, 20.0)
        assert done.kind == EventKind.WRITE_DONE, done
        assert not sender.in_flight()

        receiver.expect("B", 20.0)
        assert not receiver.in_flight()  # expected, nothing moving
        their_peer = remote_sender.call("connect", receiver.metadata())
        remote_sender.call("write", [(their_peer, "B", [0], [5], (0, 1), False)])
        assert woken.wait(10.0)  # the announcement, before anyone polled
        # polled from the wakeup on, the announced write is in flight until it landed (B is
        # not complete: nothing to report), then nothing is
        landed: list[Any] = receiver.poll()
        deadline = time.monotonic() + 20.0
        while receiver.in_flight() and time.monotonic() < deadline:
            landed += receiver.poll()
            time.sleep(0.0005)
        assert not receiver.in_flight() and landed == []
        woken.clear()
        remote_sender.call("write", [(their_peer, "B", [0], [5], (1, SPEC.num_layers), True)])
        assert woken.wait(10.0)
        landed = poll_until(receiver, 1, 20.0)
        assert [(e.request_id, e.kind) for e in landed] == [("B", EventKind.REQUEST_COMPLETE)]
        assert not receiver.in_flight()
    finally:
        remote_sender.stop()
        remote_receiver.stop()
