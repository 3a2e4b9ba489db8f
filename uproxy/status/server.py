"""The status and health servers: thin aiohttp routes over the daemon's state.

Two apps, because kube-proxy has two: the *status* app (the live page, the
JSON API, ``/metrics``; loopback by default, ``--status-address``) and the
*health* app (``/healthz``, ``/livez``, ``/readyz``; ``--healthz-address``,
where the kubelet and load balancers probe). Both are read-only: only GET and
HEAD are routed, no CORS headers are sent, and every response carries
``nosniff``/``no-referrer``; the page gets a strict Content-Security-Policy
(scripts and styles from the app's own static files only), and its script
builds the DOM with ``textContent``, never markup from data.

The apps read the daemon through :class:`uproxy.status.view.DaemonView` only
(never importing it). The JSON documents are built by :mod:`uproxy.status.views`
(pure); live connections stream through :class:`uproxy.status.stream.ConnHub` as
server-sent events. Metrics are the daemon's registry plus a collector that
reads live connections at scrape time (:mod:`uproxy.status.collect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from uproxy import __version__, native
from uproxy.model import ServicePortName
from uproxy.status import views
from uproxy.status.collect import register_live_collector
from uproxy.status.stream import DEFAULT_LIMIT, MAX_LIMIT, ConnHub
from uproxy.status.view import DaemonView

STATIC = Path(__file__).with_name("static")
API_DEFAULT_LIMIT = 1000
API_MAX_LIMIT = 100_000

DAEMON: web.AppKey[DaemonView] = web.AppKey("daemon", object)  # type: ignore[arg-type]
HUB: web.AppKey[ConnHub] = web.AppKey("hub", ConnHub)
SEEN: web.AppKey[views.FirstSeen] = web.AppKey("seen", views.FirstSeen)

PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    return response


def _json(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, indent=None, separators=(",", ":")) + "\n",
                        status=status, content_type="application/json")


def _bad_request(message: str) -> web.Response:
    return _json({"error": message}, status=400)


def _limit(request: web.Request, default: int, maximum: int) -> int:
    text = request.query.get("limit", "")
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"limit={text!r}: not a positive "
                                                  "integer"}), content_type="application/json")
    return min(int(text), maximum)


def _loop_name(daemon: DaemonView) -> str:
    return type(daemon.loop).__module__.split(".")[0]


# --- status app ----------------------------------------------------------------------------
def make_status_app(daemon: DaemonView) -> web.Application:
    """The status app: ``/``, ``/api/v1/*``, ``/metrics`` (read-only)."""
    app = web.Application(middlewares=[_headers])
    app[DAEMON] = daemon
    app[HUB] = ConnHub(daemon.conns)
    app[SEEN] = views.FirstSeen()
    register_live_collector(daemon.metrics.registry, daemon.conns)
    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    r = app.router
    r.add_get("/", page)
    r.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    r.add_get("/api/v1/info", info)
    r.add_get("/api/v1/services", services)
    r.add_get("/api/v1/endpoints", endpoints)
    r.add_get("/api/v1/rules", rules)
    r.add_get("/api/v1/connections", connections)
    r.add_get("/api/v1/connections/watch", watch)
    r.add_get("/metrics", metrics)
    return app


async def _startup(app: web.Application) -> None:
    app[HUB].start()
    daemon = app[DAEMON]
    app[SEEN].observe(daemon.store, time.time())
    app[_SEEN_TASK] = asyncio.get_running_loop().create_task(_watch_store(app))


_SEEN_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("seen-task", asyncio.Task)


async def _watch_store(app: web.Application) -> None:
    """First-seen times for objects without creationTimestamp, to the second."""
    while True:
        await asyncio.sleep(1.0)
        app[SEEN].observe(app[DAEMON].store, time.time())


async def _shutdown(app: web.Application) -> None:
    task = app.get(_SEEN_TASK)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await app[HUB].close()


async def page(request: web.Request) -> web.StreamResponse:
    response = web.FileResponse(STATIC / "index.html")
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["Cache-Control"] = "no-cache"
    return response


async def info(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    return _json({
        "version": __version__,
        "relay": daemon.relay.name,
        "native": native.ACTIVE,
        "nativeReason": native.REASON,
        "loop": _loop_name(daemon),
        "python": sys.version.split()[0],
        "source": daemon.source.name,
        "node": daemon.settings.hostname_override,
        "ready": daemon.ready,
        "healthy": daemon.healthy(),
        "nodeTerminating": daemon.node_terminating,
        "started": views.format_timestamp(daemon.started),
        "lastSync": views.format_timestamp(daemon.last_sync) if daemon.last_sync else None,
        "servicePorts": len(daemon.served),
        "listeners": len(list(daemon.listener_ports())),
        "connections": len(daemon.conns),
        "iptables": daemon.settings.manage_iptables,
    })


def _proxy_ports(daemon: DaemonView) -> dict[ServicePortName, int]:
    return {key.name: port for key, port in daemon.listener_ports() if key.scope == "cluster"}


async def services(request: web.Request) -> web.Response:
    daemon, seen, now = request.app[DAEMON], request.app[SEEN], time.time()
    seen.observe(daemon.store, now)
    return _json(views.services(daemon.store.raw("Service"), daemon.served, _proxy_ports(daemon),
                                seen, now))


async def endpoints(request: web.Request) -> web.Response:
    daemon, seen, now = request.app[DAEMON], request.app[SEEN], time.time()
    seen.observe(daemon.store, now)
    store = daemon.store
    return _json(views.endpoints(daemon.served, store.raw("EndpointSlice"),
                                 store.raw("Endpoints"), store.raw("Service"), seen, now))


async def rules(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    listeners = [(str(k.name), k.scope, k.address, port) for k, port in daemon.listener_ports()]
    data = views.rules(daemon.redirects, listeners)
    data["applied"] = daemon.settings.manage_iptables and daemon.rules_applied
    return _json(data)


async def connections(request: web.Request) -> web.Response:
    """Live connections (oldest first): ``service=`` filters, ``limit=`` bounds the rows."""
    daemon = request.app[DAEMON]
    wanted = request.query.get("service", "")
    limit = _limit(request, API_DEFAULT_LIMIT, API_MAX_LIMIT)
    now = time.time()
    counts: dict[str, int] = {}
    items: list[dict[str, Any]] = []
    matched = 0
    table = list(daemon.conns)
    for conn in table:
        name = str(conn.service)
        counts[name] = counts.get(name, 0) + 1
        if views.matches(conn.service, wanted):
            matched += 1
            if len(items) < limit:
                items.append(conn.as_dict(now))
    return _json({"kind": "ConnectionList", "total": len(table), "matched": matched,
                  "limit": limit, "counts": dict(sorted(counts.items())), "items": items})


async def watch(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``snapshot`` (every second) and ``batch`` (every 250 ms)."""
    hub = request.app[HUB]
    wanted = request.query.get("service", "")
    limit = _limit(request, DEFAULT_LIMIT, MAX_LIMIT)
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    await response.prepare(request)
    watcher = hub.add(service=wanted, limit=limit)
    try:
        await response.write(b"retry: 2000\n\n")
        while True:
            message = await watcher.queue.get()
            if message is None:
                break
            await response.write(message.encode())
    except (ConnectionError, asyncio.CancelledError):
        pass  # the client went away, or the server is stopping
    finally:
        hub.remove(watcher)
    return response


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[DAEMON].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# --- health app ----------------------------------------------------------------------------
def _health_body(daemon: DaemonView, now: float) -> dict[str, Any]:
    return {
        "lastUpdated": views.format_timestamp(daemon.last_sync),
        "currentTime": views.format_timestamp(now),
        "nodeEligible": not daemon.node_terminating,
    }


def make_health_app(daemon: DaemonView) -> web.Application:
    """kube-proxy's health endpoints: ``/healthz``, ``/livez``, plus ``/readyz``."""
    app = web.Application(middlewares=[_headers])
    app[DAEMON] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app


async def healthz(request: web.Request) -> web.Response:
    """503 when a queued update waited longer than twice the sync period, or the node goes."""
    daemon, now = request.app[DAEMON], time.time()
    ok = daemon.healthy(now) and not daemon.node_terminating
    return _json(_health_body(daemon, now), status=200 if ok else 503)


async def livez(request: web.Request) -> web.Response:
    """Like ``/healthz`` without the node check: a node being deleted is still alive."""
    daemon, now = request.app[DAEMON], time.time()
    return _json(_health_body(daemon, now), status=200 if daemon.healthy(now) else 503)


async def readyz(request: web.Request) -> web.Response:
    """200 once the source's first full view is in and rules (or sockets) are applied."""
    daemon = request.app[DAEMON]
    ready = daemon.ready
    return _json({"ready": ready, "sourceSynced": daemon.source_synced,
                  "rulesApplied": daemon.rules_applied}, status=200 if ready else 503)


# --- start ---------------------------------------------------------------------------------
async def _serve(app: web.Application, address: tuple[str, int],
                 sock: socket.socket | None = None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site: web.BaseSite
        if sock is not None:  # a listening socket that came over in a takeover
            site = web.SockSite(runner, sock)
        else:
            site = web.TCPSite(runner, address[0], address[1], reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def start_servers(daemon: DaemonView,
                        sockets: Mapping[str, socket.socket] | None = None) -> list[web.AppRunner]:
    """Start the status and health apps; a bind error raises OSError (nothing left running).

    ``sockets`` (``status``, ``health``): listening sockets a takeover brought.
    """
    sockets = sockets or {}
    runners = [await _serve(make_status_app(daemon), daemon.settings.status_address,
                            sockets.get("status"))]
    try:
        runners.append(await _serve(make_health_app(daemon), daemon.settings.healthz_address,
                                    sockets.get("health")))
    except BaseException:
        await runners[0].cleanup()
        raise
    return runners


def bound_port(runner: web.AppRunner) -> int:
    """The port a started runner listens on (for ``--status-address 127.0.0.1:0``)."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            port: int = address[1]
            return port
    raise RuntimeError("the runner has no listening socket")


def listening_socket(runner: web.AppRunner) -> socket.socket:
    """A copy (dup) of a started runner's listening socket, to hand over in a takeover."""
    for site in runner.sites:
        server = getattr(site, "_server", None)  # aiohttp keeps the asyncio server private
        for sock in getattr(server, "sockets", None) or ():
            return socket.socket(fileno=os.dup(sock.fileno()))
    raise RuntimeError("the runner has no listening socket")
