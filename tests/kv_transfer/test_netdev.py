"""The UCX data listeners bind the transfer host's interface only (kv_transfer/netdev.py)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from kv_transfer.netdev import interface_addresses, interface_of, ucx_env, ucx_net_devices


def _listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("tcp")
            if c.status == psutil.CONN_LISTEN}


def _hosts() -> list[str]:
    """Loopback, and this machine's first other IPv4 address when it has one."""
    others = sorted(a for addresses in interface_addresses().values() for a in addresses
                    if ipaddress.ip_address(a).version == 4 and not ipaddress.ip_address(
                        a).is_loopback)
    return ["127.0.0.1", *others[:1]]


@pytest.mark.parametrize("backend", ["nixl", "ucxx"])
@pytest.mark.parametrize("host", _hosts())
def test_every_listener_of_an_agent_is_on_its_host(
        make_agent: Callable[..., tuple[Any, Any]], backend: str, host: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    before = _listening()
    make_agent(backend, host=host)
    opened = _listening() - before
    # the control listener and at least one UCX TCP listener, every one on `host`
    assert len(opened) >= 2, opened
    assert {ip for ip, _ in opened} == {host}, opened


def test_interface_of_names_the_interface_or_refuses_a_foreign_address() -> None:
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("localhost") == "lo"
    assert interface_of("0.0.0.0") is None and interface_of("::") is None
    with pytest.raises(ValueError, match=r"host: '203.0.113.9' .* not an address of any"):
        interface_of("203.0.113.9")  # TEST-NET-3: nobody's interface


def test_the_operators_ucx_net_devices_wins_and_the_environment_is_restored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    assert ucx_net_devices("127.0.0.1") == "lo"
    with ucx_env(NET_DEVICES="lo"):
        assert ucx_net_devices("127.0.0.1") is None  # set: left alone
    assert ucx_net_devices("127.0.0.1") == "lo"
    monkeypatch.setenv("UCX_NET_DEVICES", "eth9")
    with ucx_env(NET_DEVICES=None):
        pass
    assert ucx_net_devices("127.0.0.1") is None
