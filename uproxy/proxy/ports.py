"""Proxy socket allocation: bind in ``--proxy-port-range``, else in the ephemeral range.

The range is walked from a moving cursor so a port freed a moment ago is not
handed out again at once (a late packet for the old service would land on
the new one).
"""

from __future__ import annotations

import errno
import random
import socket


def bind(kind: int, address: str, port: int, *, reuse: bool = True) -> socket.socket:
    """A non-blocking socket bound to (address, port); TCP ones listen."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK)  # (no setblocking call after)
    try:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(4096)
    except BaseException:
        sock.close()
        raise
    return sock


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (where it would pick a port for ``bind(0)``)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        return (32768, 60999)
    return (low, high)


class PortAllocator:
    """Walks ``--proxy-port-range`` (default: the kernel's ephemeral range) binding explicitly.

    Not ``bind(port=0)``: the kernel's search for a free ephemeral port gets slower
    with every port in use (figures in bench/ANALYSIS.md, uproxy/proxy/ports.py).
    """

    def __init__(self, port_range: tuple[int, int] | None) -> None:
        self.explicit = port_range is not None
        self.port_range = port_range or ephemeral_range()
        low, high = self.port_range
        self._cursor = low if self.explicit else random.randint(low, high)
        self.avoid: set[int] = set()  # held by sockets a takeover brought, not yet claimed

    def open(self, kind: int, address: str) -> socket.socket:
        """Bind a proxy socket; raises OSError(EADDRINUSE) when the range is exhausted."""
        low, high = self.port_range
        size = high - low + 1
        for _ in range(size):
            port = self._cursor
            self._cursor = low if port >= high else port + 1
            if port in self.avoid:
                continue
            try:
                return bind(kind, address, port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, f"no free port left in --proxy-port-range {low}-{high}")
