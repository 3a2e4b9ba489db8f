"""Proxy socket allocation: bind in ``--proxy-port-range``, else in the ephemeral range.

The range is walked from a moving cursor so a port freed a moment ago is not
handed out again at once (a late packet for the old service would land on
the new one).
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import random
import socket
from collections.abc import Generator

from uproxy import native


def bind(kind: int, address: str, port: int, *, reuse: bool = True) -> socket.socket:
    """A non-blocking socket bound to (address, port); TCP ones listen.

    ``reuse`` (SO_REUSEADDR) is for TCP only: two UDP sockets that both set it may
    bind one address and port, so the walk would hand out a port another service's
    socket still holds (and the new socket would take its datagrams)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK)  # (no setblocking call after)
    try:
        if reuse and kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


LISTEN_BACKLOG = 4096
OPEN_AHEAD_CHUNK = 500  # sockets per C call of PortAllocator.open_ahead


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

    def open_many(self, kind: int, addresses: list[str]) -> list[socket.socket | OSError]:
        """:meth:`open` of each address in order (a start opens 10,000): the socket or the
        error :meth:`open` would have raised. One C call with the native module
        (``native/sockets.c``); the Python twin otherwise."""
        if not addresses or not native.AVAILABLE:
            return [self._open_or_error(kind, address) for address in addresses]
        return self._as_sockets(kind, *self._open_native(kind, addresses))

    def open_ahead(self, kind: int, addresses: list[str],
                   chunk: int = OPEN_AHEAD_CHUNK) -> Generator[socket.socket | OSError]:
        """:meth:`open_many`'s results one by one, the next ``chunk`` opened meanwhile by a
        worker thread (the C call holds no GIL: the kernel's ~10 us per socket overlap
        the caller's Python work on each one it got). Closing the iterator early closes
        the sockets it has not handed out."""
        if len(addresses) <= chunk or not native.AVAILABLE:
            yield from _hand_out(self.open_many(kind, addresses))
            return
        chunks = [addresses[i:i + chunk] for i in range(0, len(addresses), chunk)]
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="open-ahead")
        pending: concurrent.futures.Future[tuple[list[int], list[int]]] | None = None
        try:
            pending = ahead = pool.submit(self._open_native, kind, chunks[0])
            for k in range(len(chunks)):
                fds, families = ahead.result()
                pending = None
                if k + 1 < len(chunks):  # (the worker alone walks the cursor meanwhile)
                    pending = ahead = pool.submit(self._open_native, kind, chunks[k + 1])
                yield from _hand_out(self._as_sockets(kind, fds, families))
        finally:
            if pending is not None:  # (closed early: what the worker opened is no one's)
                fds, _ = pending.result()
                for fd in fds:
                    if fd >= 0:
                        os.close(fd)
            pool.shutdown(wait=True)

    def _open_native(self, kind: int, addresses: list[str]) -> tuple[list[int], list[int]]:
        """The C call: (fd or -errno, family) per address; moves the cursor."""
        lib, ffi = native.lib(), native.ffi()
        low, high = self.port_range
        n = len(addresses)
        avoid = bytearray(high - low + 1)
        for port in self.avoid:
            if low <= port <= high:
                avoid[port - low] = 1
        families = [6 if ":" in a else 4 for a in addresses]
        packed = b"".join(socket.inet_pton(socket.AF_INET6, a) if f == 6
                          else socket.inet_pton(socket.AF_INET, a) + bytes(12)
                          for a, f in zip(addresses, families, strict=True))
        cursor = ffi.new("int *", self._cursor)
        fds, bound = ffi.new("int[]", n), ffi.new("int[]", n)
        rc = lib.uproxy_open_listeners(n, kind, families, packed, [0] * n, low, high, cursor,
                                       bytes(avoid), LISTEN_BACKLOG, fds, bound)
        if rc < 0:  # (bad arguments: nothing opened)
            raise OSError(-rc, f"opening listeners: {os.strerror(-rc)}")
        self._cursor = cursor[0]
        return list(fds), families

    def _as_sockets(self, kind: int, fds: list[int],
                    families: list[int]) -> list[socket.socket | OSError]:
        low, high = self.port_range
        out: list[socket.socket | OSError] = []
        kind |= socket.SOCK_NONBLOCK
        for fd, family in zip(fds, families, strict=True):
            if fd >= 0:
                out.append(socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET,
                                         kind, 0, fd))
            elif fd == -errno.EADDRINUSE:
                out.append(OSError(errno.EADDRINUSE,
                                   f"no free port left in --proxy-port-range {low}-{high}"))
            else:
                out.append(OSError(-fd, os.strerror(-fd)))
        return out

    def _open_or_error(self, kind: int, address: str) -> socket.socket | OSError:
        try:
            return self.open(kind, address)
        except OSError as exc:
            return exc


def _hand_out(opened: list[socket.socket | OSError]) -> Generator[socket.socket | OSError]:
    """Each of ``opened`` in turn; closed early, the sockets not handed out close."""
    for i, sock in enumerate(opened):
        try:
            yield sock
        except BaseException:
            for rest in opened[i + 1:]:
                if isinstance(rest, socket.socket):
                    rest.close()
            raise
