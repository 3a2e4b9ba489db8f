"""The native data path: ``recvmmsg``/``sendmmsg`` batches in C, Python once per client.

Used for every listener, IPv4 and IPv6, when the native module is active. One
``recvmmsg`` per wake-up fills preallocated C buffers (``native/udp.c``), which also
groups the datagrams by client; Python looks each *client* up once per batch
and hands the group to one ``sendmmsg`` on the flow's backend socket, straight
from the receive buffers (Python never touches a payload). Replies: one
``recvmmsg`` on the backend socket, one ``sendmmsg`` from the listener with
the flow's ``IP_PKTINFO`` (``IPV6_PKTINFO``) on every datagram. A client's key
in ``listener.flows`` is the int the C side packs an IPv4 address and port
into; an IPv6 one does not fit an int, so its key is the 18 bytes of address
and port the batch carries in ``src6``. Per datagram that is a fraction
of a system call per direction instead of two, and no Python at all. A run of
equal-sized datagrams leaves as one ``UDP_SEGMENT`` (GSO) message; where the
path refuses a segment size the C side lowers its bound and sends them one by
one. (Measured figures: bench/ANALYSIS.md, "UDP relay".)

One difference from the Python path, by design: a flow whose endpoint has
answered sends whole batches, so when that endpoint disappears the datagrams
of the batch in flight are lost (as on any real network, where the ICMP error
arrives after them); one send per datagram on a local network loses only the
first. Until an endpoint answers, a batch's first datagram goes alone and the
refusal is checked, like the Python path. The buffers are 2 x 64 x 64 KiB of
address space, resident only as far as datagrams fill them; both batches are
filled and emptied within one callback, so every listener and flow shares them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from uproxy import native as native_module
from uproxy.proxy.udp.flow import Flow

if TYPE_CHECKING:
    from uproxy.proxy.udp.listener import UdpListener
    from uproxy.proxy.udp.proxy import UdpProxy

log = logging.getLogger("uproxy.udp")


def _new_batch(lib: Any, ffi: Any) -> Any:
    batch = lib.uproxy_udp_batch_new()
    if batch == ffi.NULL:
        raise MemoryError("cannot allocate the UDP receive batch")
    return ffi.gc(batch, lib.uproxy_udp_batch_free)


class NativePath:
    """Moves the datagrams of batched listeners and their flows."""

    def __init__(self, proxy: UdpProxy) -> None:
        self.proxy = proxy
        lib, ffi = native_module.lib(), native_module.ffi()
        self._lib = lib
        self._recv, self._send, self._reply, self._reply6 = (
            lib.uproxy_udp_recv, lib.uproxy_udp_send, lib.uproxy_udp_reply,
            lib.uproxy_udp_reply6)
        self._ffi = ffi
        self._up = _new_batch(lib, ffi)  # datagrams from clients
        self._down = _new_batch(lib, ffi)  # replies
        self._sent = ffi.new("struct uproxy_udp_sent *")

    def client_batch(self, listener: UdpListener) -> None:
        """One ``recvmmsg`` of up to BATCH datagrams, grouped by client in C; per client one
        flow lookup and one ``sendmmsg`` to its backend socket from the receive buffers."""
        batch = self._up
        n = self._recv(listener.fd, batch, 1)
        if n <= 0:
            if n != -errno.EAGAIN and not listener.closed:
                log.debug("%s: receive failed: %s", listener.name, os.strerror(-n))
            return
        now = self.proxy.clock()
        if listener.family == 6:  # the key: address and port, 18 bytes
            buffer, src6, order, group = self._ffi.buffer, batch.src6, batch.order, batch.group
            for g in range(batch.ngroups):
                start = group[g]
                self._send_group(listener, batch, start, group[g + 1],
                                 bytes(buffer(src6[order[start]])), now)
            return
        if batch.ngroups == 1:  # the usual case: one client (order[0] is datagram 0)
            self._send_group(listener, batch, 0, n, batch.key[0], now)
            return
        keys, order, group = batch.key, batch.order, batch.group
        for g in range(batch.ngroups):
            start = group[g]
            self._send_group(listener, batch, start, group[g + 1], keys[order[start]], now)

    def _send_group(self, listener: UdpListener, batch: Any, start: int, end: int,
                    key: int | bytes, now: float) -> None:
        """The datagrams at positions [start, end) of the batch, all from client ``key``."""
        proxy = self.proxy
        out, send = self._sent, self._send
        flow = listener.flows.get(key)
        if flow is not None:
            proxy.flows.touch(flow, now)
            # until the endpoint answers, the first datagram goes alone (see udp.c)
            sent = send(flow.fd, batch, start, end, flow.bytes_down == 0, out)
            flow.bytes_up += out.bytes
            if sent == end - start:
                return
        while start < end:
            if flow is None:
                flow = self._new_flow(listener, key, batch, batch.order[start], now)
                if flow is None:  # dropped (and counted), as each datagram would be
                    start += 1
                    continue
                send(flow.fd, batch, start, end, flow.bytes_down == 0, out)
                flow.bytes_up += out.bytes
            if out.busy:
                proxy.drop(listener, "backend_busy", out.busy)
            if not out.err:
                return
            # ECONNREFUSED: an earlier datagram met ICMP port unreachable. The machine says
            # whether to try this one again, once, on a new flow; the rest follow it.
            at = out.err_at
            retry = proxy.backend_failed(flow, OSError(out.err, os.strerror(out.err)),
                                         unsent=at < end)
            flow = None
            if not retry:  # every datagram went; only the refusal was left
                return
            again = self._new_flow(listener, key, batch, batch.order[at], now)
            if again is not None:
                send(again.fd, batch, at, at + 1, 0, out)
                if out.sent:
                    again.bytes_up += out.bytes
                else:
                    err = out.err or errno.EAGAIN
                    proxy.backend_failed(again, OSError(err, os.strerror(err)), unsent=True,
                                         retried=True)
            start = at + 1
            flow = listener.flows.get(key)  # the retry's flow, unless it failed too
            if flow is not None and start < end:
                send(flow.fd, batch, start, end, flow.bytes_down == 0, out)
                flow.bytes_up += out.bytes
            elif flow is not None:
                return

    def _new_flow(self, listener: UdpListener, key: int | bytes, batch: Any, index: int,
                  now: float) -> Flow | None:
        """A flow for the client in ``key`` (IPv4: address << 16 | port; IPv6: address and
        port bytes) whose datagram ``index`` of ``batch`` is the first."""
        dst: int = batch.dst[index]
        if isinstance(key, bytes):
            addr6 = (socket.inet_ntop(socket.AF_INET6, key[:16]),
                     int.from_bytes(key[16:18], "big"))
            spec6 = None if dst < 0 else bytes(self._ffi.buffer(batch.dst6[index]))
            flow = self.proxy.new_flow(listener, key, addr6, spec6, now)
            if flow is not None:
                flow.reply_to6 = (key[:16], addr6[1], spec6)
            return flow
        addr = (socket.inet_ntoa((key >> 16).to_bytes(4, "big")), key & 0xFFFF)
        flow = self.proxy.new_flow(listener, key, addr,
                                   None if dst < 0 else dst.to_bytes(4, "big"), now)
        if flow is not None:
            flow.reply_to = (key >> 16, key & 0xFFFF, dst)
        return flow

    def backend_batch(self, flow: Flow) -> None:
        """Replies: one ``recvmmsg``, one ``sendmmsg`` to the client from the listener
        socket (each datagram with the flow's IP_PKTINFO)."""
        proxy = self.proxy
        batch, out = self._down, self._sent
        n = self._recv(flow.fd, batch, 0)
        if n <= 0:
            if n != -errno.EAGAIN:  # ECONNREFUSED: ICMP port unreachable from the endpoint
                proxy.backend_failed(flow, OSError(-n, os.strerror(-n)))
            return
        listener = flow.listener
        answered_before = flow.bytes_down > 0
        if flow.reply_to6 is not None:
            addr6, port6, spec6 = flow.reply_to6
            sent = self._reply6(listener.fd, batch, addr6, port6,
                                self._ffi.NULL if spec6 is None else spec6, out)
        else:
            ip, port, spec = flow.reply_to
            sent = self._reply(listener.fd, batch, ip, port, spec, out)
        flow.bytes_down += out.bytes
        if sent != n:
            if out.busy:
                proxy.drop(listener, "client_busy", out.busy)
            if out.failed:
                log.debug("%s: reply to %s failed: %s", listener.name, flow.client,
                          os.strerror(out.err))
        proxy.flows.touch(flow, proxy.clock())
        if not answered_before:  # the endpoint answers: stop avoiding it
            proxy.balancer.connect_succeeded(flow.endpoint)
