"""Which network devices UCX may use: the interface that holds the transfer host, not all.

UCX's TCP transport listens on every interface it is allowed (`UCX_NET_DEVICES`, default
`all`): a worker told to serve its KV on 10.0.0.5 would also accept UCX connections on its
public interface. Both backends therefore restrict UCX to the interface whose address is
`TransferConfig.host` (the control listener binds that address itself), plus every RDMA port
(`/sys/class/infiniband`): verbs open no TCP listener, and dropping them would drop RDMA.

A wildcard host (0.0.0.0, ::) keeps UCX's default; so does an operator's own
`UCX_NET_DEVICES`, which wins. Linux only, as UCX is.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address
_IB_ROOT = Path("/sys/class/infiniband")
_IF_INET6 = Path("/proc/net/if_inet6")


def interface_addresses() -> dict[str, set[str]]:
    """Interface name → its IPv4 and IPv6 addresses (textual, compressed)."""
    found: dict[str, set[str]] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR,
                                     struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            found.setdefault(name, set()).add(socket.inet_ntoa(packed[20:24]))
    if _IF_INET6.exists():
        for line in _IF_INET6.read_text().splitlines():
            fields = line.split()  # address (32 hex), index, prefix, scope, flags, name
            if len(fields) == 6:
                address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
                found.setdefault(fields[5], set()).add(address.compressed)
    return found


def interface_of(host: str) -> str | None:
    """The interface holding `host` (a name is resolved); None for a wildcard host. Raises
    ValueError naming the host when no interface of this machine has it."""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as error:
        raise ValueError(f"host: cannot resolve {host!r}: {error}") from None
    addresses = {ipaddress.ip_address(a.split("%")[0]).compressed for a in addresses}
    if addresses & {"0.0.0.0", "::"}:
        return None
    for name, held in sorted(interface_addresses().items()):
        if held & addresses:
            return name
    raise ValueError(f"host: {host!r} ({', '.join(sorted(addresses))}) is not an address of "
                     f"any interface of this machine")


def rdma_ports() -> list[str]:
    """Every RDMA device port, as UCX names them ("mlx5_0:1")."""
    if not _IB_ROOT.is_dir():
        return []
    return sorted(f"{dev.name}:{port.name}" for dev in _IB_ROOT.iterdir()
                  if (dev / "ports").is_dir() for port in (dev / "ports").iterdir())


def ucx_net_devices(host: str) -> str | None:
    """The `UCX_NET_DEVICES` value for an agent serving on `host`; None: leave UCX's own (a
    wildcard host, or the operator set `UCX_NET_DEVICES`)."""
    if os.environ.get("UCX_NET_DEVICES"):
        return None
    interface = interface_of(host)
    if interface is None:
        return None
    return ",".join([interface, *rdma_ports()])


@contextlib.contextmanager
def ucx_env(**settings: str | None) -> Iterator[None]:
    """`UCX_<name>` variables set (a None value: left alone) while a backend builds its UCX
    context, then restored: the process's environment is not changed for good."""
    saved = {f"UCX_{name}": os.environ.get(f"UCX_{name}") for name, value in settings.items()
             if value is not None}
    for name, value in settings.items():
        if value is not None:
            os.environ[f"UCX_{name}"] = value
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
