"""The status page with 10,000 Services and 10,000 open connections.

This many real sockets do not fit in one test process (10,000 connections are 40,000
descriptors with the clients and the backends), so the daemon side is a
:class:`~uproxy.status.view.DaemonView` built from the real parts that the status server
reads: a real :class:`~uproxy.state.Store` holding 10,000 Services and their
EndpointSlices, the real served table, a real :class:`~uproxy.connections.ConnTable` with
10,000 connections (their byte counters are plain numbers instead of relays) and a real
event log fed the real table diff. The real status app serves it on loopback to a real
headless Chromium: the page must load, page its tables, show the busiest Services' bars,
the counts and a bounded row set, within seconds, with no errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from playwright.async_api import expect

from uproxy.connections import ConnTable
from uproxy.events import EventLog
from uproxy.metrics import Metrics
from uproxy.model import ServicePortName
from uproxy.rules import Redirect
from uproxy.settings import Settings
from uproxy.state import Entry, Served, Store
from uproxy.status import server

SERVICES = 10_000
CONNECTIONS = 10_000


@dataclass
class Counts:
    bytes_up: int = 0
    bytes_down: int = 0
    native: bool = False


@dataclass
class Named:
    name: str

    def catch_up(self) -> None:
        """(the relay's part of DaemonView: nothing queued here)"""

    def thread_stats(self) -> list[dict[str, int]]:
        """(the relay's part of DaemonView: no engine threads, as the Python twin)"""
        return []


@dataclass
class View:
    """What the status server reads (DaemonView), from real parts without sockets."""

    settings: Settings
    loop: asyncio.AbstractEventLoop
    store: Store
    served: dict[ServicePortName, Entry]
    conns: ConnTable
    events: EventLog
    metrics: Metrics = field(default_factory=Metrics)
    relay: Named = field(default_factory=lambda: Named("python"))
    source: Named = field(default_factory=lambda: Named("files"))
    redirects: list[Redirect] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    last_sync: float | None = field(default_factory=time.time)
    ready: bool = True
    source_synced: bool = True
    rules_applied: bool = True
    node_terminating: bool = False

    def healthy(self, now: float | None = None) -> bool:
        return True

    def listener_ports(self) -> Iterable[tuple[Any, int]]:
        return []


def big_view(loop: asyncio.AbstractEventLoop) -> View:
    store = Store()
    for i in range(SERVICES):
        name = f"svc-{i:05d}"
        store.apply("Service", {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": f"ns-{i % 50}"},
            "spec": {"clusterIP": f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",
                     "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
        store.apply("EndpointSlice", {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-a", "namespace": f"ns-{i % 50}",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [f"10.244.{i // 256 % 256}.{(i % 256) // 2 * 2 + j}"],
                           "conditions": {"ready": True}} for j in (0, 1)]})
    served = Served()
    diff = served.update(store, store.take_changed())
    events = EventLog()
    events.table_changed(diff)
    conns = ConnTable()
    names = sorted(served.table)
    for n in range(CONNECTIONS):
        # Skewed on purpose: the first Services are the busiest.
        entry = served.table[names[(n * n) % 997]]
        conn = conns.open(protocol="TCP", service=entry.port.name, client=("10.1.0.1", 1024 + n),
                          scope="cluster")
        conns.established(conn, entry.endpoints[n % 2].address, Counts(n, 2 * n))
    settings = Settings(manage_iptables=False, status_address=("127.0.0.1", 0),
                        healthz_address=("127.0.0.1", 0))
    return View(settings, loop, store, served.table, conns, events)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[str]:
    view = big_view(asyncio.get_running_loop())
    runners = await server.start_servers(view)  # type: ignore[arg-type]
    try:
        yield f"http://127.0.0.1:{server.bound_port(runners[0])}/"
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_ten_thousand_services_and_connections(browser: Any, site: str) -> None:
    async with ClientSession() as http:
        for path in ("api/v1/services?limit=50", "api/v1/endpoints?sort=traffic&limit=10",
                     "api/v1/series?only=total", "api/v1/events?limit=200"):
            started = time.monotonic()
            async with http.get(site + path) as response:
                assert response.status == 200
                body = await response.read()
            # Each answer the page polls for is small and quick, whatever the cluster size.
            assert time.monotonic() - started < 3.0, path
            assert len(body) < 200_000, (path, len(body))

    page = await browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    started = time.monotonic()
    await page.goto(site)
    await expect(page.locator("#services-pager")).to_contain_text(f"1\u201350 of {SERVICES}",
                                                                  timeout=20_000)
    await expect(page.locator("#services tbody tr")).to_have_count(50)
    await expect(page.locator("#conn-summary")).to_contain_text(
        f"({CONNECTIONS} open, showing the oldest 200)", timeout=20_000)
    await expect(page.locator("#connections tbody tr")).to_have_count(200)
    await expect(page.locator("#conn-counts tbody tr")).to_have_count(50)
    await expect(page.locator("#bars .svc-bars")).to_have_count(10, timeout=20_000)
    await expect(page.locator("#balance-pager")).to_contain_text(f"of {SERVICES}")
    await expect(page.locator('#events tbody tr[data-kind="ServicesChanged"]')).to_have_count(1)
    loaded = time.monotonic() - started
    assert loaded < 20, loaded
    # The busiest Service is first, and its two endpoints share its connections.
    first = page.locator("#bars .svc-bars").first
    opened = [int(await r.get_attribute("data-opened") or 0)
              for r in await first.locator(".bar-row").all()]
    assert len(opened) == 2 and sum(opened) > 0
    # Paging answers at once.
    await page.locator("#services-pager button", has_text="next").click()
    await expect(page.locator("#services-pager")).to_contain_text(f"51\u2013100 of {SERVICES}",
                                                                  timeout=5_000)
    # The page stays responsive: the main thread answers within a second.
    answered = time.monotonic()
    assert await page.evaluate("1 + 1") == 2
    assert time.monotonic() - answered < 1.0
    assert problems == []
    await page.close()
