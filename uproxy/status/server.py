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
from uproxy.series import Series
from uproxy.status import health, views
from uproxy.status.collect import readings, register_live_collector
from uproxy.status.service_health import stop_accepting as stop_site_accepting
from uproxy.status.stream import DEFAULT_LIMIT, MAX_LIMIT, ConnHub
from uproxy.status.view import DaemonView

STATIC = Path(__file__).with_name("static")
API_DEFAULT_LIMIT = 1000
API_MAX_LIMIT = 100_000

DAEMON: web.AppKey[DaemonView] = web.AppKey("daemon", object)  # type: ignore[arg-type]
HUB: web.AppKey[ConnHub] = web.AppKey("hub", ConnHub)
SEEN: web.AppKey[views.FirstSeen] = web.AppKey("seen", views.FirstSeen)
SERIES: web.AppKey[Series] = web.AppKey("series", Series)
SAMPLE_INTERVAL = 1.0  # seconds between two samples of the traffic series

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


@web.middleware
async def _caught_up(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer sees every connection the relay has finished or opened so far."""
    request.app[DAEMON].relay.catch_up()
    return await handler(request)


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


def _page(request: web.Request, keys: list[Any]) -> tuple[list[Any], dict[str, int]]:
    """``offset=`` and ``limit=`` pick one page of ``keys`` (the page shows 10,000 Services a
    page at a time; only that page's documents are built). Without them: every key."""
    text = request.query.get("offset", "0")
    if not (text.isascii() and text.isdigit()):
        raise web.HTTPBadRequest(text=json.dumps({"error": f"offset={text!r}: not a "
                                                  "non-negative integer"}),
                                 content_type="application/json")
    offset = int(text)
    limit = _limit(request, len(keys) or 1, API_MAX_LIMIT)
    return keys[offset:offset + limit], {"total": len(keys), "offset": offset}


def _loop_name(daemon: DaemonView) -> str:
    return type(daemon.loop).__module__.split(".")[0]


# --- status app ----------------------------------------------------------------------------
def make_status_app(daemon: DaemonView) -> web.Application:
    """The status app: ``/``, ``/api/v1/*``, ``/metrics`` (read-only)."""
    app = web.Application(middlewares=[_headers, _caught_up])
    app[DAEMON] = daemon
    app[HUB] = ConnHub(daemon.conns)
    app[SEEN] = views.FirstSeen()
    app[SERIES] = Series()
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
    r.add_get("/api/v1/series", series)
    r.add_get("/api/v1/events", events)
    r.add_get("/metrics", metrics)
    r.add_get("/proxyMode", proxy_mode)
    return app


async def proxy_mode(request: web.Request) -> web.Response:
    """kube-proxy's ``/proxyMode`` (its e2e framework reads it): the bare mode name."""
    return web.Response(text="userspace", content_type="text/plain")


async def _startup(app: web.Application) -> None:
    app[HUB].start()
    daemon = app[DAEMON]
    app[SEEN].observe(daemon.store, time.time())
    app[_SEEN_TASK] = asyncio.get_running_loop().create_task(_watch_store(app))
    app[_SAMPLE_TASK] = asyncio.get_running_loop().create_task(_sample(app))


_SEEN_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("seen-task", asyncio.Task)
_SAMPLE_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("sample-task", asyncio.Task)


async def _sample(app: web.Application) -> None:
    """One sample of every service port's traffic a second (O(open connections))."""
    loop = asyncio.get_running_loop()
    conns, ring = app[DAEMON].conns, app[SERIES]
    next_at = loop.time()
    while True:
        ring.sample(time.time(), readings(conns))
        next_at = max(next_at + SAMPLE_INTERVAL, loop.time())  # no catching up after a stall
        await asyncio.sleep(next_at - loop.time())


async def _watch_store(app: web.Application) -> None:
    """First-seen times for objects without creationTimestamp, to the second.

    Not while the source's first list is loading: each call walks every stored key, and
    at 10,000 Services it took ~0.1 s of the start-up's CPU per second (issue 16); what
    that list brought is seen when it is complete (or at the first view before)."""
    daemon = app[DAEMON]
    while True:
        await asyncio.sleep(1.0)
        if daemon.source_synced:
            app[SEEN].observe(daemon.store, time.time())


async def _shutdown(app: web.Application) -> None:
    for key in (_SEEN_TASK, _SAMPLE_TASK):
        task = app.get(key)
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
        "engineThreads": len(daemon.relay.thread_stats()),  # (0: the Python twin)
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
    return {key.name: port for key, port in sorted(  # IPv4's wins (sorted last)
        daemon.listener_ports(), key=lambda kp: ":" not in kp[0].address) if key.scope == "cluster"}


def _family_ports(daemon: DaemonView) -> dict[ServicePortName, dict[str, int]]:
    out: dict[ServicePortName, dict[str, int]] = {}
    for key, port in daemon.listener_ports():
        if key.scope == "cluster":
            out.setdefault(key.name, {})["IPv6" if ":" in key.address else "IPv4"] = port
    return out


async def services(request: web.Request) -> web.Response:
    daemon, seen, now = request.app[DAEMON], request.app[SEEN], time.time()
    seen.observe(daemon.store, now)
    raw = daemon.store.raw("Service")
    keys, paging = _page(request, sorted(raw))
    data = views.services(raw, daemon.served, _proxy_ports(daemon), seen, now, keys=keys,
                          family_ports=_family_ports(daemon))
    return _json(dict(data, **paging))


async def endpoints(request: web.Request) -> web.Response:
    """Every proxied service's endpoints and their traffic: ``sort=traffic`` puts the busiest
    first (connections and flows since start), ``offset=``/``limit=`` page."""
    daemon, seen, now = request.app[DAEMON], request.app[SEEN], time.time()
    seen.observe(daemon.store, now)
    store = daemon.store
    sort = request.query.get("sort", "")
    if sort not in ("", "name", "traffic"):
        return _bad_request(f"sort={sort!r}: name or traffic")
    tallies = daemon.conns.endpoints
    keys = sorted({name.service for name in daemon.served})
    if sort == "traffic":
        busy: dict[tuple[str, str], int] = {}
        for (name, _), tally in tallies.items():
            busy[name.service] = busy.get(name.service, 0) + tally.opened + tally.flows_opened
        keys.sort(key=lambda k: -busy.get(k, 0))
    keys, paging = _page(request, keys)
    data = views.endpoints(daemon.served, store.raw("EndpointSlice"), store.raw("Endpoints"),
                           store.raw("Service"), seen, now, tallies, daemon.conns.live_bytes(),
                           keys=keys)
    return _json(dict(data, **paging))


async def rules(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    listeners = [(str(k.name), k.scope, k.address, port) for k, port in daemon.listener_ports()]
    data = views.rules(daemon.redirects, listeners)
    data["applied"] = daemon.settings.manage_iptables and daemon.rules_applied
    # nftables: the same redirects are map elements of ``nft list table ip uproxy``
    data["interception"] = getattr(daemon, "interception", "iptables")
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


async def series(request: web.Request) -> web.Response:
    """Traffic over the last 15 minutes, one sample a second: ``service=`` filters the service
    ports, ``only=total`` sends the sum of all of them alone."""
    only = request.query.get("only", "")
    if only not in ("", "total"):
        return _bad_request(f"only={only!r}: total (or leave it out)")
    return _json(request.app[SERIES].as_dict(request.query.get("service", ""), items=not only))


async def events(request: web.Request) -> web.Response:
    """The event log, oldest first: ``since=`` (a seq) for what is new, ``limit=`` the newest n."""
    log = request.app[DAEMON].events
    text = request.query.get("since", "0")
    if not (text.isascii() and text.isdigit()):
        return _bad_request(f"since={text!r}: not a non-negative integer")
    limit = _limit(request, API_DEFAULT_LIMIT, API_MAX_LIMIT)
    items = log.items(since=int(text), limit=limit)
    return _json({"kind": "EventList", "lastSeq": log.last_seq, "total": len(log),
                  "items": [e.as_dict() for e in items]})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[DAEMON].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# --- health app ----------------------------------------------------------------------------
def _proxy_health(daemon: DaemonView, *, with_node: bool) -> web.Response:
    now = time.time()
    status, body = health.proxy_health(
        healthy=daemon.healthy(now), last_sync=daemon.last_sync, now=now,
        node_eligible=not daemon.node_terminating if with_node else None,
        families=[f"IPv{f}" for f in daemon.families])
    return web.Response(body=body, status=status, headers=health.JSON_HEADERS)


def make_health_app(daemon: DaemonView) -> web.Application:
    """kube-proxy's health endpoints: ``/healthz``, ``/livez``, plus ``/readyz``."""
    app = web.Application(middlewares=[_headers])
    app[DAEMON] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app


async def healthz(request: web.Request) -> web.Response:
    """503 when a queued update waited longer than twice the sync period, or the node goes
    (kube-proxy's body: :func:`uproxy.status.health.proxy_health`)."""
    return _proxy_health(request.app[DAEMON], with_node=True)


async def livez(request: web.Request) -> web.Response:
    """Like ``/healthz`` without the node check: a node being deleted is still alive."""
    return _proxy_health(request.app[DAEMON], with_node=False)


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


def stop_accepting(runner: web.AppRunner) -> None:
    """Stop a runner's sites accepting; its open connections are served on (a copy of each
    listening socket lives on in the uproxy that took over)."""
    for site in runner.sites:
        stop_site_accepting(site)
