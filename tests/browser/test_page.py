"""The status page in a real headless Chromium, over a real daemon on loopback.

A long-lived connection goes through the proxy: its row must appear without a
reload, its byte count must grow as bytes move, and the row must go when the
connection closes. A hostile object name must show as text, never as markup.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import expect

from tests.status.support import Stack, running_stack, talk
from uproxy.status import server

from .conftest import ARTIFACTS

UNIT = {"": 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def parse_bytes(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(Ki|Mi|Gi)?", text.strip())
    assert m, text
    return float(m[1]) * UNIT[m[2] or ""]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[Stack, str]]:
    async with running_stack(tmp_path) as stack:
        runners = await server.start_servers(stack.daemon)
        try:
            yield stack, f"http://127.0.0.1:{server.bound_port(runners[0])}/"
        finally:
            for runner in runners:
                await runner.cleanup()


async def open_page(browser: Any, url: str) -> tuple[Any, list[str]]:
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    await page.goto(url)
    await expect(page.locator("#stream-state")).to_have_text("live", timeout=10_000)
    return page, problems


async def test_live_connection_row_appears_grows_and_goes(browser: Any,
                                                          site: tuple[Stack, str]) -> None:
    stack, url = site
    page, problems = await open_page(browser, url)
    await expect(page.locator("#services tbody")).to_contain_text("echo")
    await expect(page.locator("#rules")).to_contain_text(
        f"--to-ports {stack.proxy_port()}")
    await expect(page.locator("#conn-empty")).to_be_visible()

    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy_port())
    local = f"127.0.0.1:{writer.get_extra_info('sockname')[1]}"
    try:
        await talk(writer, reader, b"a" * 1000)
        row = page.locator("#connections tbody tr").filter(
            has=page.locator("td", has_text=re.compile("^" + re.escape(local) + "$")))
        await expect(row).to_have_count(1, timeout=10_000)
        cells = row.locator("td")
        await expect(cells.nth(1)).to_have_text("default/echo:tcp")
        await expect(cells.nth(7)).to_have_text("open")
        await expect(cells.nth(5)).to_have_text("1000", timeout=10_000)
        first = parse_bytes(await cells.nth(5).text_content() or "")

        # Keep the connection open and move more bytes: the count grows without a reload.
        for _ in range(5):
            await talk(writer, reader, b"b" * 100_000)
        await expect(cells.nth(5)).to_have_text(re.compile(r"^48[89]\.\dKi$"), timeout=10_000)
        await expect(cells.nth(6)).to_have_text(re.compile(r"^48[89]\.\dKi$"))
        assert parse_bytes(await cells.nth(5).text_content() or "") > first
        await expect(page.locator("#conn-counts tbody")).to_contain_text("default/echo:tcp")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
    finally:
        writer.close()
        await writer.wait_closed()
    await expect(row).to_have_count(0, timeout=10_000)
    await expect(page.locator("#conn-empty")).to_be_visible()
    assert problems == []
    await page.close()


async def test_filter_by_service(browser: Any, site: tuple[Stack, str]) -> None:
    stack, url = site
    page, problems = await open_page(browser, url)
    conns = [await asyncio.open_connection("127.0.0.1", stack.proxy_port(port=p))
             for p in ("tcp", "alt")]
    try:
        for reader, writer in conns:
            await talk(writer, reader, b"ping")
        rows = page.locator("#connections tbody tr")
        await expect(rows).to_have_count(2, timeout=10_000)
        await page.select_option("#service-filter", "default/echo:alt")
        await expect(rows).to_have_count(1, timeout=10_000)
        await expect(rows.first.locator("td").nth(1)).to_have_text("default/echo:alt")
        await expect(page.locator("#conn-summary")).to_contain_text("2 open, 1 matching")
        await page.select_option("#service-filter", "")
        await expect(rows).to_have_count(2, timeout=10_000)
    finally:
        for _, writer in conns:
            writer.close()
            await writer.wait_closed()
    assert problems == []
    await page.close()


async def test_hostile_names_are_text(browser: Any, site: tuple[Stack, str]) -> None:
    stack, url = site
    evil = '<img src=x onerror="window.pwned=1">'
    (stack.manifest_dir / "evil.yaml").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": evil, "namespace": "<b>ns</b>"},
        "spec": {"clusterIP": "10.96.0.99", "selector": {"x": "<script>window.pwned=2</script>"},
                 "ports": [{"name": "</td><td>", "port": 81}]}}))
    page, _ = await open_page(browser, url)
    await expect(page.locator("#services tbody")).to_contain_text(evil, timeout=15_000)
    await expect(page.locator("#services tbody")).to_contain_text("<b>ns</b>")
    assert await page.locator("#services img, #services b, #services script").count() == 0
    assert await page.evaluate("window.pwned") is None
    await page.close()


async def test_thousands_of_connections_page_stays_bounded(browser: Any,
                                                          site: tuple[Stack, str]) -> None:
    """3,000 open connections (the most this process's open-file limit allows with the
    proxy, the clients and the backends in one process): the page shows the count, at most
    its row limit, and still answers a filter change."""
    stack, url = site
    loop = asyncio.get_running_loop()
    count = 3000
    socks: list[socket.socket] = []
    try:
        for start in range(0, count, 250):
            batch = [socket.socket() for _ in range(min(250, count - start))]
            socks.extend(batch)
            for s in batch:
                s.setblocking(False)
            await asyncio.gather(*(loop.sock_connect(s, ("127.0.0.1", stack.proxy_port()))
                                   for s in batch))
        page, problems = await open_page(browser, url)
        await expect(page.locator("#conn-summary")).to_contain_text(
            f"({count} open, showing the oldest 200)", timeout=30_000)
        rows = page.locator("#connections tbody tr")
        await expect(rows).to_have_count(200)
        await expect(page.locator("#conn-counts tbody")).to_contain_text(str(count))
        await page.select_option("#row-limit", "50")
        await expect(rows).to_have_count(50, timeout=10_000)
        await page.select_option("#service-filter", "default/echo:alt")
        await expect(page.locator("#conn-empty")).to_be_visible(timeout=10_000)
        await page.select_option("#service-filter", "")
        await expect(rows).to_have_count(50, timeout=10_000)
    finally:
        for s in socks:
            s.close()
    await expect(page.locator("#conn-empty")).to_be_visible(timeout=30_000)
    await expect(page.locator("#conn-summary")).to_contain_text("(0 open)")
    assert problems == []
    await page.close()
