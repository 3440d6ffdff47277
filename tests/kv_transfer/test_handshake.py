"""The connect handshake against a real peer process: mismatched layouts, a wrong token and a
different backend are refused with the differing field named; a matching peer still connects."""

from __future__ import annotations

from dataclasses import replace

import pytest
from kvt_peer import SPEC, Peer

from kv_transfer import FailureReason, HandshakeError, TransferError


@pytest.fixture(scope="module")
def nixl_receiver():
    peer = Peer("nixl", num_blocks=16)
    yield peer
    peer.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("field", "spec", "config"), [
    ("block_size", replace(SPEC, block_size=8), {}),
    ("dtype", replace(SPEC, dtype="bfloat16"), {}),
    ("num_kv_heads", replace(SPEC, num_kv_heads=1), {}),
    ("model_name", replace(SPEC, model_name="other-model"), {}),
    ("layer_group", replace(SPEC, layer_group=2), {}),
    ("token", SPEC, {"token": "not-the-cluster-token"}),
])
def test_mismatch_refused_naming_the_field(make_agent, nixl_receiver, field, spec,
                                           config) -> None:
    agent, _ = make_agent("nixl", spec, num_blocks=8, **config)
    with pytest.raises(HandshakeError) as err:
        agent.connect(nixl_receiver.metadata, timeout_s=15)
    assert err.value.field == field
    assert field in str(err.value)
    assert err.value.reason == (FailureReason.AUTH if field == "token"
                                else FailureReason.HANDSHAKE)
    assert agent.stats.snapshot()["failures"] == {f"handshake:{err.value.reason.value}": 1}


@pytest.mark.timeout(60)
def test_other_backend_refused_and_good_peer_accepted(make_agent, nixl_receiver) -> None:
    ucxx_agent, _ = make_agent("ucxx", num_blocks=8)
    with pytest.raises(HandshakeError, match="backend"):
        ucxx_agent.connect(nixl_receiver.metadata, timeout_s=15)
    good, _ = make_agent("nixl", num_blocks=8)
    name = good.connect(nixl_receiver.metadata, timeout_s=15)
    assert name == nixl_receiver.name
    assert good.connect(nixl_receiver.metadata) == name  # idempotent while alive
    refused = nixl_receiver.call("stats")["failures"]
    assert refused.get("handshake:handshake", 0) >= 1


@pytest.mark.timeout(30)
def test_unreachable_peer_is_a_transfer_error(make_agent) -> None:
    agent, _ = make_agent("nixl", num_blocks=8)
    with pytest.raises(TransferError) as err:
        agent.connect("127.0.0.1:1", timeout_s=2)
    assert err.value.reason == FailureReason.PEER_LOST
