"""A UDP listener: one bound socket serving one service port in one scope.

It owns its socket and the flows of its clients (``flows``: client key -> flow;
the key is the address tuple on the Python path, on the native one the C
side's packed int for IPv4 and the 18 bytes of address and port for IPv6).
Which twin reads it is fixed at creation: the native batches when the native
module is active, the Python path otherwise; both families on both.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING

from uproxy.model import ServicePortName
from uproxy.proxy.udp.flow import IP_PKTINFO, IPV6_RECVPKTINFO, Flow

if TYPE_CHECKING:
    from uproxy.proxy.udp.proxy import UdpProxy

LISTEN_RCVBUF = 4 << 20


class UdpListener:
    """One bound UDP socket serving one service port in one scope."""

    def __init__(self, proxy: UdpProxy, sock: socket.socket, name: ServicePortName,
                 scope: str) -> None:
        self.proxy = proxy
        self.sock = sock
        self.name = name
        self.scope = scope
        self.external = scope != "cluster"
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self.flows: dict[object, Flow] = {}
        self._fd = sock.fileno()
        self._closed = False
        self.family = 6 if sock.family == socket.AF_INET6 else 4  # chooses its own endpoints
        # the header's destination of each datagram, so replies leave from it
        self.pktinfo = sock.family in (socket.AF_INET, socket.AF_INET6)
        if self.pktinfo:
            try:
                if self.family == 6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            except OSError:
                self.pktinfo = False
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_RCVBUF)
        # recvmmsg/sendmmsg batches (native/udp.c), for both families
        batches = proxy.native_path
        self.batched = batches is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        self.resume()

    def resume(self) -> None:
        """Read the socket (at start, and again after a takeover that failed)."""
        batches = self.proxy.native_path
        if batches is not None and self.batched:
            self.proxy.loop.add_reader(self._fd, batches.client_batch, self)
        else:
            self.proxy.loop.add_reader(self._fd, self.proxy.python_path.client_readable, self)

    def pause(self) -> None:
        self.proxy.loop.remove_reader(self._fd)

    def release(self) -> None:
        """The socket lives on in the new process: close our fd only (and our flows)."""
        self.close()

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.proxy.loop.remove_reader(self._fd)
        for flow in list(self.flows.values()):
            self.proxy.close_flow(flow, "service port removed")
        self.proxy.listeners.discard(self)
        self.sock.close()
