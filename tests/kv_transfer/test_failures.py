"""Failures between real processes: a peer SIGKILLed mid-request is reported on the other side
within a bound, the survivor stays up and works with a restarted peer; a request whose KV does
not arrive in time fails by deadline and the sender is told to stop."""

from __future__ import annotations

import time

import pytest
from conftest import poll_until
from kvt_peer import SPEC, Peer, PeerError

from kv_transfer import EventKind, FailureReason, TransferError

BACKENDS = ["nixl", "ucxx"]
DETECT_BOUND_S = 4.0  # EOF on the control link is immediate; heartbeats would take peer_timeout_s
SRC, DST = [3, 4, 5, 9], [20, 21, 7, 30]


def full_request(peer: str, rid: str) -> list[tuple]:
    return [(peer, rid, SRC, DST, (layer, layer + 1), layer == SPEC.num_layers - 1)
            for layer in range(SPEC.num_layers)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sender_killed_mid_request(make_agent, backend: str) -> None:
    receiver, _ = make_agent(backend, num_blocks=64)
    sender = Peer(backend, num_blocks=32)
    try:
        peer = sender.call("connect", receiver.metadata())
        receiver.expect("doomed", 30.0)  # the deadline is far: only peer loss can fail it soon
        sender.call("stream", peer, "doomed", SRC, DST)  # layer writes, never the last one
        deadline = time.monotonic() + 20
        while receiver._tracker.peer_of("doomed") == "" and time.monotonic() < deadline:
            assert receiver.poll() == []
            time.sleep(0.001)
        assert receiver._tracker.peer_of("doomed") == sender.name, "no write ever landed"
        sender.kill()
        killed = time.monotonic()
        [ev] = poll_until(receiver, 1, DETECT_BOUND_S + 2)
        assert ev.kind == EventKind.REQUEST_FAILED and ev.request_id == "doomed"
        assert ev.reason == FailureReason.PEER_LOST and ev.peer == sender.name
        assert time.monotonic() - killed < DETECT_BOUND_S
        assert receiver.stats.snapshot()["failures"] == {"request:peer_lost": 1}
    finally:
        sender.stop()

    # The receiver is still up and takes a new sender (a new process, so a new name).
    again = Peer(backend, num_blocks=32, seed=9)
    try:
        peer = again.call("connect", receiver.metadata())
        receiver.expect("fresh", 20.0)
        again.call("write", full_request(peer, "fresh"))
        [ev] = poll_until(receiver, 1, 20.0)
        assert (ev.kind, ev.request_id, ev.peer) == (EventKind.REQUEST_COMPLETE, "fresh",
                                                     again.name)
    finally:
        again.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_killed_mid_request(make_agent, backend: str) -> None:
    sender, _ = make_agent(backend, num_blocks=32)
    receiver = Peer(backend, num_blocks=64)
    try:
        peer = sender.connect(receiver.metadata)
        receiver.call("expect", "doomed", 30.0)
        for layer in range(2):
            sender.write(peer, "doomed", SRC, DST, range(layer, layer + 1), last=False)
        done = poll_until(sender, 2, 20.0)
        assert [e.kind for e in done] == [EventKind.WRITE_DONE] * 2
        receiver.kill()
        killed = time.monotonic()
        failures: list = []
        layer = 2
        while not failures and time.monotonic() - killed < DETECT_BOUND_S + 2:
            try:  # keep streaming, as a prefill worker would, until the loss shows up
                sender.write(peer, "doomed", SRC, DST, range(layer % 4, layer % 4 + 1),
                             last=False)
                layer += 1
            except TransferError as e:
                failures.append(e)
            failures += [e for e in sender.poll() if e.kind == EventKind.WRITE_FAILED]
            time.sleep(0.005)
        assert failures, "the sender never noticed the receiver died"
        assert time.monotonic() - killed < DETECT_BOUND_S
        assert all(f.reason == FailureReason.PEER_LOST for f in failures), failures
        with pytest.raises(TransferError) as err:  # the peer is gone for good
            for _ in range(400):
                sender.write(peer, "doomed", SRC, DST, range(0, 1), last=False)
                sender.poll()
                time.sleep(0.01)
        assert err.value.reason == FailureReason.PEER_LOST
    finally:
        receiver.stop()

    # The sender is still up and reaches a restarted receiver.
    restarted = Peer(backend, num_blocks=64)
    try:
        peer = sender.connect(restarted.metadata)
        assert peer == restarted.name
        restarted.call("expect", "fresh", 20.0)
        for plan in full_request(peer, "fresh"):
            sender.write(plan[0], plan[1], plan[2], plan[3], range(*plan[4]), last=plan[5])
        assert all(e.ok for e in poll_until(sender, SPEC.num_layers, 20.0))
        [ev] = restarted.wait_events(1, 20.0)
        assert (ev.kind, ev.request_id) == (EventKind.REQUEST_COMPLETE, "fresh")
    finally:
        restarted.stop()


@pytest.mark.timeout(90)
def test_deadline_fails_request_and_aborts_sender(make_agent) -> None:
    receiver, _ = make_agent("nixl", num_blocks=64)
    sender = Peer("nixl", num_blocks=32)
    try:
        peer = sender.call("connect", receiver.metadata())
        start = time.monotonic()
        receiver.expect("slow", 1.0)
        receiver.expect("never-sent", 1.0)
        sender.call("write", full_request(peer, "slow")[:1])  # layer 0 of 4, then silence
        events = poll_until(receiver, 2, 10.0)
        elapsed = time.monotonic() - start
        assert {(e.request_id, e.kind, e.reason) for e in events} == {
            ("slow", EventKind.REQUEST_FAILED, FailureReason.TIMEOUT),
            ("never-sent", EventKind.REQUEST_FAILED, FailureReason.TIMEOUT)}
        assert 0.9 < elapsed < 4.0
        # The receiver told the sender to stop writing into blocks it is about to reuse.
        deadline = time.monotonic() + 10
        while True:
            try:
                sender.call("write", full_request(peer, "slow")[1:2])
            except PeerError as e:
                assert e.reason == FailureReason.ABORTED.value
                break
            assert time.monotonic() < deadline, "the sender was never told of the abort"
            time.sleep(0.05)
        # A late write of the failed request does not resurrect it on the receiver.
        assert poll_until(receiver, 1, 0.5) == []
    finally:
        sender.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_restarted_on_the_same_address_is_reconnected(make_agent,
                                                               backend: str) -> None:
    """A receiver killed and restarted on the same port (a new process, a new agent) before
    the sender polled even once: `connect` with the same metadata must not hand out the dead
    peer; it handshakes again and the writes land in the new process."""
    from cli.local_cluster import UniquePorts

    port = UniquePorts().take()
    sender, _ = make_agent(backend, num_blocks=32)
    receiver = Peer(backend, num_blocks=64, port=port)
    try:
        peer = sender.connect(receiver.metadata)
        receiver.call("expect", "before", 20.0)
        for plan in full_request(peer, "before"):
            sender.write(plan[0], plan[1], plan[2], plan[3], range(*plan[4]), last=plan[5])
        assert all(e.ok for e in poll_until(sender, SPEC.num_layers, 20.0))
        receiver.kill()
    finally:
        receiver.stop()
    restarted = Peer(backend, num_blocks=64, seed=5, port=port)
    try:
        assert restarted.metadata == receiver.metadata and restarted.name != receiver.name
        again = sender.connect(restarted.metadata)  # no poll since the kill
        assert again == restarted.name
        restarted.call("expect", "after", 20.0)
        for plan in full_request(again, "after"):
            sender.write(plan[0], plan[1], plan[2], plan[3], range(*plan[4]), last=plan[5])
        assert all(e.ok for e in poll_until(sender, SPEC.num_layers, 20.0))
        [ev] = restarted.wait_events(1, 20.0)
        assert (ev.kind, ev.request_id) == (EventKind.REQUEST_COMPLETE, "after")
        assert sender.connect(restarted.metadata) == restarted.name  # the live link is reused
    finally:
        restarted.stop()
