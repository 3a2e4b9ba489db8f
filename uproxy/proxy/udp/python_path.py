"""The Python data path: one system call per datagram, no Python object per datagram.

Used with ``UPROXY_NO_NATIVE=1`` (both families). Shape, for speed:
``add_reader`` on the raw sockets (ours, never a transport's), no task or
coroutine per datagram, up to :data:`BATCH` datagrams per wake-up, each
received with ``recvmsg_into`` / ``recv_into`` into one preallocated 64 KiB
buffer (a datagram is never truncated: 65,507 bytes, the IPv4 maximum, and
65,527, the IPv6 one without jumbograms, pass whole) and sent with one
``send`` / ``sendmsg``. Each datagram goes alone, so when an endpoint goes
away only the datagram that meets its ICMP error is refused, and that one is
sent again on a new flow (see :mod:`uproxy.flowsetup`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from uproxy.proxy.udp.flow import ANC_SIZE, Flow, header_dst

if TYPE_CHECKING:
    from uproxy.proxy.udp.listener import UdpListener
    from uproxy.proxy.udp.proxy import UdpProxy

log = logging.getLogger("uproxy.udp")

BATCH = 64
BUFFER_SIZE = 65536  # > 65,527 (largest IPv6 UDP payload, IPv4's is 65,507): never truncates


class PythonPath:
    """Moves the datagrams of Python-path listeners and their flows."""

    def __init__(self, proxy: UdpProxy) -> None:
        self.proxy = proxy
        self._buf = bytearray(BUFFER_SIZE)
        self._bufs = [self._buf]
        self._view = memoryview(self._buf)

    def client_readable(self, listener: UdpListener) -> None:
        """Datagrams from clients: up to BATCH per wake-up, each to its flow's backend."""
        proxy = self.proxy
        recv = listener.sock.recvmsg_into
        flows = listener.flows
        bufs, view = self._bufs, self._view
        anc_size = ANC_SIZE if listener.pktinfo else 0
        touch = proxy.flows.touch
        now = proxy.clock()
        for _ in range(BATCH):
            try:
                n, anc, _flags, addr = recv(bufs, anc_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if listener.closed:
                    return
                log.debug("%s: receive failed: %s", listener.name, exc)
                continue
            flow = flows.get(addr)
            if flow is None:
                flow = proxy.new_flow(listener, addr, addr, header_dst(anc), now)
                if flow is None:
                    continue
            else:
                touch(flow, now)
            data = view[:n]
            try:
                flow.sock.send(data)
            except BlockingIOError:
                proxy.drop(listener, "backend_busy")
                continue
            except OSError as exc:
                # ECONNREFUSED: an earlier datagram met ICMP port unreachable. The machine
                # says: try again once, on a new flow with another endpoint.
                if not proxy.backend_failed(flow, exc, unsent=True):
                    continue
                flow = proxy.new_flow(listener, addr, addr, header_dst(anc), now)
                if flow is None:
                    continue
                try:
                    flow.sock.send(data)
                except OSError as exc2:
                    proxy.backend_failed(flow, exc2, unsent=True, retried=True)
                    continue
            flow.bytes_up += n

    def backend_readable(self, flow: Flow) -> None:
        """Replies from an endpoint: each back to the client, from the socket it wrote to."""
        proxy = self.proxy
        recv = flow.sock.recv_into
        buf, view = self._buf, self._view
        listener = flow.listener
        out = listener.sock
        client, anc = flow.client, flow.reply_anc
        answered_before = flow.bytes_down > 0
        got = 0
        for _ in range(BATCH):
            try:
                n = recv(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ECONNREFUSED: ICMP port unreachable from the endpoint
                proxy.backend_failed(flow, exc)
                return
            got += 1
            try:
                if anc:
                    out.sendmsg([view[:n]], anc, 0, client)
                else:
                    out.sendto(view[:n], client)
            except (BlockingIOError, InterruptedError):
                proxy.drop(listener, "client_busy")
                continue
            except OSError as exc:
                log.debug("%s: reply to %s failed: %s", listener.name, client, exc)
                continue
            flow.bytes_down += n
        if got and not flow.closed:
            proxy.flows.touch(flow, proxy.clock())
            if not answered_before:  # the endpoint answers: stop avoiding it
                proxy.balancer.connect_succeeded(flow.endpoint)
