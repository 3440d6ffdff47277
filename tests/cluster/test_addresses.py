"""host:port parsing and free ports."""

from __future__ import annotations

import socket

import pytest

from cluster.addresses import free_port, split_host_port


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:50051", ("127.0.0.1", 50051)), ("router:0", ("router", 0)),
    ("[::1]:8080", ("[::1]", 8080))])
def test_host_port_splits(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize("address", ["127.0.0.1", ":80", "host:", "host:http", "h:70000"])
def test_a_malformed_address_names_the_field(address: str) -> None:
    with pytest.raises(ValueError, match="^listen: expected host:port"):
        split_host_port(address, "listen")


def test_a_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
