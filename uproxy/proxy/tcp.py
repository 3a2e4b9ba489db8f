"""TCP: accept on proxy and NodePort sockets, choose an endpoint, connect, hand to the relay.

Accepting uses ``add_reader`` on our own listening sockets (never on an fd a
transport owns) and takes a batch per wake-up. ``EMFILE``/``ENFILE`` pause
accepting for a moment instead of spinning, logged once per episode.
Connecting tries up to four endpoints with growing timeouts (250 ms, 500 ms,
1 s, 2 s — kube-proxy's userspace mode), avoiding ones that just failed; when
there is no usable endpoint, or every attempt fails, the client gets a RST at
once, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
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
        self._tasks: set[asyncio.Task[None]] = set()

    def listen(self, sock: socket.socket, name: ServicePortName, scope: str) -> TcpListener:
        return TcpListener(self, sock, name, scope)

    def handle(self, client: socket.socket, addr: tuple[str, int], listener: TcpListener) -> None:
        entry = self.entries.get(listener.name)
        service = str(listener.name)
        if entry is None:
            reset_close(client)
            self.metrics.connections_total.labels(service, "TCP", "no_service").inc()
            return
        now = self.clock()
        endpoint = self.balancer.choose(entry, addr[0], now, external=listener.external)
        if endpoint is None:
            # No usable endpoint: refuse at once (RST), as kube-proxy's REJECT does.
            reset_close(client)
            self.metrics.connections_total.labels(service, "TCP", "no_endpoints").inc()
            return
        conn = self.conns.open(protocol="TCP", service=listener.name, client=addr[:2],
                               scope=listener.scope)
        task = self.loop.create_task(self._connect(client, conn, entry, endpoint, listener))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, client: socket.socket, conn: Conn, entry: Entry,
                       first: Endpoint, listener: TcpListener) -> None:
        service = str(conn.service)
        tried: list[Endpoint] = []
        endpoint: Endpoint | None = first
        backend: socket.socket | None = None
        try:
            for timeout in CONNECT_TIMEOUTS:
                if endpoint is None:
                    break
                tried.append(endpoint)
                backend = await self._try_connect(endpoint, timeout, listener)
                if backend is not None:
                    self.balancer.connect_succeeded(endpoint)
                    break
                self.metrics.endpoint_failures.labels(service, str(endpoint)).inc()
                now = self.clock()
                self.balancer.connect_failed(endpoint, now, entry, conn.client[0])
                # The latest entry: endpoints may have changed while we waited.
                entry = self.entries.get(conn.service, entry)
                endpoint = self.balancer.choose(entry, conn.client[0], now,
                                                external=listener.external, exclude=tried)
        except BaseException:
            reset_close(client)
            if backend is not None:
                backend.close()
            self.conns.close(conn, error="cancelled")
            raise
        if backend is None or endpoint is None:
            log.info("%s: no endpoint accepted the connection from %s (tried %s)", service,
                     conn.client[0], ", ".join(map(str, tried)))
            reset_close(client)
            self.conns.close(conn, error="all endpoints failed")
            self.metrics.connections_total.labels(service, "TCP", "connect_failed").inc()
            return
        for sock in (client, backend):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        active = self.metrics.connections_active.labels(service, "TCP")
        active.inc()
        self.metrics.connections_total.labels(service, "TCP", "ok").inc()
        self.metrics.relay_path.labels(self.relay.name).inc()

        def done(result: RelayResult) -> None:
            active.dec()
            self.metrics.bytes_total.labels(service, "up").inc(result.bytes_up)
            self.metrics.bytes_total.labels(service, "down").inc(result.bytes_down)
            self.conns.close(conn, bytes_up=result.bytes_up, bytes_down=result.bytes_down,
                             error=result.error)

        handle = self.relay.start(client, backend, done)
        if conn.state != "closed":
            self.conns.established(conn, endpoint.address, handle)

    async def _backend_socket(self, family: int, listener: TcpListener) -> socket.socket:
        """A new socket; when fds run out, pause accepting and wait for some to close."""
        deadline = self.loop.time() + FD_WAIT
        while True:
            try:
                return socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                if exc.errno not in FD_ERRNOS or self.loop.time() > deadline:
                    raise
                listener.fds_exhausted(exc)
                await asyncio.sleep(EMFILE_PAUSE / 4)

    async def _try_connect(self, endpoint: Endpoint, timeout: float,
                           listener: TcpListener) -> socket.socket | None:
        family = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
        try:
            sock = await self._backend_socket(family, listener)
        except OSError as exc:
            log.warning("%s: cannot open a socket to %s: %s", listener.name, endpoint,
                        exc.strerror)
            return None
        sock.setblocking(False)
        try:
            await asyncio.wait_for(self.loop.sock_connect(sock, endpoint.address), timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror
            log.debug("connect to %s failed: %s", endpoint, reason)
            return None
        except BaseException:
            sock.close()
            raise
        return sock

    def rules_applied(self) -> None:
        """Nothing to do for TCP once rules are in (UDP cleans conntrack here)."""

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for open connections to finish, then abort the rest."""
        deadline = self.loop.time() + grace
        while (self.relay.active() or self._tasks) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        await self.relay.close()
