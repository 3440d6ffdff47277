"""Two real processes on loopback: every byte lands in the right destination block, nothing
else changes, for both backends and both dtypes, one request or many interleaved."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import poll_until, scattered_ids
from kvt_peer import SPEC, Peer, random_cache

from kv_transfer import EventKind

BACKENDS = ["nixl", "ucxx"]


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Bit-exact view for comparison (bf16 has no exact numpy/equality path worth trusting)."""
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layerwise_scattered_blocks_land_exactly(make_agent, backend: str, dtype: str) -> None:
    spec = replace(SPEC, dtype=dtype)
    receiver, cache = make_agent(backend, spec, num_blocks=64, seed=11)
    before = cache.clone()  # [L, N, 2, bs, Hkv, D]
    sender = Peer(backend, spec=spec, num_blocks=48, seed=22)
    try:
        peer = sender.call("connect", receiver.metadata())
        rng = np.random.default_rng(0)
        src = scattered_ids(rng, 20, 48)
        dst = scattered_ids(rng, 20, 64)
        receiver.expect("req-A", 20.0)
        # Layer by layer, as prefill computes them; the last write says "4 writes in all".
        plan = [(peer, "req-A", src, dst, (layer, layer + 1), layer == spec.num_layers - 1)
                for layer in range(spec.num_layers)]
        sender.call("write", plan)
        [done] = poll_until(receiver, 1, 20.0)
        assert done.kind == EventKind.REQUEST_COMPLETE, done
        assert done.nbytes == 20 * spec.num_layers * spec.block_bytes
        writes = sender.wait_events(spec.num_layers, 20.0)
        assert [e.kind for e in writes] == [EventKind.WRITE_DONE] * spec.num_layers

        expected = before.clone()
        expected[:, dst] = random_cache(spec, 48, 22)[:, src]  # [L, 20, 2, bs, Hkv, D]
        assert torch.equal(as_bits(cache), as_bits(expected))
        assert not torch.equal(as_bits(cache), as_bits(before))  # the test can fail
        assert receiver.stats.snapshot()["bytes_received"] == done.nbytes
    finally:
        sender.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_interleaved_requests(make_agent, backend: str) -> None:
    receiver, cache = make_agent(backend, num_blocks=128, seed=5)
    before = cache.clone()
    sender = Peer(backend, num_blocks=96, seed=6)
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
        theirs = random_cache(SPEC, 96, 6)
        expected[:, dst_all] = theirs[:, src_all]
        assert torch.equal(cache, expected)
    finally:
        sender.stop()
