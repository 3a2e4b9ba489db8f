"""TCP: accept on proxy and NodePort sockets, choose an endpoint, connect, hand to the relay.

Accepting uses ``add_reader`` on our own listening sockets (never on an fd a
transport owns) and takes a batch per wake-up. ``EMFILE``/``ENFILE`` pause
accepting for a moment instead of spinning, logged once per episode.
Connecting follows :mod:`uproxy.connect` (up to four endpoints with growing
timeouts, avoiding ones that just failed; a RST at once when nothing works):
that machine decides, :class:`_Connect` here does the I/O with a non-blocking
``connect`` and loop callbacks (no task, coroutine or ``wait_for`` per
connection: they cost more than the rest together).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable

from uproxy.balance import Balancer
from uproxy.connect import (
    ABORT,
    CANCELLED,
    CONNECTED,
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

log = logging.getLogger("uproxy.tcp")

ACCEPT_BATCH = 64
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
        self.family = 6 if sock.family == socket.AF_INET6 else 4  # chooses its own endpoints
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self._fd = sock.fileno()
        self._fd_trouble_since: float | None = None  # first EMFILE of the current episode
        self._fd_trouble_last = 0.0
        self._fd_pauses = 0
        self._paused = False
        self._closed = False
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

    def fds_exhausted(self, reason: str) -> None:
        """Out of fds: stop accepting for a moment (the kernel keeps the backlog)."""
        now = time.monotonic()
        if self._fd_trouble_since is None:
            log.warning("%s: out of file descriptors (%s); pausing accepts until some close",
                        self.name, reason)
            self._fd_trouble_since = now
        self._fd_trouble_last = now
        if self._paused or self._closed:
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
        if self._closed:
            return
        self.proxy.loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.proxy.loop.remove_reader(self._fd)
        self.sock.close()

    # Takeover: stop accepting (the kernel keeps the backlog), then go on or let go.
    def pause(self) -> None:
        self.proxy.loop.remove_reader(self._fd)

    def resume(self) -> None:
        if not self._closed and not self._paused:
            self.proxy.loop.add_reader(self._fd, self._accept)

    def release(self) -> None:
        """The socket lives on in the new process: close our fd only."""
        self.close()


class TcpProxy:
    """Owns the TCP side: which entry each listener serves and every live connection."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, relay: RelayEngine, balancer: Balancer,
                 conns: ConnTable, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic,
                 transparent: Transparent | None = None) -> None:
        self.loop = loop
        self.transparent = transparent  # None or off: backends see the node's address
        self.relay = relay
        self.balancer = balancer
        self.conns = conns
        self.metrics = metrics
        self.clock = clock
        self.entries: dict[ServicePortName, Entry] = {}
        self._connecting: set[_Connect] = set()
        self._metrics: dict[ServicePortName, _ServiceMetrics] = {}
        self.live: dict[int, tuple[Conn, RelayHandle]] = {}  # conn id -> relayed connection
        self.adopted_relay: RelayEngine | None = None  # runs what a takeover brought

    def listen(self, sock: socket.socket, name: ServicePortName, scope: str) -> TcpListener:
        return TcpListener(self, sock, name, scope)

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
        for sock in (client, backend):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        m = self._service_metrics(conn.service)
        m.opened()

        def done(result: RelayResult) -> None:
            m.closed(result)
            self.live.pop(conn.id, None)
            self.conns.close(conn, bytes_up=result.bytes_up, bytes_down=result.bytes_down,
                             error=result.error)

        handle = self.relay.start(client, backend, done)
        if conn.state != "closed":
            self.conns.established(conn, endpoint.address, handle)
            self.live[conn.id] = (conn, handle)

    def rules_applied(self) -> None:
        """Nothing to do for TCP once rules are in (UDP cleans conntrack here)."""

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


class _ServiceMetrics:
    """The labelled metric children of one service port, bound once (labels() is not free)."""

    __slots__ = ("active", "down", "ok", "path", "up")

    def __init__(self, metrics: Metrics, service: str, path: str) -> None:
        self.active = metrics.connections_active.labels(service, "TCP")
        self.ok = metrics.connections_total.labels(service, "TCP", "ok")
        self.up = metrics.bytes_total.labels(service, "up")
        self.down = metrics.bytes_total.labels(service, "down")
        self.path = metrics.relay_path.labels(path)

    def opened(self) -> None:
        self.active.inc()
        self.ok.inc()
        self.path.inc()

    def closed(self, result: RelayResult) -> None:
        self.active.dec()
        self.up.inc(result.bytes_up)
        self.down.inc(result.bytes_down)


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
