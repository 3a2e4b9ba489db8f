"""TCP: accept on proxy and NodePort sockets, choose an endpoint, connect, hand to the relay.

Accepting uses ``add_reader`` on our own listening sockets (never on an fd a
transport owns) and takes a batch per wake-up. ``EMFILE``/``ENFILE`` pause
accepting for a moment instead of spinning, logged once per episode.
Connecting tries up to four endpoints with growing timeouts (250 ms, 500 ms,
1 s, 2 s — kube-proxy's userspace mode), avoiding ones that just failed, with
a non-blocking ``connect`` and loop callbacks (no task, coroutine or
``wait_for`` per connection: they cost more than the rest together); when
there is no usable endpoint, or every attempt fails, the client gets a RST at
once, never a hang.
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
from uproxy.connections import Conn, ConnTable
from uproxy.metrics import Metrics
from uproxy.model import Endpoint, ServicePortName
from uproxy.proxy.relay import Relay, RelayResult, reset_close
from uproxy.state import Entry

log = logging.getLogger("uproxy.tcp")

CONNECT_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
ACCEPT_BATCH = 64
EMFILE_PAUSE = 0.2
EMFILE_QUIET = 2.0  # seconds without EMFILE that end an episode
FD_WAIT = 2.0  # how long an accepted client may wait for a backend socket
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
                    self.fds_exhausted(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.error("%s: accept failed: %s", self.name, exc)
                return
            if self._fd_trouble_since is not None:
                self._fd_recovered()
            self.proxy.handle(client, addr, self)

    def fds_exhausted(self, exc: OSError) -> None:
        """Out of fds: stop accepting for a moment (the kernel keeps the backlog)."""
        now = time.monotonic()
        if self._fd_trouble_since is None:
            log.warning("%s: out of file descriptors (%s); pausing accepts until some close",
                        self.name, exc.strerror)
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


class TcpProxy:
    """Owns the TCP side: which entry each listener serves and every live connection."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, relay: Relay, balancer: Balancer,
                 conns: ConnTable, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        self.relay = relay
        self.balancer = balancer
        self.conns = conns
        self.metrics = metrics
        self.clock = clock
        self.entries: dict[ServicePortName, Entry] = {}
        self._connecting: set[_Connect] = set()
        self._metrics: dict[ServicePortName, _ServiceMetrics] = {}

    def listen(self, sock: socket.socket, name: ServicePortName, scope: str) -> TcpListener:
        return TcpListener(self, sock, name, scope)

    def handle(self, client: socket.socket, addr: tuple[str, int], listener: TcpListener) -> None:
        entry = self.entries.get(listener.name)
        if entry is None:
            reset_close(client)
            self.metrics.connections_total.labels(str(listener.name), "TCP", "no_service").inc()
            return
        endpoint = self.balancer.choose(entry, addr[0], self.clock(), external=listener.external)
        if endpoint is None:
            # No usable endpoint: refuse at once (RST), as kube-proxy's REJECT does.
            reset_close(client)
            self.metrics.connections_total.labels(str(listener.name), "TCP", "no_endpoints").inc()
            return
        conn = self.conns.open(protocol="TCP", service=listener.name, client=addr[:2],
                               scope=listener.scope)
        _Connect(self, client, conn, entry, listener).attempt(endpoint)

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
            self.conns.close(conn, bytes_up=result.bytes_up, bytes_down=result.bytes_down,
                             error=result.error)

        handle = self.relay.start(client, backend, done)
        if conn.state != "closed":
            self.conns.established(conn, endpoint.address, handle)

    def rules_applied(self) -> None:
        """Nothing to do for TCP once rules are in (UDP cleans conntrack here)."""

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for open connections to finish, then abort the rest."""
        deadline = self.loop.time() + grace
        while (self.relay.active() or self._connecting) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for attempt in list(self._connecting):
            attempt.abort()
        await self.relay.close()


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
    """Connecting one accepted client to an endpoint: callbacks, no task per connection.

    A non-blocking ``connect`` plus a writer callback and a timer per attempt;
    up to len(CONNECT_TIMEOUTS) attempts, each to another endpoint when there is one.
    """

    __slots__ = ("attempts", "client", "conn", "endpoint", "entry", "fd_deadline", "listener",
                 "proxy", "sock", "timer", "tried")

    def __init__(self, proxy: TcpProxy, client: socket.socket, conn: Conn, entry: Entry,
                 listener: TcpListener) -> None:
        self.proxy = proxy
        self.client = client
        self.conn = conn
        self.entry = entry
        self.listener = listener
        self.tried: list[Endpoint] = []
        self.attempts = 0
        self.sock: socket.socket | None = None
        self.endpoint: Endpoint | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.fd_deadline = 0.0
        proxy._connecting.add(self)

    def attempt(self, endpoint: Endpoint) -> None:
        loop = self.proxy.loop
        family = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno in FD_ERRNOS:
                # Out of fds: pause accepting and let this client wait a little.
                if not self.fd_deadline:
                    self.fd_deadline = loop.time() + FD_WAIT
                if loop.time() < self.fd_deadline:
                    self.listener.fds_exhausted(exc)
                    self.timer = loop.call_later(EMFILE_PAUSE / 4, self.attempt, endpoint)
                    return
            log.warning("%s: cannot open a socket to %s: %s", self.listener.name, endpoint,
                        exc.strerror)
            self._give_up()
            return
        self.fd_deadline = 0.0
        self.sock = sock
        self.endpoint = endpoint
        self.tried.append(endpoint)
        timeout = CONNECT_TIMEOUTS[self.attempts]
        self.attempts += 1
        sock.setblocking(False)
        err = sock.connect_ex(endpoint.address)
        if err == 0:
            self._connected()
        elif err == errno.EINPROGRESS:
            loop.add_writer(sock.fileno(), self._writable)
            self.timer = loop.call_later(timeout, self._timed_out)
        else:
            self._failed(os.strerror(err))

    def _writable(self) -> None:
        assert self.sock is not None
        self.proxy.loop.remove_writer(self.sock.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._connected()
        else:
            self._failed(os.strerror(err))

    def _timed_out(self) -> None:
        self.timer = None
        if self.sock is not None:
            self.proxy.loop.remove_writer(self.sock.fileno())
        self._failed("timed out")

    def _connected(self) -> None:
        proxy, sock, endpoint = self.proxy, self.sock, self.endpoint
        assert sock is not None and endpoint is not None
        proxy._connecting.discard(self)
        proxy.balancer.connect_succeeded(endpoint)
        proxy._relay(self.client, sock, self.conn, endpoint)

    def _failed(self, reason: str) -> None:
        proxy, endpoint = self.proxy, self.endpoint
        assert endpoint is not None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        log.debug("connect to %s failed: %s", endpoint, reason)
        proxy.metrics.endpoint_failures.labels(str(self.conn.service), str(endpoint)).inc()
        now = proxy.clock()
        client_ip = self.conn.client[0]
        proxy.balancer.connect_failed(endpoint, now, self.entry, client_ip)
        # The latest entry: endpoints may have changed while we waited.
        self.entry = proxy.entries.get(self.conn.service, self.entry)
        nxt = None
        if self.attempts < len(CONNECT_TIMEOUTS):
            nxt = proxy.balancer.choose(self.entry, client_ip, now,
                                        external=self.listener.external, exclude=self.tried)
        if nxt is None:
            self._give_up()
        else:
            self.attempt(nxt)

    def _give_up(self) -> None:
        proxy = self.proxy
        proxy._connecting.discard(self)
        log.info("%s: no endpoint accepted the connection from %s (tried %s)", self.conn.service,
                 self.conn.client[0], ", ".join(map(str, self.tried)) or "none")
        reset_close(self.client)
        proxy.conns.close(self.conn, error="all endpoints failed")
        proxy.metrics.connections_total.labels(str(self.conn.service), "TCP",
                                               "connect_failed").inc()

    def abort(self) -> None:
        """Shutdown: stop connecting, reset the client."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proxy.loop.remove_writer(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.proxy._connecting.discard(self)
        reset_close(self.client)
        self.proxy.conns.close(self.conn, error="cancelled")
