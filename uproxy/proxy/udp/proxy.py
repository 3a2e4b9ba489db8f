"""The UDP proxy: wires the listeners, the flow table, the two data paths, the flow set-up
machine and the conntrack clean-up together, and owns each flow's life.

Shape: every decision lives elsewhere and this module only performs it -- which
endpoint may serve (:mod:`uproxy.balance`), whether and how a flow is set up or
given up (:mod:`uproxy.flowsetup`), which flow is idlest (:mod:`uproxy.flowtable`),
what conntrack entries went stale (:mod:`.conntrack_cleanup`). What stays here
is what needs the loop and the sockets: opening a flow's connected backend
socket, registering and closing flows, the expiry timer, and applying a new
``entries`` dict (the daemon assigns one on every sync).

Endpoint and service changes close, at once, the flows whose service port is
gone and the flows whose endpoint no longer serves their listener by
:func:`uproxy.balance.flow_endpoints` (a terminating endpoint keeps its flows
while it still serves, as kube-proxy keeps its conntrack entries; a ``Local``
policy change moves them). The client's next datagram then picks an endpoint
anew by :func:`uproxy.balance.usable_endpoints`.

``max_flows`` bounds the table (None: :func:`default_max_flows`); the daemon
passes the ``udp_max_flows`` setting.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections.abc import Callable, Mapping

from uproxy import native as native_module
from uproxy.balance import Balancer, flow_endpoints
from uproxy.connections import ConnTable
from uproxy.conntrack import Conntrack, Stale
from uproxy.flowsetup import (
    BackendFailed,
    Choose,
    Chosen,
    Close,
    Drop,
    Established,
    Evict,
    FlowSetup,
    Log,
    MarkFailed,
    NewClient,
    Open,
    Opened,
    OpenFailed,
    Retry,
)
from uproxy.flowtable import EVICT_MIN_IDLE, FlowLru
from uproxy.metrics import Metrics
from uproxy.model import Endpoint, ServicePortName
from uproxy.proxy.transparent import Transparent, backend_socket
from uproxy.proxy.udp.conntrack_cleanup import ConntrackCleanup
from uproxy.proxy.udp.flow import Flow
from uproxy.proxy.udp.listener import UdpListener
from uproxy.proxy.udp.native_path import NativePath
from uproxy.proxy.udp.python_path import PythonPath
from uproxy.settings import Settings
from uproxy.state import Entry

log = logging.getLogger("uproxy.udp")

DEFAULT_MAX_FLOWS = 65536
MIN_TIMEOUT = 0.05


def default_max_flows(nofile: int | None = None) -> int:
    """65,536, but at most half the open-files limit: each flow holds one socket, and TCP
    connections need descriptors too."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            return DEFAULT_MAX_FLOWS
    return max(16, min(DEFAULT_MAX_FLOWS, nofile // 2))


class UdpProxy:
    """Owns the UDP side: listeners, the flow table and conntrack hygiene."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, balancer: Balancer, conns: ConnTable,
                 metrics: Metrics, settings: Settings, max_flows: int | None = None,
                 evict_min_idle: float = EVICT_MIN_IDLE, conntrack: Conntrack | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 native: bool | None = None, transparent: Transparent | None = None) -> None:
        self.loop = loop
        self.transparent = transparent  # None or off: backends see the node's address
        self.balancer = balancer
        self.conns = conns
        self.metrics = metrics
        self.timeout = max(settings.udp_timeout, MIN_TIMEOUT)
        if settings.udp_timeout < MIN_TIMEOUT:
            log.warning("--udp-timeout %gs is too short for any reply to arrive; using %gs",
                        settings.udp_timeout, MIN_TIMEOUT)
        self.clock = clock
        self.flows: FlowLru[Flow] = FlowLru(
            default_max_flows() if max_flows is None else max_flows,
            evict_min_idle=min(evict_min_idle, self.timeout))
        self.setup: FlowSetup[Flow] = FlowSetup()
        # Without our rules there is no NAT of ours to go stale (and tests that run the
        # daemon without iptables must not touch the host's conntrack table).
        self.conntrack = (conntrack if conntrack is not None
                          else Conntrack(enabled=settings.manage_iptables))
        self.cleanup = ConntrackCleanup(loop, self.conntrack)
        self.listeners: set[UdpListener] = set()
        self.dropped: dict[str, int] = {}
        self._entries: dict[ServicePortName, Entry] = {}
        if native is None:
            native = native_module.ACTIVE == "native"
        self.native = native
        self.python_path = PythonPath(self)
        self.native_path = NativePath(self) if native else None
        self._sweeper: asyncio.TimerHandle | None = None

    # Entries (the daemon passes what each sync changed) -----------------------------------
    @property
    def entries(self) -> dict[ServicePortName, Entry]:
        return self._entries

    @entries.setter
    def entries(self, new: dict[ServicePortName, Entry]) -> None:
        """Serve exactly ``new`` (a copy is kept); the daemon's syncs use :meth:`update_entries`."""
        old, self._entries = self._entries, dict(new)
        self._entries_changed(old, None)

    def update_entries(self, changes: Mapping[ServicePortName, Entry | None]) -> None:
        """These service ports' new entries (None: gone), the others unchanged."""
        entries = self._entries
        old = {name: entries.get(name) for name in changes}
        for name, entry in changes.items():
            if entry is None:
                entries.pop(name, None)
            else:
                entries[name] = entry
        self._entries_changed(old, changes)

    def _entries_changed(self, old: Mapping[ServicePortName, Entry | None],
                         names: Mapping[ServicePortName, object] | None) -> None:
        """Close the flows whose endpoint no longer serves (of ``names`` only, unless
        None), then queue the conntrack entries the change left stale."""
        new = self._entries
        node = self.balancer.node_name
        for listener in list(self.listeners):
            if names is not None and listener.name not in names:
                continue
            entry = new.get(listener.name)
            if entry is old.get(listener.name) or not listener.flows:
                continue
            if entry is None:
                for flow in list(listener.flows.values()):
                    self.close_flow(flow, "service port removed")
                continue
            # A flow stays while its endpoint serves (balance.flow_endpoints).
            kept = {e.address for e in flow_endpoints(entry, external=listener.external,
                                                      node_name=node)}
            for flow in list(listener.flows.values()):
                if flow.endpoint.address not in kept:
                    self.close_flow(flow, "endpoint removed")
        ports = {(lst.name, lst.scope, lst.family): lst.port for lst in self.listeners
                 if names is None or lst.name in names}
        self.cleanup.entries_changed(new, ports, node, None if names is None else list(names))

    # Conntrack hygiene (see conntrack_cleanup) -------------------------------------------
    def rules_applied(self) -> None:
        """The daemon applied the rules of the last ``entries``: safe to delete stale entries."""
        self.cleanup.rules_applied()

    @property
    def pending_conntrack(self) -> list[Stale]:
        """Stale-entry deletions not done yet (waiting for rules, or running)."""
        return self.cleanup.pending

    async def flush_conntrack(self) -> None:
        """Delete pending stale entries now and wait (for tests and shutdown)."""
        await self.cleanup.flush()

    # Listening ------------------------------------------------------------------------------
    def listen(self, sock: socket.socket, name: ServicePortName, scope: str) -> UdpListener:
        listener = UdpListener(self, sock, name, scope)
        self.listeners.add(listener)
        return listener

    def drop(self, listener: UdpListener, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        self.metrics.connections_total.labels(str(listener.name), "UDP", reason).inc(count)

    # Flow set-up: the machine decides, this performs ----------------------------------------
    def new_flow(self, listener: UdpListener, key: object, addr: tuple[str, int],
                 header_dst: bytes | None, now: float) -> Flow | None:
        """A flow for a client's first datagram, or None (dropped and counted)."""
        entry = self._entries.get(listener.name)
        table = self.flows
        full = table.full
        setup = self.setup
        sock: socket.socket | None = None
        actions = setup.handle(NewClient(entry is not None, full,
                                         table.victim(now) if full else None))
        while actions:
            step, actions = actions, []
            for action in step:
                match action:
                    case Drop(reason):
                        self.drop(listener, reason)
                        return None
                    case Evict(victim):
                        self.metrics.udp_flows_evicted.labels(str(victim.listener.name)).inc()
                        self.close_flow(victim, "evicted")
                    case Choose():
                        assert entry is not None
                        actions = setup.handle(Chosen(self.balancer.choose(
                            entry, addr[0], now, external=listener.external,
                            family=listener.family)))
                    case Open(endpoint):
                        try:
                            sock = self._backend_socket(
                                endpoint, self._source(listener, addr[0], endpoint, entry))
                        except OSError as exc:
                            actions = setup.handle(OpenFailed(
                                endpoint, exc.errno or 0, exc.strerror or str(exc), len(table)))
                        else:
                            actions = setup.handle(Opened(endpoint))
                    case MarkFailed(endpoint):
                        self.balancer.connect_failed(endpoint, now, entry, addr[0])
                    case Log(level, message):
                        log.log(level, "%s", message)
                    case Established(endpoint):
                        assert sock is not None
                        return self._register(listener, key, addr, endpoint, sock, header_dst,
                                              now)
        raise AssertionError("the flow set-up ended without a decision")

    def _register(self, listener: UdpListener, key: object, addr: tuple[str, int],
                  endpoint: Endpoint, sock: socket.socket, header_dst: bytes | None,
                  now: float) -> Flow:
        conn = self.conns.open(protocol="UDP", service=listener.name, client=addr,
                               scope=listener.scope)
        flow = Flow(listener, key, addr, endpoint, sock, conn, header_dst)
        listener.flows[key] = flow
        self.flows.add(flow, now)
        self.conns.established(conn, endpoint.address, flow)
        self.metrics.udp_flows_active.labels(str(listener.name)).inc()
        self.metrics.connections_total.labels(str(listener.name), "UDP", "ok").inc()
        reader: Callable[[Flow], None] = (
            self.native_path.backend_batch if listener.batched and self.native_path is not None
            else self.python_path.backend_readable)
        self.loop.add_reader(flow.fd, reader, flow)
        self._arm_sweeper()
        return flow

    def _source(self, listener: UdpListener, client_ip: str, endpoint: Endpoint,
                entry: Entry | None) -> str | None:
        """The client's address to send from (transparent mode), or None: the node's."""
        tp = self.transparent
        if tp is None or entry is None:
            return None
        return tp.source_for(client_ip, endpoint, external=listener.external,
                             external_local=entry.port.external_local)

    @staticmethod
    def _backend_socket(endpoint: Endpoint, source: str | None = None) -> socket.socket:
        """``source``: the client's address to send from (transparent mode), else the node's."""
        family = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
        sock = backend_socket(family, socket.SOCK_DGRAM, source)
        try:
            sock.connect(endpoint.address)  # no packet: fixes the peer, filters replies
        except BaseException:
            sock.close()
            raise
        return sock

    def backend_failed(self, flow: Flow, exc: OSError, *, unsent: bool = False,
                       retried: bool = False) -> bool:
        """A send or receive on the flow's backend socket failed: do what the machine says.
        True: send the unsent datagram again, once, on a new flow."""
        retry = False
        service = str(flow.listener.name)
        for action in self.setup.handle(BackendFailed(
                flow.endpoint, exc.errno or 0, exc.strerror or str(exc), service,
                unsent=unsent, retried=retried, closed=flow.closed)):
            match action:
                case MarkFailed(endpoint, refused):
                    if refused:
                        self.metrics.endpoint_failures.labels(service, str(endpoint)).inc()
                        self.conns.connect_failed(flow.listener.name, endpoint.address)
                    self.balancer.connect_failed(endpoint, self.clock(),
                                                 self._entries.get(flow.listener.name),
                                                 flow.client[0])
                case Log(level, message):
                    log.log(level, "%s", message)
                case Close(reason):
                    self.close_flow(flow, reason)
                case Retry():
                    retry = True
        return retry

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
    def arm_sweeper(self) -> None:
        """Make sure a sweep is scheduled (after flows were added from outside: a takeover)."""
        self._arm_sweeper()

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
        await self.cleanup.shutdown(grace)
