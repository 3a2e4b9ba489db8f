"""Proxy socket allocation: bind in ``--proxy-port-range``, or let the kernel choose.

The range is walked from a moving cursor so a port freed a moment ago is not
handed out again at once (a late packet for the old service would land on
the new one).
"""

from __future__ import annotations

import errno
import socket


def bind(kind: int, address: str, port: int, *, reuse: bool = True) -> socket.socket:
    """A non-blocking socket bound to (address, port); TCP ones listen."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class PortAllocator:
    def __init__(self, port_range: tuple[int, int] | None) -> None:
        self.port_range = port_range
        self._cursor = port_range[0] if port_range else 0

    def open(self, kind: int, address: str) -> socket.socket:
        """Bind a proxy socket; raises OSError(EADDRINUSE) when the range is exhausted."""
        if self.port_range is None:
            return bind(kind, address, 0)
        low, high = self.port_range
        size = high - low + 1
        for _ in range(size):
            port = self._cursor
            self._cursor = low if port >= high else port + 1
            try:
                return bind(kind, address, port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, f"no free port left in --proxy-port-range {low}-{high}")
