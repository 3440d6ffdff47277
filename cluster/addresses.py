"""host:port strings, the one way: split them, tell a loopback host, find a free local
port."""

from __future__ import annotations

import ipaddress
import socket


def split_host_port(address: str, field: str = "address") -> tuple[str, int]:
    """("host", port) of "host:port" (an IPv6 host keeps its brackets, "[::1]"); ValueError
    naming `field` when it is not of that form."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{field}: expected host:port, got {address!r}")
    return host, int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not) and localhost; anything else, a wildcard or a
    name included, may be reached from other machines."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
