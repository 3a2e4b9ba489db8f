"""Health-check node ports: kube-proxy's per-Service health server (``service_health.go``).

A ``type: LoadBalancer`` Service with ``externalTrafficPolicy: Local`` and a
``spec.healthCheckNodePort`` gets an HTTP server on that port, answering any path and any
method with :func:`uproxy.status.health.service_health`: 200 while this node has a ready
local endpoint of the Service and the proxy is healthy, else 503, so that the cloud load
balancer sends traffic only to nodes that can serve it locally.

:meth:`HealthCheckPorts.sync` is called after every successful sync with the wanted
``{service: port}`` and the addresses to listen on: servers whose Service is gone or whose
port changed are closed, new ones opened, unchanged ones left alone. A port that cannot be
opened is logged once and tried again at the next sync (it is not recorded), as kube-proxy
does.

The listening sockets are uproxy's own (bound here, served through ``web.SockSite``), so
that a takeover (``uproxy.proxy.handover``) can hand them to the new process with the rest:
:meth:`HealthCheckPorts.sockets` lists them, and the new process puts what came over in
:attr:`HealthCheckPorts.adopted`, which its first sync serves instead of binding again (a
load balancer's probe never finds the port closed during an upgrade).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence

from aiohttp import web

from uproxy.status.health import service_health

log = logging.getLogger("uproxy")

Key = tuple[str, str]  # (namespace, name)


class HealthCheckPorts:
    """The open health-check node ports, one aiohttp runner per Service."""

    def __init__(self, *, local_endpoints: Callable[[Key], int],
                 healthy: Callable[[], bool]) -> None:
        self._local_endpoints = local_endpoints
        self._healthy = healthy
        self.servers: dict[Key, tuple[int, tuple[str, ...], web.AppRunner]] = {}
        self._sockets: dict[Key, list[tuple[str, socket.socket]]] = {}
        self._sites: dict[Key, list[web.SockSite]] = {}  # each serves a dup of a socket above
        self._failed: set[tuple[Key, int]] = set()
        # listening sockets a takeover brought, by (address, port), until a sync serves them
        self.adopted: dict[tuple[str, int], socket.socket] = {}

    def sockets(self) -> list[tuple[str, int, socket.socket]]:
        """(address, port, socket) of every open health-check node port (for a takeover)."""
        return [(address, self.servers[key][0], sock)
                for key, socks in self._sockets.items() for address, sock in socks]

    def close_unclaimed(self) -> int:
        """Taken-over sockets no Service wants (after the first sync)."""
        for sock in self.adopted.values():
            sock.close()
        closed, self.adopted = len(self.adopted), {}
        return closed

    def ports(self) -> dict[Key, int]:
        return {key: port for key, (port, _addrs, _runner) in self.servers.items()}

    async def sync(self, wanted: Mapping[Key, int], addresses: Sequence[str]) -> None:
        where = tuple(addresses)
        for key in [k for k, (port, addrs, _r) in self.servers.items()
                    if wanted.get(k) != port or addrs != where]:
            _port, _addrs, runner = self.servers.pop(key)
            for _address, sock in self._sockets.pop(key, []):
                sock.close()
            self._sites.pop(key, None)
            await runner.cleanup()
            log.info("%s/%s: health-check node port %d closed", *key, _port)
        for key, port in wanted.items():
            if key not in self.servers:
                await self._open(key, port, where)

    async def _open(self, key: Key, port: int, addresses: tuple[str, ...]) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handler(key))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        opened: list[tuple[str, socket.socket]] = []
        sites: list[web.SockSite] = []
        error: OSError | None = None
        for address in addresses:
            try:
                sock = self.adopted.pop((address, port), None) or _listen(address, port)
                opened.append((address, sock))
                sites.append(await _serve(runner, sock))
            except OSError as exc:
                if address != "::":  # "::" where the node has no IPv6: quietly IPv4 only
                    error = exc
        if error is not None or not sites:
            await runner.cleanup()
            for _address, sock in opened:
                sock.close()
            if (key, port) not in self._failed:
                self._failed.add((key, port))
                log.warning("%s/%s: cannot open health-check node port %d: %s", *key, port,
                            error.strerror if error and error.strerror else error)
            return
        self._failed.discard((key, port))
        self.servers[key] = (port, addresses, runner)
        self._sockets[key] = opened
        self._sites[key] = sites
        log.info("%s/%s: health-check node port %d open", *key, port)

    def pause(self) -> None:
        """A takeover starts: stop accepting (the sockets stay, and connections wait in their
        backlogs for whoever serves next)."""
        for sites in self._sites.values():
            for site in sites:
                stop_accepting(site)

    async def resume(self) -> None:
        """The takeover failed: serve the same sockets again."""
        for sites in self._sites.values():
            for site in sites:
                server = site._server  # (aiohttp keeps the asyncio server there)
                if server is not None:
                    server.close()  # (the paused dup; its accepted connections are served on)
        for key, socks in self._sockets.items():
            runner = self.servers[key][2]
            self._sites[key] = [await _serve(runner, sock) for _address, sock in socks]

    def _handler(self, key: Key) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(_request: web.Request) -> web.Response:
            status, headers, body = service_health(key[0], key[1], self._local_endpoints(key),
                                                   self._healthy())
            return web.Response(body=body, status=status, headers=headers)

        return handle

    async def close(self, *, linger: float = 0.0) -> None:
        """Stop serving; ``linger`` (after a handover): first give the connections already
        accepted up to that long to be answered (see :func:`let_accepted_finish`)."""
        if linger > 0:
            await let_accepted_finish([runner for _p, _a, runner in self.servers.values()],
                                      linger)
        for _port, _addrs, runner in self.servers.values():
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self.servers.clear()
        for socks in self._sockets.values():
            for _address, sock in socks:
                sock.close()
        self._sockets.clear()
        self._sites.clear()
        self.close_unclaimed()


def stop_accepting(site: web.BaseSite) -> None:
    """Stop a site accepting connections; the ones it accepted are served on.

    Not ``Server.close()`` on asyncio's own loop: a connection accepted in the loop's last
    turn gets its transport in the next one, and a server closed in between makes that
    fail (``Server._attach`` asserts) and drops the connection quietly, which resets the
    client's request. Removing the listening sockets' reader stops accepting without that
    race; whoever closes the site later closes them. (uvloop makes the transport in the
    accept callback itself: closing is safe there.)"""
    server = getattr(site, "_server", None)  # (aiohttp keeps the asyncio server there)
    if server is None:
        return
    loop = server.get_loop()
    if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())
    else:
        server.close()


async def let_accepted_finish(runners: Sequence[web.BaseRunner], seconds: float) -> None:
    """Wait (up to ``seconds``) until no connection of ``runners``' servers is open.

    After a handover the sockets listen on in the new uproxy, but a probe's connection this
    process accepted just before it stopped accepting is still its own, and its request
    may not have arrived yet: closing it then (aiohttp's shutdown closes a connection with
    no request in progress at once) resets the probe. Each probe asks once and is closed
    after its answer (``Connection: close``); keep-alive ones hold this up to ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    # (first a few turns of the loop: on asyncio's own, a connection accepted last turn is
    # not among the server's connections until its transport and protocol are made)
    await asyncio.sleep(0.01)
    while loop.time() < deadline and any(
            runner.server is not None and runner.server.connections for runner in runners):
        await asyncio.sleep(0.01)


async def _serve(runner: web.AppRunner, sock: socket.socket) -> web.SockSite:
    """Serve a dup of ``sock``: closing the site (a pause) leaves ``sock`` itself open."""
    dup = sock.dup()
    try:
        site = web.SockSite(runner, dup)
        await site.start()
    except OSError:
        dup.close()
        raise
    return site


def _listen(address: str, port: int) -> socket.socket:
    """A listening TCP socket on ``address:port`` (as aiohttp's TCPSite would make it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
