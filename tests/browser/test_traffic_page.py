"""The status page's traffic views in a real headless Chromium, over a real daemon on loopback:
real connections through the proxy move the per-endpoint bars and the charts, and removing an
endpoint from the manifests shows in the event log. The screenshot of the page under traffic
is the one in the README (``UPROXY_UPDATE_SCREENSHOT=1`` writes it to docs/)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import expect

from tests.status.support import Stack, running_stack, talk
from tests.support.waiting import wait_until_async
from uproxy.daemon import ListenerKey
from uproxy.model import ServicePortName
from uproxy.status import server

from .conftest import ARTIFACTS

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[Stack, str]]:
    async with running_stack(tmp_path) as stack:
        runners = await server.start_servers(stack.daemon)
        try:
            yield stack, f"http://127.0.0.1:{server.bound_port(runners[0])}/"
        finally:
            for runner in runners:
                await runner.cleanup()


def add_sticky_service(stack: Stack) -> None:
    """``default/sticky``: ClientIP session affinity over the same three backends."""
    objects = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sticky"},
         "spec": {"clusterIP": "10.96.0.30", "sessionAffinity": "ClientIP",
                  "ports": [{"port": 80, "targetPort": stack.backend_port}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "sticky-a", "labels": {"kubernetes.io/service-name": "sticky"}},
         "addressType": "IPv4", "ports": [{"name": "", "port": stack.backend_port}],
         "endpoints": [{"addresses": [h]} for h in ("127.0.0.1", "127.0.0.2", "127.0.0.3")]}]
    (stack.manifest_dir / "sticky.yaml").write_text("\n---\n".join(map(json.dumps, objects)))


async def short(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await talk(writer, reader, b"s" * 2000)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def traffic(stack: Stack, stop: asyncio.Event) -> None:
    """Short connections (10 a second) to echo and to sticky, and two long ones to echo that
    keep moving bytes."""
    longs = [await asyncio.open_connection("127.0.0.1", stack.proxy_port()) for _ in range(2)]
    sticky = stack.proxy_port("default", "sticky", "")
    try:
        while not stop.is_set():
            for reader, writer in longs:
                await talk(writer, reader, b"L" * 20_000)
            await short(stack.proxy_port())
            await short(sticky)
            await asyncio.sleep(0.1)
    finally:
        for _, writer in longs:
            writer.close()


async def number(locator: Any, attribute: str) -> float:
    return float(await locator.get_attribute(attribute) or 0)


async def test_bars_and_charts_move_under_traffic_and_removal_is_an_event(
        browser: Any, site: tuple[Stack, str]) -> None:
    stack, url = site
    add_sticky_service(stack)
    key = ListenerKey(ServicePortName("default", "sticky", "", "TCP"), "cluster",
                      stack.daemon.settings.bind_address, 0)
    await wait_until_async(lambda: key in stack.daemon.listeners, timeout=10,
                           message="the sticky service to be served")
    page = await browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    await page.goto(url)
    await expect(page.locator("#stream-state")).to_have_text("live", timeout=10_000)
    assert await page.locator("#charts-missing").is_hidden()
    conns = page.locator("#chart-conns")
    await expect(conns.locator("canvas")).to_have_count(1, timeout=10_000)
    # Before any traffic: flat charts, empty bars.
    assert await number(conns, "data-max") == 0
    block = page.locator('.svc-bars[data-service="default/echo:tcp"]')
    await expect(block.locator(".bar-row")).to_have_count(4, timeout=10_000)
    assert {await r.get_attribute("data-opened") for r in await block.locator(".bar-row").all()} \
        == {"0"}

    stop = asyncio.Event()
    sender = asyncio.create_task(traffic(stack, stop))
    try:
        # The bars move: each ready pod gets connections, the two long ones are open now.
        async def spread() -> list[int]:
            return [int(await r.get_attribute("data-opened") or 0)
                    for r in await block.locator(".bar-row").all()]

        for _ in range(100):
            counts = await spread()
            if sum(1 for n in counts if n > 0) >= 3 and sum(counts) >= 10:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"the bars did not spread over the pods: {counts}")
        opened_before = sum(await spread())
        # Session affinity shows as one pinned bar: every connection on one endpoint.
        pinned = page.locator('.svc-bars[data-service="default/sticky:"] .bar-row')
        await expect(pinned).to_have_count(3, timeout=10_000)
        sticky = [int(await r.get_attribute("data-opened") or 0) for r in await pinned.all()]
        assert sorted(sticky)[:2] == [0, 0] and max(sticky) > 0, sticky
        # The not-ready endpoint gets none and is shown as such.
        await expect(block.locator(".bar-row.notready")).to_have_count(1)
        assert await block.locator(".bar-row.notready").get_attribute("data-opened") == "0"
        width = await block.locator(".bar-row .fill").first.evaluate(
            "e => e.getBoundingClientRect().width")
        assert width > 0

        # The charts move: new connections/s and bytes/s above zero, more points over time.
        for _ in range(100):
            if (await number(conns, "data-max") > 0
                    and await number(page.locator("#chart-bytes"), "data-max") > 0):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the charts stayed flat")
        points = await number(conns, "data-points")
        await expect(page.locator("#chart-open")).to_have_attribute(
            "data-last", "2,0", timeout=10_000)
        for _ in range(50):
            if await number(conns, "data-points") > points + 1:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the charts got no new samples")
        # Still moving: more connections than when the bars first spread.
        for _ in range(50):
            if sum(await spread()) > opened_before:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the bars stopped moving")

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status-page-traffic.png"
        await page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": 1280, "height": 1000})
        if os.environ.get("UPROXY_UPDATE_SCREENSHOT"):
            DOCS.mkdir(exist_ok=True)
            shutil.copy(shot, DOCS / "status-page.png")
    finally:
        stop.set()
        await sender

    # Take a pod out of the Service: the removal shows in the event log, with its object.
    path = stack.manifest_dir / "services.yaml"
    docs = [json.loads(d) for d in path.read_text().split("\n---\n")]
    docs[1]["endpoints"] = [e for e in docs[1]["endpoints"] if e["addresses"] != ["127.0.0.2"]]
    path.write_text("\n---\n".join(json.dumps(d) for d in docs))
    removed = page.locator('#events tbody tr[data-kind="EndpointRemoved"]')
    await expect(removed).to_have_count(2, timeout=15_000)  # the tcp and the alt port
    await expect(removed.first).to_contain_text(f"Endpoint 127.0.0.2:{stack.backend_port} of")
    await expect(page.locator('#events tbody tr[data-kind="ServiceAdded"]').first).to_be_visible()
    # The bars follow: three endpoints left on the tcp port.
    await expect(block.locator(".bar-row")).to_have_count(3, timeout=10_000)
    assert problems == []
    await page.close()
