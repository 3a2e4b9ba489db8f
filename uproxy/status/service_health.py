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
"""

from __future__ import annotations

import contextlib
import logging
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
        self._failed: set[tuple[Key, int]] = set()

    def ports(self) -> dict[Key, int]:
        return {key: port for key, (port, _addrs, _runner) in self.servers.items()}

    async def sync(self, wanted: Mapping[Key, int], addresses: Sequence[str]) -> None:
        where = tuple(addresses)
        for key in [k for k, (port, addrs, _r) in self.servers.items()
                    if wanted.get(k) != port or addrs != where]:
            _port, _addrs, runner = self.servers.pop(key)
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
        opened = 0
        error: OSError | None = None
        for address in addresses:
            try:
                await web.TCPSite(runner, address, port, reuse_address=True).start()
                opened += 1
            except OSError as exc:
                if address != "::":  # "::" where the node has no IPv6: quietly IPv4 only
                    error = exc
        if error is not None or not opened:
            await runner.cleanup()
            if (key, port) not in self._failed:
                self._failed.add((key, port))
                log.warning("%s/%s: cannot open health-check node port %d: %s", *key, port,
                            error.strerror if error and error.strerror else error)
            return
        self._failed.discard((key, port))
        self.servers[key] = (port, addresses, runner)
        log.info("%s/%s: health-check node port %d open", *key, port)

    def _handler(self, key: Key) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(_request: web.Request) -> web.Response:
            status, headers, body = service_health(key[0], key[1], self._local_endpoints(key),
                                                   self._healthy())
            return web.Response(body=body, status=status, headers=headers)

        return handle

    async def close(self) -> None:
        for _port, _addrs, runner in self.servers.values():
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self.servers.clear()
