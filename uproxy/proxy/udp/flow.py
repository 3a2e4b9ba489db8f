"""One UDP flow: a client on a listener, relayed to one endpoint through one socket.

A flow is (listener, client address). Its backend socket is *connected* to
the endpoint: no packet is sent by ``connect``, but the kernel then fixes the
peer, filters replies to it, and reports ICMP port unreachable from it as
``ECONNREFUSED`` on the next call -- which is how a refusing endpoint is
noticed. The flow also remembers the address the client sent to (from
``IP_PKTINFO``, over IPv6 ``IPV6_RECVPKTINFO``), so every reply leaves from it
(``IP_PKTINFO`` / ``IPV6_PKTINFO`` on the send): after ``REDIRECT`` that is
the incoming interface's address, or ``127.0.0.1`` / ``::1`` for the node's
own traffic, and conntrack finds the reverse mapping and rewrites the source back
to ``ClusterIP:port`` (resolvers such as ``dig`` drop replies from any other
source).
"""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING

from uproxy.connections import Conn
from uproxy.model import Endpoint

if TYPE_CHECKING:
    from uproxy.proxy.udp.listener import UdpListener

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
PKTINFO6 = struct.Struct("=16sI")  # struct in6_pktinfo: addr, ifindex
ANC_SIZE = max(socket.CMSG_SPACE(PKTINFO.size), socket.CMSG_SPACE(PKTINFO6.size))


class Flow:
    """One client on one listener, relayed to one endpoint; also the table's handle."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "client",
        "closed",
        "conn",
        "endpoint",
        "fd",
        "key",
        "last",
        "listener",
        "reply_anc",
        "reply_src",
        "reply_to",
        "reply_to6",
        "sock",
    )

    @property
    def native(self) -> bool:
        """Moved by the native batches (shown in the connections table)."""
        return self.listener.batched

    def __init__(self, listener: UdpListener, key: object, client: tuple[str, int],
                 endpoint: Endpoint, sock: socket.socket, conn: Conn,
                 reply_src: bytes | None) -> None:
        self.listener = listener
        self.key = key  # in listener.flows: the address tuple, or the native path's int
        self.client = client
        self.endpoint = endpoint
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.last = 0.0
        self.bytes_up = 0
        self.bytes_down = 0
        # IP(V6)_PKTINFO: replies leave from the address the client sent to (header dst)
        self.reply_src = reply_src
        self.reply_anc: list[tuple[int, int, bytes]] = [] if reply_src is None else [
            (socket.IPPROTO_IPV6, IPV6_PKTINFO, PKTINFO6.pack(reply_src, 0))
            if len(reply_src) == 16 else
            (socket.IPPROTO_IP, IP_PKTINFO, PKTINFO.pack(0, reply_src, b"\0\0\0\0"))]
        # the native path's reply arguments: client address and port, source (-1: none)
        self.reply_to = (0, 0, -1)
        # ... for an IPv6 client: address (16 bytes), port, source (16 bytes or None)
        self.reply_to6: tuple[bytes, int, bytes | None] | None = None
        self.closed = False

    def abort(self) -> None:
        self.listener.proxy.close_flow(self, "aborted")


def header_dst(anc: list[tuple[int, int, bytes]]) -> bytes | None:
    """The destination address of the datagram's IP header, from its IP_PKTINFO (4 bytes)
    or IPV6_PKTINFO (16 bytes)."""
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= PKTINFO.size:
            return bytes(PKTINFO.unpack_from(data)[2])
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= PKTINFO6.size:
            return bytes(PKTINFO6.unpack_from(data)[0])
    return None
