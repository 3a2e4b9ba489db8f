"""UDP: flows from clients to endpoints, relayed datagram by datagram.

A *flow* is (listener, client address): the first datagram from a client on a
proxy or NodePort socket chooses an endpoint (random or ClientIP affinity,
through the shared :class:`~uproxy.balance.Balancer`) and opens a *connected*
backend socket to it; later datagrams of the flow go through that socket,
and whatever the endpoint sends back is sent to the client from the socket
the request arrived on. With ``IP_PKTINFO`` the reply also leaves from the
exact local address the request was delivered to (after ``REDIRECT``: the
incoming interface's address, or ``127.0.0.1`` for the node's own traffic),
so conntrack finds the reverse mapping and rewrites the source back to
``ClusterIP:port`` -- resolvers such as ``dig`` drop replies from any other
source.

Shape, for speed (DNS queries/s is a benchmark figure): ``add_reader`` on
the raw sockets (ours, never a transport's), no task or coroutine per
datagram, up to :data:`BATCH` datagrams per wake-up. Two twins move them:

* native (``uproxy.native.ACTIVE``, IPv4 listeners): one ``recvmmsg`` per
  wake-up into preallocated C buffers (``native/udp.c``), which also groups
  the datagrams by client; Python looks each *client* up once per batch and
  hands the group to one ``sendmmsg`` on the flow's backend socket, straight
  from the receive buffers (Python never touches a payload). Replies: one
  ``recvmmsg`` on the backend socket, one ``sendmmsg`` from the listener with
  the flow's ``IP_PKTINFO`` on every datagram. Per query that is a fraction
  of a system call per direction instead of two, and no Python per datagram.
  A run of equal-sized datagrams (a DNS client repeating a query; at most
  1,232 bytes each) leaves as one ``UDP_SEGMENT`` (GSO) message: the kernel
  routes, filters and NATs it once and delivers the same datagrams; where the
  path refuses a segment size (MTU) the C side lowers its bound and sends
  them one by one. ``native/bench_udp.py`` measures it against kernel DNAT
  (dnsperf, one client, 100 queries in flight, 2 shared cores): 7-9.5 us of
  the daemon's CPU per query instead of 16-17, mostly the kernel's sends and
  wake-ups; busy runs give bigger batches, so fewer microseconds per query;
* Python (``UPROXY_NO_NATIVE=1``, and IPv6 listeners, whose addresses the C
  side does not handle): a loop of ``recvmsg_into`` / ``recv_into`` into one
  preallocated 64 KiB buffer and one ``send``/``sendmsg`` per datagram.

Both behave the same (tests run on both): per-datagram drop accounting, the
retry of a refused datagram on a new flow, replies from the arrival address.
One difference, by design: a flow whose endpoint has answered sends whole
batches, so when that endpoint disappears the datagrams of the batch in flight
are lost (as on any real network, where the ICMP error arrives after them);
one send per datagram on a local network loses only the first. Until an
endpoint answers, the native path sends a batch's first datagram alone and
checks for the refusal, like the Python path. A datagram is never truncated:
65,507 bytes (the IPv4 maximum) pass whole both ways; the native buffers are
2 x 64 x 64 KiB of address space, resident only as far as datagrams fill them.

Flow table: a dict per listener (client address, on the native path packed
into an int by the C side -> flow) plus one LRU
(:class:`FlowLru`, an ``OrderedDict``) over all flows, touched on every
datagram in either direction, so expiry and eviction are O(1) each:

* idle flows expire after ``--udp-timeout`` (default 30 s, swept a few times
  per timeout). Why 30 s: it is the kernel's own timeout for an unreplied UDP
  conntrack entry, so uproxy never forgets a flow the kernel still maps.
  kube-proxy's old userspace mode used 250 ms, which broke DNS through
  forwarders: a reply that takes longer than the timeout (a forwarder asking
  upstream) arrives after the backend socket is closed and is lost. A long
  timeout costs one socket per idle flow, bounded by the table size;
* the table is bounded (``max_flows``: 65,536 by default but at most half the
  open-files limit, since every flow holds a socket; ``UPROXY_UDP_MAX_FLOWS``
  overrides it). When it is full, the least recently used flow is evicted
  if it has been idle at least ``evict_min_idle`` (1 s); otherwise the new
  client's datagram is dropped -- what the kernel does when its conntrack
  table is full -- so a flood of new source ports can neither grow memory
  nor cut off flows that are in use (a request in flight would lose its
  reply if its flow were evicted).

An endpoint that answers with ICMP port unreachable (``ECONNREFUSED`` on the
connected backend socket) closes the flow and is avoided for a while
(``balancer.connect_failed``); the next datagram of the client picks another
endpoint. With no usable endpoint the datagram is dropped and counted (there
is no UDP equivalent of a RST worth sending).

Endpoint and service changes arrive as a new ``entries`` dict: flows whose
service port is gone, or whose endpoint is no longer serving, are closed at
once, and stale conntrack entries are deleted (see :mod:`uproxy.conntrack`)
after the daemon has applied the rules (:meth:`UdpProxy.rules_applied`; until a
daemon calls it, :data:`RULES_GRACE` after the change). Deleting earlier would
let a client's next datagram re-create the old mapping from the old rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, Protocol, TypeVar

from uproxy import native as native_module
from uproxy.balance import Balancer
from uproxy.connections import Conn, ConnTable
from uproxy.conntrack import Conntrack, Stale
from uproxy.metrics import Metrics
from uproxy.model import Endpoint, ServicePortName
from uproxy.settings import Settings
from uproxy.state import Entry

log = logging.getLogger("uproxy.udp")

BATCH = 64
BUFFER_SIZE = 65536  # > 65,507 (largest IPv4 UDP payload): never truncates
DEFAULT_MAX_FLOWS = 65536
MAX_FLOWS_ENV = "UPROXY_UDP_MAX_FLOWS"
EVICT_MIN_IDLE = 1.0
MIN_TIMEOUT = 0.05
LISTEN_RCVBUF = 4 << 20
RULES_GRACE = 0.5  # without a rules_applied() call, flush conntrack this long after a change
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_ANC_SIZE = socket.CMSG_SPACE(_PKTINFO.size)


class _Timed(Protocol):
    last: float


F = TypeVar("F", bound=_Timed)


class FlowLru(Generic[F]):
    """Flows in least-recently-used order, bounded; pure bookkeeping (the caller closes).

    ``touch`` on every datagram keeps the order equal to the order of
    ``last`` (as long as time does not go backwards), so the oldest flow is
    always first: expiry pops from the front until it meets a live one.
    """

    def __init__(self, max_flows: int, *, evict_min_idle: float = EVICT_MIN_IDLE) -> None:
        if max_flows < 1:
            raise ValueError(f"max_flows must be at least 1, got {max_flows}")
        self.max_flows = max_flows
        self.evict_min_idle = evict_min_idle
        self._order: OrderedDict[F, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, flow: object) -> bool:
        return flow in self._order

    def __iter__(self) -> Iterator[F]:
        return iter(list(self._order))

    @property
    def full(self) -> bool:
        return len(self._order) >= self.max_flows

    def oldest(self) -> F | None:
        return next(iter(self._order), None)

    def victim(self, now: float) -> F | None:
        """The flow to evict to make room (the oldest, if idle long enough), or None."""
        oldest = self.oldest()
        if oldest is not None and now - oldest.last >= self.evict_min_idle:
            return oldest
        return None

    def add(self, flow: F, now: float) -> None:
        """Insert a new flow; the caller made room first (``full``/``victim``)."""
        if len(self._order) >= self.max_flows:
            raise OverflowError("flow table full")
        flow.last = now
        self._order[flow] = None

    def touch(self, flow: F, now: float) -> None:
        flow.last = now
        self._order.move_to_end(flow)

    def remove(self, flow: F) -> None:
        self._order.pop(flow, None)

    def expired(self, now: float, timeout: float) -> list[F]:
        """Remove and return the flows idle for ``timeout`` or longer, oldest first."""
        out: list[F] = []
        order = self._order
        while order:
            flow = next(iter(order))
            if now - flow.last < timeout:
                break
            del order[flow]
            out.append(flow)
        return out

    def next_expiry(self, timeout: float) -> float | None:
        oldest = self.oldest()
        return None if oldest is None else oldest.last + timeout


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
        # IP_PKTINFO: replies leave from the address the client sent to (header dst)
        self.reply_src = reply_src
        self.reply_anc: list[tuple[int, int, bytes]] = [] if reply_src is None else [
            (socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, reply_src, b"\0\0\0\0"))]
        # the native path's reply arguments: client address and port, source (-1: none)
        self.reply_to = (0, 0, -1)
        self.closed = False

    def abort(self) -> None:
        self.listener.proxy.close_flow(self, "aborted")


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
        self.pktinfo = sock.family == socket.AF_INET
        if self.pktinfo:
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            except OSError:
                self.pktinfo = False
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_RCVBUF)
        # recvmmsg/sendmmsg batches (native/udp.c) for IPv4; IPv6 stays on the socket module
        self.batched = proxy.native and sock.family == socket.AF_INET
        proxy.loop.add_reader(self._fd, proxy.client_batch if self.batched
                              else proxy.client_readable, self)

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


def default_max_flows(nofile: int | None = None) -> int:
    """65,536, but at most half the open-files limit: each flow holds one socket, and TCP
    connections need descriptors too."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            return DEFAULT_MAX_FLOWS
    return max(16, min(DEFAULT_MAX_FLOWS, nofile // 2))


def max_flows_from_env(env: Mapping[str, str] | None = None, *,
                       nofile: int | None = None) -> int:
    """``UPROXY_UDP_MAX_FLOWS`` when set to a positive number, else :func:`default_max_flows`."""
    value = (os.environ if env is None else env).get(MAX_FLOWS_ENV, "")
    default = default_max_flows(nofile)
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        log.warning("%s=%r is not a positive number; using %d", MAX_FLOWS_ENV, value, default)
        return default
    return number


class UdpProxy:
    """Owns the UDP side: listeners, the flow table and conntrack hygiene."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, balancer: Balancer, conns: ConnTable,
                 metrics: Metrics, settings: Settings, max_flows: int | None = None,
                 evict_min_idle: float = EVICT_MIN_IDLE, conntrack: Conntrack | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 native: bool | None = None) -> None:
        self.loop = loop
        self.balancer = balancer
        self.conns = conns
        self.metrics = metrics
        self.timeout = max(settings.udp_timeout, MIN_TIMEOUT)
        if settings.udp_timeout < MIN_TIMEOUT:
            log.warning("--udp-timeout %gs is too short for any reply to arrive; using %gs",
                        settings.udp_timeout, MIN_TIMEOUT)
        self.clock = clock
        self.flows: FlowLru[Flow] = FlowLru(max_flows or max_flows_from_env(),
                                            evict_min_idle=min(evict_min_idle, self.timeout))
        # Without our rules there is no NAT of ours to go stale (and tests that run the
        # daemon without iptables must not touch the host's conntrack table).
        self.conntrack = (conntrack if conntrack is not None
                          else Conntrack(enabled=settings.manage_iptables))
        self.listeners: set[UdpListener] = set()
        self.dropped: dict[str, int] = {}
        self._entries: dict[ServicePortName, Entry] = {}
        self._buf = bytearray(BUFFER_SIZE)
        self._bufs = [self._buf]
        self._view = memoryview(self._buf)
        # The native batches: one for datagrams from clients, one for replies (each is
        # filled and emptied within one callback, so every listener and flow shares them).
        if native is None:
            native = native_module.ACTIVE == "native"
        self.native = native
        self._lib: Any = None
        if native:
            lib, ffi = native_module.lib(), native_module.ffi()
            self._lib = lib
            self._recv, self._send, self._reply = (
                lib.uproxy_udp_recv, lib.uproxy_udp_send, lib.uproxy_udp_reply)
            self._up = self._new_batch(lib, ffi)
            self._down = self._new_batch(lib, ffi)
            self._sent = ffi.new("struct uproxy_udp_sent *")
        self._sweeper: asyncio.TimerHandle | None = None
        self._stale: list[Stale] = []  # found at a sync, rules not applied yet
        self._ready: list[Stale] = []  # rules applied: to delete
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._hooked = False
        self._fd_warned = False
        self._served_frontends: dict[tuple[str, int], int] = {}
        self._served_endpoints: set[tuple[str, int]] = set()

    @staticmethod
    def _new_batch(lib: Any, ffi: Any) -> Any:
        batch = lib.uproxy_udp_batch_new()
        if batch == ffi.NULL:
            raise MemoryError("cannot allocate the UDP receive batch")
        return ffi.gc(batch, lib.uproxy_udp_batch_free)

    # Entries (the daemon assigns a new dict on every sync) ---------------------------------
    @property
    def entries(self) -> dict[ServicePortName, Entry]:
        return self._entries

    @entries.setter
    def entries(self, new: dict[ServicePortName, Entry]) -> None:
        old, self._entries = self._entries, new
        for listener in list(self.listeners):
            entry = new.get(listener.name)
            if entry is old.get(listener.name) or not listener.flows:
                continue
            if entry is None:
                for flow in list(listener.flows.values()):
                    self.close_flow(flow, "service port removed")
                continue
            # A Local traffic policy (internal for ClusterIP, external for the rest)
            # makes endpoints on other nodes unusable for this listener's flows.
            local = entry.port.external_local if listener.external else entry.port.internal_local
            node = self.balancer.node_name
            serving = {e.address for e in entry.endpoints
                       if (e.ready or e.serving) and (not local or e.node_name == node)}
            for flow in list(listener.flows.values()):
                if flow.endpoint.address not in serving:
                    self.close_flow(flow, "endpoint removed")
        self._stale.extend(self._stale_after(new))
        if self._stale:
            self._schedule_flush()

    def _frontends(self, entries: dict[ServicePortName, Entry]) -> dict[tuple[str, int], int]:
        """(address, port) -> proxy port, for every UDP ClusterIP/externalIP/LB IP we redirect."""
        ports = {(lst.name, lst.scope): lst.port for lst in self.listeners}
        out: dict[tuple[str, int], int] = {}
        for name, entry in entries.items():
            port = entry.port
            if port.protocol != "UDP":
                continue
            for scope, addresses in (("cluster", port.cluster_ips),
                                     ("external", port.external_addresses)):
                proxy_port = ports.get((name, scope), 0)
                for address in addresses:
                    out[(address, port.port)] = proxy_port
        return out

    def _stale_after(self, new: dict[ServicePortName, Entry]) -> list[Stale]:
        stale: list[Stale] = []
        before, after = self._served_frontends, self._frontends(new)
        self._served_frontends = after
        for frontend, proxy_port in after.items():
            if before.get(frontend) != proxy_port:  # new, or now redirected elsewhere
                stale.append(Stale.frontend(*frontend, keep_reply_port=proxy_port or None))
        stale.extend(Stale.frontend(*f) for f in before.keys() - after.keys())

        def serving(entries: dict[ServicePortName, Entry]) -> set[tuple[str, int]]:
            return {e.address for entry in entries.values() if entry.port.protocol == "UDP"
                    for e in entry.endpoints if e.ready or e.serving}

        now_serving = serving(new)
        stale.extend(Stale.endpoint(*a) for a in self._served_endpoints - now_serving)
        self._served_endpoints = now_serving
        return stale

    # Conntrack hygiene -----------------------------------------------------------------
    def rules_applied(self) -> None:
        """The daemon applied the rules of the last ``entries``: safe to delete stale entries."""
        self._hooked = True
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._start_flush()

    def _schedule_flush(self) -> None:
        if self._hooked:  # rules_applied() follows this sync
            return
        if self._flush_timer is None:
            self._flush_timer = self.loop.call_later(RULES_GRACE, self._flush_timer_fired)

    def _flush_timer_fired(self) -> None:
        self._flush_timer = None
        self._start_flush()

    def _start_flush(self) -> None:
        # Only what is pending now is known to be covered by applied rules; what a later
        # sync adds waits for its own rules_applied() (or timer).
        self._ready.extend(self._stale)
        self._stale.clear()
        if not self._ready or (self._flush_task is not None and not self._flush_task.done()):
            return
        self._flush_task = self.loop.create_task(self._flush(), name="udp-conntrack")

    async def _flush(self) -> None:
        while self._ready:
            batch, self._ready = self._ready, []
            try:
                await self.conntrack.delete(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("deleting stale conntrack entries failed")

    @property
    def pending_conntrack(self) -> list[Stale]:
        """Stale-entry deletions not done yet (waiting for rules, or running)."""
        return [*self._ready, *self._stale]

    async def flush_conntrack(self) -> None:
        """Delete pending stale entries now and wait (for tests and shutdown)."""
        self._ready.extend(self._stale)
        self._stale.clear()
        if self._flush_task is not None and not self._flush_task.done():
            await self._flush_task
        await self._flush()

    # Listening ------------------------------------------------------------------------------
    def listen(self, sock: socket.socket, name: ServicePortName, scope: str) -> UdpListener:
        listener = UdpListener(self, sock, name, scope)
        self.listeners.add(listener)
        return listener

    def _drop(self, listener: UdpListener, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        self.metrics.connections_total.labels(str(listener.name), "UDP", reason).inc(count)

    def client_readable(self, listener: UdpListener) -> None:
        """Datagrams from clients: up to BATCH per wake-up, each to its flow's backend."""
        recv = listener.sock.recvmsg_into
        flows = listener.flows
        bufs, view = self._bufs, self._view
        anc_size = _ANC_SIZE if listener.pktinfo else 0
        touch = self.flows.touch
        now = self.clock()
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
                flow = self._new_flow(listener, addr, addr, _header_dst(anc), now)
                if flow is None:
                    continue
            else:
                touch(flow, now)
            data = view[:n]
            try:
                flow.sock.send(data)
            except BlockingIOError:
                self._drop(listener, "backend_busy")
                continue
            except OSError as exc:
                # ECONNREFUSED: an earlier datagram met ICMP port unreachable. Try again once,
                # on a new flow with another endpoint.
                self._backend_failed(flow, exc)
                flow = self._new_flow(listener, addr, addr, _header_dst(anc), now)
                if flow is None:
                    continue
                try:
                    flow.sock.send(data)
                except OSError as exc2:
                    self._backend_failed(flow, exc2)
                    continue
            flow.bytes_up += n

    def client_batch(self, listener: UdpListener) -> None:
        """The native twin of :meth:`client_readable`: one ``recvmmsg`` of up to BATCH
        datagrams, grouped by client in C; per client one flow lookup and one ``sendmmsg``
        to its backend socket straight from the receive buffers."""
        batch = self._up
        n = self._recv(listener.fd, batch, 1)
        if n <= 0:
            if n != -errno.EAGAIN and not listener.closed:
                log.debug("%s: receive failed: %s", listener.name, os.strerror(-n))
            return
        now = self.clock()
        if batch.ngroups == 1:  # the usual case: one client (order[0] is datagram 0)
            self._send_group(listener, batch, 0, n, batch.key[0], now)
            return
        keys, order, group = batch.key, batch.order, batch.group
        for g in range(batch.ngroups):
            start = group[g]
            self._send_group(listener, batch, start, group[g + 1], keys[order[start]], now)

    def _send_group(self, listener: UdpListener, batch: Any, start: int, end: int, key: int,
                    now: float) -> None:
        """The datagrams at positions [start, end) of the batch, all from client ``key``."""
        out, send = self._sent, self._send
        flow = listener.flows.get(key)
        if flow is not None:
            self.flows.touch(flow, now)
            # until the endpoint answers, the first datagram goes alone (see udp.c)
            sent = send(flow.fd, batch, start, end, flow.bytes_down == 0, out)
            flow.bytes_up += out.bytes
            if sent == end - start:
                return
        while start < end:
            if flow is None:
                flow = self._new_native_flow(listener, key, batch.dst[batch.order[start]], now)
                if flow is None:  # dropped (and counted), as each datagram would be
                    start += 1
                    continue
                send(flow.fd, batch, start, end, flow.bytes_down == 0, out)
                flow.bytes_up += out.bytes
            if out.busy:
                self._drop(listener, "backend_busy", out.busy)
            if not out.err:
                return
            # ECONNREFUSED: an earlier datagram met ICMP port unreachable. Try this one
            # again once, on a new flow with another endpoint; the rest follow it.
            at = out.err_at
            self._backend_failed(flow, OSError(out.err, os.strerror(out.err)))
            flow = None
            if at >= end:  # every datagram went; only the refusal was left
                return
            retry = self._new_native_flow(listener, key, batch.dst[batch.order[at]], now)
            if retry is not None:
                send(retry.fd, batch, at, at + 1, 0, out)
                if out.sent:
                    retry.bytes_up += out.bytes
                else:
                    err = out.err or errno.EAGAIN
                    self._backend_failed(retry, OSError(err, os.strerror(err)))
            start = at + 1
            flow = listener.flows.get(key)  # the retry's flow, unless it failed too
            if flow is not None and start < end:
                send(flow.fd, batch, start, end, flow.bytes_down == 0, out)
                flow.bytes_up += out.bytes
            elif flow is not None:
                return

    def _new_native_flow(self, listener: UdpListener, key: int, header_dst: int,
                         now: float) -> Flow | None:
        addr = (socket.inet_ntoa((key >> 16).to_bytes(4, "big")), key & 0xFFFF)
        dst = None if header_dst < 0 else header_dst.to_bytes(4, "big")
        flow = self._new_flow(listener, key, addr, dst, now)
        if flow is not None:
            flow.reply_to = (key >> 16, key & 0xFFFF, header_dst)
        return flow

    def _new_flow(self, listener: UdpListener, key: object, addr: tuple[str, int],
                  header_dst: bytes | None, now: float) -> Flow | None:
        entry = self._entries.get(listener.name)
        if entry is None:
            self._drop(listener, "no_service")
            return None
        if self.flows.full:
            victim = self.flows.victim(now)
            if victim is None:
                self._drop(listener, "table_full")
                return None
            self.metrics.udp_flows_evicted.labels(str(victim.listener.name)).inc()
            self.close_flow(victim, "evicted")
        endpoint = self.balancer.choose(entry, addr[0], now, external=listener.external)
        if endpoint is None:
            self._drop(listener, "no_endpoints")
            return None
        try:
            sock = self._backend_socket(endpoint)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                if not self._fd_warned:
                    self._fd_warned = True
                    log.warning("out of file descriptors for UDP flows (%s, %d flows); "
                                "dropping new flows", exc.strerror, len(self.flows))
                self._drop(listener, "no_fds")
            else:
                self.balancer.connect_failed(endpoint, now, entry, addr[0])
                self._drop(listener, "connect_failed")
            return None
        self._fd_warned = False
        conn = self.conns.open(protocol="UDP", service=listener.name, client=addr,
                               scope=listener.scope)
        flow = Flow(listener, key, addr, endpoint, sock, conn, header_dst)
        listener.flows[key] = flow
        self.flows.add(flow, now)
        self.conns.established(conn, endpoint.address, flow)
        self.metrics.udp_flows_active.labels(str(listener.name)).inc()
        self.metrics.connections_total.labels(str(listener.name), "UDP", "ok").inc()
        self.loop.add_reader(flow.fd, self.backend_batch if listener.batched
                             else self.backend_readable, flow)
        self._arm_sweeper()
        return flow

    @staticmethod
    def _backend_socket(endpoint: Endpoint) -> socket.socket:
        family = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(endpoint.address)  # no packet: fixes the peer, filters replies
        except BaseException:
            sock.close()
            raise
        return sock

    def backend_readable(self, flow: Flow) -> None:
        """Replies from an endpoint: each back to the client, from the socket it wrote to."""
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
                self._backend_failed(flow, exc)
                return
            got += 1
            try:
                if anc:
                    out.sendmsg([view[:n]], anc, 0, client)
                else:
                    out.sendto(view[:n], client)
            except (BlockingIOError, InterruptedError):
                self._drop(listener, "client_busy")
                continue
            except OSError as exc:
                log.debug("%s: reply to %s failed: %s", listener.name, client, exc)
                continue
            flow.bytes_down += n
        if got and not flow.closed:
            self.flows.touch(flow, self.clock())
            if not answered_before:  # the endpoint answers: stop avoiding it
                self.balancer.connect_succeeded(flow.endpoint)

    def backend_batch(self, flow: Flow) -> None:
        """The native twin of :meth:`backend_readable`: one ``recvmmsg``, one ``sendmmsg``
        to the client from the listener socket (each datagram with the flow's IP_PKTINFO)."""
        batch, out = self._down, self._sent
        n = self._recv(flow.fd, batch, 0)
        if n <= 0:
            if n != -errno.EAGAIN:  # ECONNREFUSED: ICMP port unreachable from the endpoint
                self._backend_failed(flow, OSError(-n, os.strerror(-n)))
            return
        listener = flow.listener
        ip, port, spec = flow.reply_to
        answered_before = flow.bytes_down > 0
        sent = self._reply(listener.fd, batch, ip, port, spec, out)
        flow.bytes_down += out.bytes
        if sent != n:
            if out.busy:
                self._drop(listener, "client_busy", out.busy)
            if out.failed:
                log.debug("%s: reply to %s failed: %s", listener.name, flow.client,
                          os.strerror(out.err))
        self.flows.touch(flow, self.clock())
        if not answered_before:  # the endpoint answers: stop avoiding it
            self.balancer.connect_succeeded(flow.endpoint)

    def _backend_failed(self, flow: Flow, exc: OSError) -> None:
        if flow.closed:
            return
        entry = self._entries.get(flow.listener.name)
        service = str(flow.listener.name)
        if exc.errno == errno.ECONNREFUSED:
            self.metrics.endpoint_failures.labels(service, str(flow.endpoint)).inc()
            self.balancer.connect_failed(flow.endpoint, self.clock(), entry, flow.client[0])
            log.debug("%s: %s refused a datagram (port unreachable)", service, flow.endpoint)
        else:
            log.info("%s: relaying to %s failed: %s", service, flow.endpoint, exc.strerror)
        self.close_flow(flow, "endpoint refused" if exc.errno == errno.ECONNREFUSED
                        else (exc.strerror or str(exc)))

    def close_flow(self, flow: Flow, reason: str | None = None) -> None:
        if flow.closed:
            return
        flow.closed = True
        listener = flow.listener
        if listener.flows.get(flow.key) is flow:
            del listener.flows[flow.key]
        self.flows.remove(flow)
        self.loop.remove_reader(flow.fd)
        flow.sock.close()
        self.metrics.udp_flows_active.labels(str(listener.name)).dec()
        self.metrics.bytes_total.labels(str(listener.name), "up").inc(flow.bytes_up)
        self.metrics.bytes_total.labels(str(listener.name), "down").inc(flow.bytes_down)
        self.conns.close(flow.conn, bytes_up=flow.bytes_up, bytes_down=flow.bytes_down,
                         error=None if reason in (None, "idle") else reason)

    # Expiry ---------------------------------------------------------------------------------
    def _arm_sweeper(self) -> None:
        if self._sweeper is not None:
            return
        when = self.flows.next_expiry(self.timeout)
        if when is None:
            return
        # Sweep at the oldest flow's expiry, but not more often than needed.
        delay = max(when - self.clock(), min(0.05, self.timeout / 4))
        self._sweeper = self.loop.call_later(delay, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        self.sweep()
        self._arm_sweeper()

    def sweep(self) -> int:
        """Expire idle flows now; returns how many were closed."""
        expired = self.flows.expired(self.clock(), self.timeout)
        for flow in expired:
            self.close_flow(flow, "idle")
        return len(expired)

    # Shutdown -------------------------------------------------------------------------------
    async def drain(self, grace: float) -> None:
        """UDP has no end to wait for: close every flow, then forget clients' mappings.

        The daemon calls this after removing the rules, so the entries that still
        redirect clients to our (now closed) proxy ports are deleted too: a client that
        keeps its source port would otherwise keep sending into a closed port. Pending
        conntrack work gets ``grace`` seconds.
        """
        for listener in list(self.listeners):
            listener.close()
        for flow in list(self.flows):
            self.close_flow(flow, "shutdown")
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._stale.extend(Stale.frontend(*f) for f in self._served_frontends)
        self._served_frontends = {}
        self._start_flush()
        if self._flush_task is not None and not self._flush_task.done():
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(self._flush_task)
            except Exception:
                self._flush_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._flush_task
        self._stale.clear()
        self._ready.clear()


def _header_dst(anc: list[tuple[int, int, bytes]]) -> bytes | None:
    """The destination address of the datagram's IP header, from its IP_PKTINFO."""
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _PKTINFO.size:
            return bytes(_PKTINFO.unpack_from(data)[2])
    return None
