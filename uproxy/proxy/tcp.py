"""TCP: accept on proxy and NodePort sockets, choose an endpoint, connect, hand to the relay.

Accepting uses ``add_reader`` on our own listening sockets (never on an fd a
transport owns) and takes a batch per wake-up. ``EMFILE``/``ENFILE`` pause
accepting for a moment instead of spinning, logged once per episode.
Connecting follows :mod:`uproxy.connect` (up to four endpoints with growing
timeouts, avoiding ones that just failed; a RST at once when nothing works):
that machine decides, :class:`_Connect` here does the I/O with a non-blocking
``connect`` and loop callbacks (no task, coroutine or ``wait_for`` per
connection: they cost more than the rest together).

With the native engine (:class:`~uproxy.proxy.nativerelay.NativeRelay`) the
common path runs without Python at all: the engine accepts on the listener,
chooses among the endpoints pushed here at every change (computed by
:func:`uproxy.balance.usable_endpoints`, with the balancer's failure memory),
connects with :data:`uproxy.connect.CONNECT_TIMEOUTS` and relays; Python reads
its events in batches (:meth:`TcpProxy._on_setup_events`) for the connection
table, the metrics and the balancer. Which listeners it serves is decided in
one place, :meth:`TcpProxy._wants_native`: all of them (UPROXY_NO_NATIVE: none).
ClientIP affinity is the engine's too (native/affinity.c, the balancer's rule):
each service port is an affinity group whose pins every listener of it shares;
its pins go with the balancer's in a takeover (:meth:`TcpProxy.export_affinity`,
:meth:`TcpProxy.import_affinity`). In transparent mode the engine makes the same decision
(``uproxy_transparent_source``, native/transparent.c, over the node's links
pushed here) and binds the backend socket to the client's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import sys
import termios
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from uproxy.balance import FAILED_AVOID_SECONDS, Balancer, usable_endpoints
from uproxy.connect import (
    ABORT,
    CANCELLED,
    CONNECT_TIMEOUTS,
    CONNECTED,
    FD_RETRY,
    FD_WAIT,
    NO_ENDPOINTS,
    NO_SOCKET,
    TIMED_OUT,
    WAIT_OVER,
    Choose,
    Chosen,
    Connect,
    ConnectFailed,
    ConnectionSetup,
    Event,
    MarkFailed,
    MarkSucceeded,
    NoSocket,
    Relay,
    Reset,
    Start,
    WaitForFds,
)
from uproxy.connections import Conn, ConnTable
from uproxy.metrics import Metrics
from uproxy.model import Endpoint, ServicePortName
from uproxy.proxy.relay import Relay as RelayEngine
from uproxy.proxy.relay import RelayHandle, RelayResult, reset_close
from uproxy.proxy.transparent import Transparent, backend_socket
from uproxy.state import Entry

if TYPE_CHECKING:
    from uproxy.proxy.nativerelay import ListenerPush, NativeRelay, SetupEvent

log = logging.getLogger("uproxy.tcp")

ACCEPT_BATCH = 64
# Longer than any set-up the engine may still finish for a removed listener: every attempt's
# timeout plus the out-of-fds wait (CONNECT_TIMEOUTS + FD_WAIT).
SETUP_EVENTS_GRACE = sum(CONNECT_TIMEOUTS) + FD_WAIT + 5.0
EMFILE_PAUSE = 0.2
EMFILE_QUIET = 2.0  # seconds without EMFILE that end an episode
FD_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class TcpListener:
    """One listening socket serving one service port in one scope."""

    def __init__(self, proxy: TcpProxy, sock: socket.socket, name: ServicePortName,
                 scope: str) -> None:
        self.proxy = proxy
        self.sock = sock
        self.name = name
        self.scope = scope
        self.external = scope != "cluster"
        address = sock.getsockname()  # (IPv6: 4 items; not sock.family, a slow property)
        self.family = 6 if len(address) == 4 else 4  # chooses its own endpoints
        self.address: tuple[str, int] = address[:2]
        self._fd = sock.fileno()
        self._fd_trouble_since: float | None = None  # first EMFILE of the current episode
        self._fd_trouble_last = 0.0
        self._fd_pauses = 0
        self._paused = False  # out of fds (the Python path's own pause)
        self._held = False  # a takeover paused it
        self._closed = False
        self.native: int | None = None  # the engine's id while the engine accepts on it
        self.endpoints: tuple[Endpoint, ...] = ()  # what was pushed to the engine, by index
        self.packed: tuple[tuple[bytes, int], ...] = ()  # the same, as the engine reports them
        self.metrics: _ServiceMetrics | None = None  # its service's, once it had a connection
        self.avoided = False  # some pushed endpoint was being avoided
        self.pushed_tp = False  # its family connected transparently when last pushed
        self.pushed_topology: tuple[str, str | None] | None = None  # (node, zone) then
        proxy._listeners.setdefault(name, set()).add(self)
        self._deferred = proxy.deferring  # accepting starts at its first refresh (see defer)
        if self._deferred:
            proxy._deferred.append(self)
        elif not proxy._attach(self):
            proxy.loop.add_reader(self._fd, self._accept)

    @property
    def port(self) -> int:
        return self.address[1]

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                client, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in FD_ERRNOS:
                    self.fds_exhausted(exc.strerror or str(exc))
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.error("%s: accept failed: %s", self.name, exc)
                return
            if self._fd_trouble_since is not None:
                self._fd_recovered()
            self.proxy.handle(client, addr, self)

    def fds_trouble(self, reason: str) -> None:
        """Out of fds: say so once per episode (the engine pauses its listeners itself)."""
        now = time.monotonic()
        if self._fd_trouble_since is None:
            log.warning("%s: out of file descriptors (%s); pausing accepts until some close",
                        self.name, reason)
            self._fd_trouble_since = now
        self._fd_trouble_last = now

    def fds_exhausted(self, reason: str) -> None:
        """Out of fds: stop accepting for a moment (the kernel keeps the backlog)."""
        self.fds_trouble(reason)
        if self._paused or self._closed or self.native is not None:
            return
        self._paused = True
        self._fd_pauses += 1
        self.proxy.loop.remove_reader(self._fd)
        self.proxy.loop.call_later(EMFILE_PAUSE, self._resume)

    def _fd_recovered(self) -> None:
        # One line per episode: only when no EMFILE has been seen for a while.
        if time.monotonic() - self._fd_trouble_last >= EMFILE_QUIET:
            log.info("%s: accepting again (paused %d times)", self.name, self._fd_pauses)
            self._fd_trouble_since = None
            self._fd_pauses = 0

    def _resume(self) -> None:
        self._paused = False
        if self._closed or self._held or self.native is not None:
            return
        self.proxy.loop.add_reader(self._fd, self._accept)

    def _python_accepts(self) -> None:
        """Hand accepting back to this path (the engine let go of the fd)."""
        if not (self._closed or self._held or self._paused):
            self.proxy.loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.proxy._detach(self)
        self.proxy.loop.remove_reader(self._fd)
        listeners = self.proxy._listeners.get(self.name)
        if listeners is not None:
            listeners.discard(self)
            if not listeners:
                del self.proxy._listeners[self.name]
        self.sock.close()

    # Takeover: stop accepting (the kernel keeps the backlog), then go on or let go.
    def pause(self) -> None:
        self._held = True
        if self.native is not None:
            self.proxy._native_relay().listener_pause(self.native)
        else:
            self.proxy.loop.remove_reader(self._fd)

    def resume(self) -> None:
        self._held = False
        if self._closed or self._deferred:  # (a deferred one starts at its refresh)
            return
        if self.native is not None:
            self.proxy._native_relay().listener_resume(self.native)
        elif not self._paused:
            self.proxy.loop.add_reader(self._fd, self._accept)

    def release(self) -> None:
        """The socket lives on in the new process: close our fd only."""
        self.close()


# A ClientIP pin as uproxy.balance.Balancer exports it: (service port, client IP, endpoint
# address, seconds idle).
Pin = tuple[ServicePortName, str, tuple[str, int], float]


class TcpProxy:
    """Owns the TCP side: which entry each listener serves and every live connection."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, relay: RelayEngine, balancer: Balancer,
                 conns: ConnTable, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic,
                 transparent: Transparent | None = None, congestion: str = "") -> None:
        self.loop = loop
        # --relay-congestion-control: set on listeners (accepted sockets inherit it, the
        # engine gives it to its backend sockets) and on the Python path's backend sockets
        self.congestion = congestion.encode()
        self.transparent = transparent  # None or off: backends see the node's address
        self.relay = relay
        self.balancer = balancer
        self.conns = conns
        self.metrics = metrics
        self.clock = clock
        self._entries: dict[ServicePortName, Entry] = {}
        self._listeners: dict[ServicePortName, set[TcpListener]] = {}
        self._by_native: dict[int, TcpListener] = {}  # engine listener id -> listener
        self._transparent_families: frozenset[int] = frozenset()  # as last pushed
        self._avoiding: set[TcpListener] = set()  # pushed with an endpoint being avoided
        self._topology: tuple[str, str | None] = (balancer.node_name, balancer.zone)  # seen
        self._links_pushed: tuple[object, frozenset[int]] | None = None
        # ClientIP affinity in the engine: a group number per affine service port, and
        # pins handed over for service ports the engine has no group for yet.
        self._aff_groups: dict[ServicePortName, int] = {}
        self._aff_next = 0
        self._aff_pending: dict[ServicePortName, list[tuple[str, tuple[str, int], float]]] = {}
        # Set-up in the engine: only with the native engine (UPROXY_NO_NATIVE: never).
        self._native = bool(getattr(relay, "listener_add", None))
        if self._native:
            nrelay = self._native_relay()
            nrelay.setup_config(CONNECT_TIMEOUTS, avoid=FAILED_AVOID_SECONDS, fd_retry=FD_RETRY,
                                fd_wait=FD_WAIT, fd_pause=EMFILE_PAUSE)
            nrelay.setup_sink = self._on_setup_events
            nrelay.batch_end = self._flush_metrics
            # A short connection's OPENED may wait for its DONE (no table entry, no handle)
            # unless a status stream watches the table (it sees every connection).
            nrelay.hold = self._unwatched
            nrelay.short_sink = self._on_short
            self._setup_metric = metrics.relay_setup.labels("native")
        self._setup_pending = 0  # engine set-ups of this batch, not yet in _setup_metric
        self._dirty: list[_ServiceMetrics] = []  # holding counts of this batch
        self._py_setup_metric = metrics.relay_setup.labels("python")
        self._connecting: set[_Connect] = set()
        self._metrics: dict[ServicePortName, _ServiceMetrics] = {}
        self._tw_left = 0  # the relays' count at the last sweep request (closed_one)
        self.adopted_relay: RelayEngine | None = None  # what came over, if self.relay cannot adopt
        self.deferring = False  # new listeners wait for their first refresh (defer)
        self._deferred: list[TcpListener] = []

    @property
    def live(self) -> dict[int, tuple[Conn, RelayHandle]]:
        """The relayed TCP connections, by id: the connection table's, each with the handle
        it got when established (built when asked, by a takeover; a dict kept beside the
        table cost every idle connection ~100 bytes)."""
        return {conn.id: (conn, cast(RelayHandle, conn.handle)) for conn in self.conns
                if conn.protocol == "TCP" and conn.handle is not None}

    def listen(self, sock: socket.socket, name: ServicePortName, scope: str) -> TcpListener:
        # Accepted sockets inherit them: set once here, not per connection.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.congestion:  # (checked at start: uproxy.cli.preflight)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.congestion)
        return TcpListener(self, sock, name, scope)

    def _unwatched(self) -> bool:
        return not self.conns.sees_brief()

    # ---- set-up in the engine --------------------------------------------------------
    @property
    def entries(self) -> dict[ServicePortName, Entry]:
        return self._entries

    @entries.setter
    def entries(self, table: dict[ServicePortName, Entry]) -> None:
        """Serve exactly ``table`` (a copy); the daemon's syncs call :meth:`update_entries`."""
        old, self._entries = self._entries, dict(table)
        if self._aff_groups:
            self._forget_groups()
        if not self._listeners:
            return
        for name in [n for n in self._listeners if old.get(n) is not table.get(n)]:
            for listener in list(self._listeners.get(name, ())):
                self._refresh(listener)

    def update_entries(self, changes: Mapping[ServicePortName, Entry | None]) -> None:
        """These service ports' new entries (None: gone), the others unchanged.

        What one sync changed, so its cost follows the change, not the table: with
        10,000 services an endpoint change refreshes that service's listeners only.
        """
        entries = self._entries
        refresh = []
        for name, entry in changes.items():
            if entries.get(name) is entry:
                continue
            if entry is None:
                del entries[name]
            else:
                entries[name] = entry
            refresh.append(name)
        batch: list[TcpListener] = []  # deferred ones for the engine: handed over in one call
        for name in refresh:
            for listener in list(self._listeners.get(name, ())):
                if (listener._deferred and not listener._closed and not listener._held
                        and entries.get(name) is not None and self._wants_native(listener)):
                    listener._deferred = False
                    batch.append(listener)
                else:
                    self._refresh(listener)
        if batch:
            self._attach_many(batch)
        if refresh and self._aff_groups:
            self._forget_groups()

    def _native_relay(self) -> NativeRelay:
        return self.relay  # type: ignore[return-value]  # (only when self._native)

    def _wants_native(self, listener: TcpListener) -> bool:
        """THE choice of path per listener: the engine sets up its connections (ClientIP
        affinity and transparent mode are decided in the engine too); UPROXY_NO_NATIVE
        stays on the Python path."""
        return self._native and not listener._closed

    def _attach(self, listener: TcpListener) -> bool:
        """Let the engine accept on ``listener`` if it should; True when it does."""
        if not self._wants_native(listener):
            return False
        nrelay = self._native_relay()
        try:
            lid = nrelay.listener_add(listener._fd)
        except OSError as exc:
            log.warning("%s: the engine cannot accept on it (%s); Python does", listener.name,
                        exc.strerror or exc)
            return False
        listener.native = lid
        self._by_native[lid] = listener
        if listener._held:
            nrelay.listener_pause(lid)
        if self._entries.get(listener.name) is not None:
            self._push(listener)
        # (else the engine accepts nothing yet: the kernel keeps the backlog until the
        # entry comes, as the Python path's reader is not called before it either)
        return True

    def _detach(self, listener: TcpListener) -> None:
        """The engine lets go of ``listener``'s fd (it is ours again when this returns)."""
        self._avoiding.discard(listener)
        if listener.native is not None:
            lid, listener.native = listener.native, None
            self._native_relay().listener_remove(lid)
            # Set-ups it started may still report: forget it once they all have ended.
            with contextlib.suppress(RuntimeError):  # (a loop already closed: nothing to do)
                self.loop.call_later(SETUP_EVENTS_GRACE, self._by_native.pop, lid, None)

    def defer(self) -> None:
        """Listeners made from now on do not accept (the engine's or the loop's) until
        :meth:`update_entries` refreshes them or :meth:`undefer` is called: the first
        sync opens its 10,000 sockets first, starts the rules, and hands each to the
        engine with its endpoints in one go while ``nft -f`` runs (issue 16's start-up).
        Until then the kernel keeps their backlog, as before an entry comes."""
        self.deferring = True

    def undefer(self) -> None:
        """Every deferred listener not refreshed yet starts accepting; deferring ends."""
        self.deferring = False
        deferred, self._deferred = self._deferred, []
        for listener in deferred:
            if listener._deferred:
                self._start_accepting(listener)

    def _start_accepting(self, listener: TcpListener) -> None:
        listener._deferred = False
        if listener._closed:
            return
        if not self._attach(listener):
            listener._python_accepts()

    def _refresh(self, listener: TcpListener) -> None:
        if listener._deferred:
            self._start_accepting(listener)
            return
        want = self._wants_native(listener)
        if want and listener.native is None:
            self.loop.remove_reader(listener._fd)
            if not self._attach(listener):
                listener._python_accepts()
        elif not want and listener.native is not None:
            self._detach(listener)
            listener._python_accepts()
        elif listener.native is not None:
            self._push(listener)

    def _attach_many(self, listeners: list[TcpListener]) -> None:
        """:meth:`_attach` of deferred listeners that have entries (the first sync's
        10,000), with their endpoints, in one C call: the same per listener, without two
        calls into the engine each (issue 16's start-up)."""
        plans = [self._push_plan(listener) for listener in listeners]
        try:
            results = self._native_relay().listeners_add([plan[0] for plan in plans])
        except OSError as exc:  # (the relay closed: no listener is the engine's)
            for listener in listeners:
                log.warning("%s: the engine cannot accept on it (%s); Python does",
                            listener.name, exc.strerror or exc)
                listener._python_accepts()
            return
        for listener, (push, endpoints, tp_on), (lid, err) in zip(listeners, plans, results,
                                                                  strict=True):
            if lid < 0:
                log.warning("%s: the engine cannot accept on it (%s); Python does",
                            listener.name, os.strerror(-lid))
                listener._python_accepts()
                continue
            listener.native = lid
            self._by_native[lid] = listener
            if err < 0:
                log.error("%s: pushing endpoints to the engine: %s", listener.name,
                          OSError(-err, f"native listener endpoints: {os.strerror(-err)}"))
                continue
            self._pushed(listener, endpoints, push[3], tp_on)

    def _push(self, listener: TcpListener) -> None:
        """The endpoints (and their failure memory) new clients of ``listener`` may go to."""
        assert listener.native is not None
        push, endpoints, tp_on = self._push_plan(listener)
        _, has_service, family, items, here, transparent, group, timeout = push
        try:
            self._native_relay().listener_set(
                listener.native, has_service=bool(has_service), family=family,
                endpoints=items, here=here, transparent=transparent, affinity_group=group,
                affinity_timeout=timeout)
        except OSError as exc:
            log.error("%s: pushing endpoints to the engine: %s", listener.name, exc)
            return
        self._pushed(listener, endpoints, items, tp_on)

    def _push_plan(self, listener: TcpListener) -> tuple[ListenerPush, tuple[Endpoint, ...],
                                                         bool]:
        """What :meth:`_push` hands the engine for ``listener`` (its usable endpoints)."""
        entry = self._entries.get(listener.name)
        balancer = self.balancer
        endpoints: tuple[Endpoint, ...] = ()
        if entry is not None:
            endpoints = usable_endpoints(entry, external=listener.external,
                                         node_name=balancer.node_name, zone=balancer.zone,
                                         family=listener.family)
        if balancer.avoiding():
            items = [(e.ip, e.port, i, balancer.avoided_until(e.address))
                     for i, e in enumerate(endpoints)]
        else:  # (the usual case, and a start's: nothing avoided)
            items = [(e.ip, e.port, i, 0.0) for i, e in enumerate(endpoints)]
        tp = self.transparent
        transparent, here = 0, []
        tp_on = tp is not None and listener.family in tp.families
        if tp_on and tp is not None and entry is not None:
            self._sync_links()
            node = tp.node_name
            here = [bool(node) and e.node_name == node for e in endpoints]
            for e, on_node in zip(endpoints, here, strict=True):
                if on_node:  # (re-read soon when an interface is new)
                    tp.links_known(e.ip, then=self._sync_links)
            transparent = self._native_relay().transparent_bits(
                on=True, external=listener.external, external_local=entry.port.external_local)
        group, timeout = -1, 0.0
        if entry is not None and entry.port.affinity_timeout is not None:
            group, timeout = self._aff_group(listener.name), float(entry.port.affinity_timeout)
        return ((listener._fd, int(entry is not None), listener.family, items, here,
                 transparent, group, timeout), endpoints, tp_on)

    def _pushed(self, listener: TcpListener, endpoints: tuple[Endpoint, ...],
                items: Sequence[tuple[str, int, int, float]], tp_on: bool) -> None:
        """What the engine now has for ``listener``, as Python remembers it."""
        balancer = self.balancer
        listener.endpoints = endpoints
        listener.packed = tuple([(_pack_address(e.ip), e.port) for e in endpoints])
        listener.avoided = any(item[3] > 0 for item in items)
        listener.pushed_tp = tp_on
        listener.pushed_topology = (balancer.node_name, balancer.zone)
        if listener.avoided:
            self._avoiding.add(listener)
        else:
            self._avoiding.discard(listener)

    # ---- ClientIP affinity in the engine -------------------------------------------------
    def _aff_group(self, name: ServicePortName) -> int:
        """The engine's affinity group of ``name`` (made at its first push, with the pins
        handed over for it)."""
        group = self._aff_groups.get(name)
        if group is None:
            group = self._aff_groups[name] = self._aff_next
            self._aff_next += 1
            pending = self._aff_pending.pop(name, None)
            entry = self._entries.get(name)
            if pending and entry is not None and entry.port.affinity_timeout is not None:
                timeout = float(entry.port.affinity_timeout)
                now = self.clock()
                self._native_relay().affinity_import(
                    [(group, client, address, now - last, timeout)
                     for client, address, last in pending])
        return group

    def _forget_groups(self) -> None:
        """Free the engine's pins of service ports gone or no longer affine."""
        for name, group in list(self._aff_groups.items()):
            entry = self._entries.get(name)
            if entry is None or entry.port.affinity_timeout is None:
                del self._aff_groups[name]
                self._native_relay().affinity_forget(group)

    def prune_affinity(self) -> None:
        """At every sync: free the engine's expired pins, and handed-over pins that
        expired before their service port came."""
        if self._native:
            self._native_relay().affinity_sweep()
        now = self.clock()
        for name, pins in list(self._aff_pending.items()):
            entry = self._entries.get(name)
            timeout = entry.port.affinity_timeout if entry is not None else None
            if timeout is None or all(now - last > timeout for _, _, last in pins):
                del self._aff_pending[name]

    def time_wait_destroyed(self) -> int:
        """Transparent TIME_WAIT sockets the relays destroyed at close (ever)."""
        total = 0
        for relay in (self.relay, self.adopted_relay):
            count = getattr(relay, "time_wait_destroyed", None)
            if count is not None:
                total += count()
        return total

    def affinity_count(self) -> int:
        """The engine's pins (the balancer counts its own)."""
        return self._native_relay().affinity_count() if self._native else 0

    def export_affinity(self, now: float) -> list[Pin]:
        """The engine's pins as :meth:`uproxy.balance.Balancer.export_affinity` gives its own
        (with the handed-over ones no group took up yet)."""
        if not self._native:
            return []
        names = {group: name for name, group in self._aff_groups.items()}
        pins = [(names[group], client, address, idle)
                for group, client, address, idle, _ in self._native_relay().affinity_export()
                if group in names]
        pins += [(name, client, address, now - last)
                 for name, pending in self._aff_pending.items()
                 for client, address, last in pending]
        return pins

    def import_affinity(self, pins: Iterable[Pin], now: float) -> list[Pin]:
        """Pins the uproxy this one took over from exported: the TCP ones are the engine's
        (it takes each service port's up at its first push); returns the others (UDP's,
        and every one without the engine: the balancer's)."""
        rest = []
        for name, client, address, idle in pins:
            if self._native and name.protocol == "TCP":
                self._aff_pending.setdefault(name, []).append((client, address, now - idle))
            else:
                rest.append((name, client, address, idle))
        return rest

    def _sync_links(self) -> None:
        """The node's links, as transparent mode last read them, in the engine."""
        tp = self.transparent
        if tp is None:
            return
        links, families = tp.links, frozenset(tp.families)
        if self._links_pushed is not None and self._links_pushed[0] is links \
                and self._links_pushed[1] == families:
            return
        self._links_pushed = (links, families)
        raw = None
        if families:
            from uproxy.proxy.native_links import NativeLinks  # (the native path only)

            raw = NativeLinks(links, families).detach()
        self._native_relay().set_links(raw)

    def _current_transparent(self) -> frozenset[int]:
        tp = self.transparent
        return frozenset(tp.families) if tp is not None else frozenset()

    def _on_setup_events(self, events: list[SetupEvent]) -> None:
        """What the engine did (in its order): the table, the metrics, the balancer.

        Metrics are counted per batch and service (:meth:`_flush_metrics`, at the end of
        the engine's batch). A connection that opened and already closed in this batch
        gets no table entry unless a subscriber must hear of every connection
        (``ConnTable.sees_brief``; the status stream need not): its tallies come out as
        open, established and close would leave them."""
        conns, balancer = self.conns, self.balancer
        watched = conns.sees_brief()
        # (engine listener id, packed endpoint) -> [name, address, count, bytes up, down]
        short: dict[tuple[int, tuple[bytes, int] | None], list[Any]] = {}
        closed = False
        for ev in events:
            listener = self._by_native.get(ev.listener)
            if listener is None:
                continue
            kind = ev.kind
            if listener._fd_trouble_since is not None and kind in ("opened", "refused"):
                listener._fd_recovered()  # the engine accepted again
            if kind == "opened":
                endpoint = _endpoint_of(listener, ev)
                balancer.connect_succeeded(endpoint)
                m = self._batch_metrics(listener)
                m.opened_pending += 1
                self._setup_pending += 1
                ended = ev.ended
                if ended is None:
                    self._native_opened(listener, ev, endpoint, m)
                    continue
                up, down, error = ended
                m.closed_pending(up, down)
                closed = True
                if watched:
                    client = ev.client
                    assert client is not None
                    conn = conns.open(protocol="TCP", service=listener.name, client=client,
                                      scope=listener.scope)
                    conns.established(conn, endpoint.address, None)
                    conns.close(conn, bytes_up=up, bytes_down=down, error=error)
                    continue
                key = (ev.listener, ev.endpoint_raw)
                sums = short.get(key)
                if sums is None:
                    short[key] = [listener.name, endpoint.address, 1, up, down]
                else:
                    sums[2] += 1
                    sums[3] += up
                    sums[4] += down
            elif kind == "connect_failed":
                endpoint = _endpoint_of(listener, ev)
                log.debug("connect to %s failed: %s", endpoint, ev.error)
                self.metrics.endpoint_failures.labels(str(listener.name), str(endpoint)).inc()
                conns.connect_failed(listener.name, endpoint.address)
                balancer.connect_failed(endpoint, self.clock())
            elif kind == "refused":
                self._native_refused(listener, ev)
            elif kind == "no_fds":
                listener.fds_trouble(ev.error or "out of file descriptors")
            elif kind == "no_link" and self.transparent is not None:
                ep = ev.endpoint
                if ep:  # as source_for does: read the links again soon, then hand them over
                    self.transparent.links_known(ep[0], then=self._sync_links)
        for name, address, count, up, down in short.values():
            conns.opened_and_closed(name, address, count, bytes_up=up, bytes_down=down)
        if closed:
            self.closed_one()

    def _batch_metrics(self, listener: TcpListener) -> _ServiceMetrics:
        """``listener``'s service metrics, marked to be flushed at the batch's end."""
        m = listener.metrics
        if m is None:
            m = listener.metrics = self._service_metrics(listener.name)
        if not m.dirty:
            m.dirty = True
            self._dirty.append(m)
        return m

    def _on_short(self, groups: list[tuple[SetupEvent, int, int, int]]) -> None:
        """Engine-made connections that opened and closed unseen (held, unwatched), per
        listener and endpoint: the balancer, metrics and tallies as one by one."""
        conns, balancer = self.conns, self.balancer
        for ev, count, up, down in groups:
            listener = self._by_native.get(ev.listener)
            if listener is None:
                continue
            if listener._fd_trouble_since is not None:
                listener._fd_recovered()  # the engine accepted again
            endpoint = _endpoint_of(listener, ev)
            balancer.connect_succeeded(endpoint)
            m = self._batch_metrics(listener)
            m.opened_pending += count
            m.closed_count += count
            m.up_bytes += up
            m.down_bytes += down
            self._setup_pending += count
            conns.opened_and_closed(listener.name, endpoint.address, count, bytes_up=up,
                                    bytes_down=down)
        if groups:
            self.closed_one()

    def closed_one(self) -> None:
        """Connections closed: transparent mode sweeps the TIME_WAIT sockets its backend
        sockets left (see :mod:`uproxy.proxy.sockdiag`) -- only when the relays could not
        destroy one at close by its exact address (they count those): a sweep walks every
        TCP socket of the node, the relays' exact destroys one each (issue 16: the short
        connections of a client that closes first cost no sweep)."""
        tp = self.transparent
        if tp is None or not tp.families:
            return
        total = 0
        for relay in (self.relay, self.adopted_relay):
            count = getattr(relay, "time_wait_left", None)
            if relay is not None and count is None:
                total = -1  # a relay that does not count: sweep at every close
                break
            if count is not None:
                total += count()
        if total < 0 or total != self._tw_left:
            self._tw_left = total
            tp.note_closed()

    def _flush_metrics(self) -> None:
        """The counts of the engine's batch into the metrics: one add per service and figure."""
        if self._setup_pending:
            self._setup_metric.inc(self._setup_pending)
            self._setup_pending = 0
        dirty, self._dirty = self._dirty, []
        for m in dirty:
            m.flush()

    def _native_opened(self, listener: TcpListener, ev: SetupEvent, endpoint: Endpoint,
                       m: _ServiceMetrics) -> None:
        handle, client = ev.handle, ev.client
        assert handle is not None and client is not None
        conn = self.conns.open(protocol="TCP", service=listener.name, client=client,
                               scope=listener.scope)

        # (every idle connection holds this closure: it captures m, self and conn only)
        def done(result: RelayResult) -> None:
            if not m.dirty:
                m.dirty = True
                self._dirty.append(m)
            m.closed_pending(result.bytes_up, result.bytes_down)
            self.closed_one()
            if not self._native_relay().in_batch:  # (a takeover's hand-over, a resumed one)
                self._flush_metrics()
            self.conns.close(conn, bytes_up=result.bytes_up, bytes_down=result.bytes_down,
                             error=result.error)

        handle._on_done = done
        self.conns.established(conn, endpoint.address, handle)

    def _native_refused(self, listener: TcpListener, ev: SetupEvent) -> None:
        name = str(listener.name)
        if ev.reason in ("no_service", NO_ENDPOINTS):
            self.metrics.connections_total.labels(name, "TCP", ev.reason).inc()
            return
        assert ev.client is not None
        conn = self.conns.open(protocol="TCP", service=listener.name, client=ev.client,
                               scope=listener.scope)
        if ev.reason == CANCELLED:
            self.conns.close(conn, error="cancelled")
            return
        if ev.reason == NO_SOCKET:
            log.warning("%s: cannot open a socket to %s: %s", name,
                        _endpoint_of(listener, ev), ev.error)
        log.info("%s: no endpoint accepted the connection from %s (%d attempts)", name,
                 ev.client[0], ev.attempts)
        self.conns.close(conn, error="all endpoints failed")
        self.metrics.connections_total.labels(name, "TCP", "connect_failed").inc()

    def handle(self, client: socket.socket, addr: tuple[str, int], listener: TcpListener) -> None:
        entry = self.entries.get(listener.name)
        if entry is None:
            reset_close(client)
            self.metrics.connections_total.labels(str(listener.name), "TCP", "no_service").inc()
            return
        endpoint = self.balancer.choose(entry, addr[0], self.clock(), external=listener.external,
                                        family=listener.family)
        _Connect(self, client, addr, entry, listener).feed(Start(endpoint))

    def _service_metrics(self, name: ServicePortName) -> _ServiceMetrics:
        m = self._metrics.get(name)
        if m is None:
            m = self._metrics[name] = _ServiceMetrics(self.metrics, str(name), self.relay.name)
        return m

    def _relay(self, client: socket.socket, backend: socket.socket, conn: Conn,
               endpoint: Endpoint) -> None:
        # (the client inherited TCP_NODELAY and the congestion control from its listener)
        with contextlib.suppress(OSError):
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.congestion:
                backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.congestion)
        m = self._service_metrics(conn.service)
        m.opened()
        self._py_setup_metric.inc()

        def done(result: RelayResult) -> None:
            m.closed(result)
            self.closed_one()
            self.conns.close(conn, bytes_up=result.bytes_up, bytes_down=result.bytes_down,
                             error=result.error)

        handle = self.relay.start(client, backend, done)
        if conn.state != "closed":
            self.conns.established(conn, endpoint.address, handle)

    def rules_applied(self) -> None:
        """After every sync: follow transparent mode's families (it starts after the first
        listeners open) and push the balancer's failure memory to the engine."""
        if not self._native:
            return
        self._sync_links()
        topology = (self.balancer.node_name, self.balancer.zone)
        if topology != self._topology:  # the Node's zone changed: usable lists may have too
            self._topology = topology
            for listeners in list(self._listeners.values()):
                for listener in list(listeners):
                    if listener.pushed_topology != topology:
                        self._refresh(listener)
        families = self._current_transparent()
        if families != self._transparent_families:
            self._transparent_families = families
            # (only the listeners pushed before transparent mode started, or of a family
            # it changed for: the first sync's push waits for its start, so none then)
            again = 0
            for listeners in list(self._listeners.values()):
                for listener in list(listeners):
                    if listener.native is None or (listener.family in families) \
                            != listener.pushed_tp:
                        self._refresh(listener)
                        again += 1
            if again:
                log.debug("transparent mode changed (families %s): %d listeners pushed again",
                          sorted(families), again)
            return
        balancer = self.balancer
        if not self._avoiding and not balancer.avoiding():
            return  # (the usual case: no walk over every listener at every sync)
        for listeners in self._listeners.values():
            for listener in listeners:
                if listener.native is not None and (listener.avoided or any(
                        balancer.avoided_until(e.address) for e in listener.endpoints)):
                    self._push(listener)

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for open connections to finish, then abort the rest."""
        deadline = self.loop.time() + grace
        relays = [r for r in (self.relay, self.adopted_relay) if r is not None]
        while (any(r.active() for r in relays) or self._connecting) \
                and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for attempt in list(self._connecting):
            attempt.abort()
        for relay in relays:
            await relay.close()


def _endpoint_of(listener: TcpListener, ev: SetupEvent) -> Endpoint:
    """The pushed endpoint an event names (by index, checked by its packed address: no
    string is made unless the endpoints changed since the engine chose)."""
    index, packed = ev.index, listener.packed
    if 0 <= index < len(packed) and packed[index] == ev.endpoint_raw:
        return listener.endpoints[index]
    address = ev.endpoint
    assert address is not None
    for e in listener.endpoints:
        if e.address == address:
            return e
    return Endpoint(address[0], address[1])


def client_spoke(client: socket.socket) -> bool:
    """Whether ``client`` has bytes waiting (``FIONREAD``): then the backend socket's
    handshake ACK may wait to leave with them (``TCP_DEFER_ACCEPT`` before its connect)."""
    try:
        waiting = fcntl.ioctl(client.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return int.from_bytes(waiting, sys.byteorder, signed=True) > 0


def _pack_address(ip: str) -> bytes:
    """``ip`` as the engine reports it in an event (16 bytes, an IPv4 address zero-padded)."""
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip)
    return socket.inet_pton(socket.AF_INET, ip) + bytes(12)


class _ServiceMetrics:
    """The labelled metric children of one service port, bound once (labels() is not free)."""

    __slots__ = ("active", "closed_count", "dirty", "down", "down_bytes", "ok", "opened_pending",
                 "path", "up", "up_bytes")

    def __init__(self, metrics: Metrics, service: str, path: str) -> None:
        self.active = metrics.connections_active.labels(service, "TCP")
        self.ok = metrics.connections_total.labels(service, "TCP", "ok")
        self.up = metrics.bytes_total.labels(service, "up")
        self.down = metrics.bytes_total.labels(service, "down")
        self.path = metrics.relay_path.labels(path)
        # The engine's batch adds here first (flush: once per batch, not per connection).
        self.dirty = False
        self.opened_pending = self.closed_count = self.up_bytes = self.down_bytes = 0

    def opened(self, count: int = 1) -> None:
        self.active.inc(count)
        self.ok.inc(count)
        self.path.inc(count)

    def closed(self, result: RelayResult) -> None:
        self.active.dec()
        self.up.inc(result.bytes_up)
        self.down.inc(result.bytes_down)

    def closed_pending(self, bytes_up: int, bytes_down: int) -> None:
        self.closed_count += 1
        self.up_bytes += bytes_up
        self.down_bytes += bytes_down

    def flush(self) -> None:
        opened, closed = self.opened_pending, self.closed_count
        if opened:
            self.ok.inc(opened)
            self.path.inc(opened)
        if opened != closed:  # (a connection opened and closed in the batch: no change)
            self.active.inc(opened - closed)
        if closed:
            self.up.inc(self.up_bytes)
            self.down.inc(self.down_bytes)
        self.dirty = False
        self.opened_pending = self.closed_count = self.up_bytes = self.down_bytes = 0


class _Connect:
    """Drives one :class:`~uproxy.connect.ConnectionSetup`: the sockets, timer and callbacks.

    The machine decides; this does what its actions say (a non-blocking
    ``connect`` plus a writer callback and a timer per attempt) and feeds it
    what happened.
    """

    __slots__ = ("addr", "client", "client_ip", "conn", "entry", "listener", "now", "proxy",
                 "setup", "sock", "timer")

    def __init__(self, proxy: TcpProxy, client: socket.socket, addr: tuple[str, int],
                 entry: Entry, listener: TcpListener) -> None:
        self.proxy = proxy
        self.client = client
        self.addr = addr[:2]
        self.client_ip = addr[0]
        self.conn: Conn | None = None  # opened with the first attempt
        self.entry = entry
        self.listener = listener
        self.setup = ConnectionSetup()
        self.sock: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.now = 0.0  # the clock reading of the last failure, for the choice that follows
        proxy._connecting.add(self)

    def feed(self, event: Event) -> None:
        for action in self.setup.handle(event):
            if isinstance(action, Connect):
                self._connect(action.endpoint, action.timeout)
            elif isinstance(action, MarkSucceeded):
                self.proxy.balancer.connect_succeeded(action.endpoint)
            elif isinstance(action, Relay):
                self.proxy._connecting.discard(self)
                sock, conn = self.sock, self.conn
                assert sock is not None and conn is not None
                self.proxy._relay(self.client, sock, conn, action.endpoint)
            elif isinstance(action, MarkFailed):
                self._mark_failed(action.endpoint, action.reason)
            elif isinstance(action, Choose):
                self.feed(Chosen(self.proxy.balancer.choose(
                    self.entry, self.client_ip, self.now, external=self.listener.external,
                    exclude=action.exclude, family=self.listener.family)))
            elif isinstance(action, WaitForFds):
                # Out of fds: pause accepting and let this client wait a little.
                self.listener.fds_exhausted(action.reason)
                self.timer = self.proxy.loop.call_later(action.delay, self._wait_over)
            else:
                self._reset(action)

    def _connect(self, endpoint: Endpoint, timeout: float) -> None:
        proxy = self.proxy
        if self.conn is None:
            self.conn = proxy.conns.open(protocol="TCP", service=self.listener.name,
                                         client=self.addr,
                                         scope=self.listener.scope)
        family = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
        tp = proxy.transparent
        source = None if tp is None else tp.source_for(
            self.client_ip, endpoint, external=self.listener.external,
            external_local=self.entry.port.external_local)
        try:
            sock = backend_socket(family, socket.SOCK_STREAM, source)
        except OSError as exc:
            self.feed(NoSocket(proxy.loop.time(), exc.errno in FD_ERRNOS, exc.strerror or str(exc)))
            return
        self.sock = sock
        sock.setblocking(False)
        if client_spoke(self.client):  # as the engine does (native/relay.c setup_connect)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        err = sock.connect_ex(endpoint.address)
        if err == 0:
            self.feed(CONNECTED)
        elif err == errno.EINPROGRESS:
            proxy.loop.add_writer(sock.fileno(), self._writable)
            self.timer = proxy.loop.call_later(timeout, self._timed_out)
        else:
            self._close_sock()
            self.feed(ConnectFailed(os.strerror(err)))

    def _writable(self) -> None:
        assert self.sock is not None
        self.proxy.loop.remove_writer(self.sock.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self.feed(CONNECTED)
        else:
            self._close_sock()
            self.feed(ConnectFailed(os.strerror(err)))

    def _timed_out(self) -> None:
        self.timer = None
        if self.sock is not None:
            self.proxy.loop.remove_writer(self.sock.fileno())
        self._close_sock()
        self.feed(TIMED_OUT)

    def _wait_over(self) -> None:
        self.timer = None
        self.feed(WAIT_OVER)

    def _close_sock(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _mark_failed(self, endpoint: Endpoint, reason: str) -> None:
        proxy, conn = self.proxy, self.conn
        assert conn is not None
        log.debug("connect to %s failed: %s", endpoint, reason)
        proxy.metrics.endpoint_failures.labels(str(conn.service), str(endpoint)).inc()
        proxy.conns.connect_failed(conn.service, endpoint.address)
        self.now = proxy.clock()
        proxy.balancer.connect_failed(endpoint, self.now, self.entry, self.client_ip)
        # The latest entry: endpoints may have changed while we waited.
        self.entry = proxy.entries.get(conn.service, self.entry)

    def _reset(self, action: Reset) -> None:
        proxy, conn, name = self.proxy, self.conn, self.listener.name
        proxy._connecting.discard(self)
        reset_close(self.client)
        if action.reason == NO_ENDPOINTS:
            # No usable endpoint: refuse at once (RST), as kube-proxy's REJECT does.
            proxy.metrics.connections_total.labels(str(name), "TCP", "no_endpoints").inc()
            return
        assert conn is not None
        if action.reason == CANCELLED:
            proxy.conns.close(conn, error="cancelled")
            return
        if action.reason == NO_SOCKET:
            log.warning("%s: cannot open a socket to %s: %s", name, self.setup.endpoint,
                        action.detail)
        log.info("%s: no endpoint accepted the connection from %s (tried %s)", conn.service,
                 self.client_ip, ", ".join(map(str, self.setup.tried)) or "none")
        proxy.conns.close(conn, error="all endpoints failed")
        proxy.metrics.connections_total.labels(str(conn.service), "TCP", "connect_failed").inc()

    def abort(self) -> None:
        """Shutdown: stop connecting, reset the client."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proxy.loop.remove_writer(self.sock.fileno())
        self._close_sock()
        self.feed(ABORT)
