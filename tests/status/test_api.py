"""The status and health apps against a real daemon on loopback (real sockets, real relay).

Requests go through aiohttp's test client to the real apps; connections go
through the daemon's proxy socket to echo servers on 127.0.0.1-3.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, test_utils, web
from prometheus_client.parser import text_string_to_metric_families

from tests.support.waiting import wait_until_async
from uproxy.rules import KEEP_NAT_V4, render_rule
from uproxy.status import server
from uproxy.status.views import parse_timestamp

from .support import CREATED, Stack, running_stack, talk

Client = test_utils.TestClient[web.Request, web.Application]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path) as s:
        yield s


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[Client]:
    app = server.make_status_app(stack.daemon)
    async with test_utils.TestClient(test_utils.TestServer(app)) as c:
        yield c


@pytest.fixture
async def health(stack: Stack) -> AsyncIterator[Client]:
    app = server.make_health_app(stack.daemon)
    async with test_utils.TestClient(test_utils.TestServer(app)) as c:
        yield c


async def get_json(client: Client, path: str, status: int = 200) -> Any:
    response = await client.get(path)
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"].startswith("application/json")
    return await response.json()


# ------------------------------------------------------------------ services / endpoints
async def test_services_like_kubectl_get_svc(client: Client, stack: Stack) -> None:
    data = await get_json(client, "/api/v1/services")
    items = {(i["namespace"], i["name"]): i for i in data["items"]}
    assert set(items) == {("default", "echo"), ("web", "site")}
    echo = items[("default", "echo")]
    assert (echo["type"], echo["clusterIP"], echo["selector"]) == (
        "ClusterIP", "10.96.0.10", {"app": "echo"})
    ports = {p["name"]: p for p in echo["ports"]}
    assert ports["tcp"]["port"] == 80 and ports["tcp"]["protocol"] == "TCP"
    assert ports["tcp"]["proxied"] and ports["tcp"]["endpoints"] == 4
    assert ports["tcp"]["proxyPort"] == stack.proxy_port(port="tcp")
    assert ports["alt"]["proxyPort"] == stack.proxy_port(port="alt")
    # The age counts from creationTimestamp when the object has one...
    assert echo["created"].startswith("2026-01-02T03:04:05")
    assert echo["age"] == pytest.approx(time.time() - parse_timestamp(CREATED), abs=5)
    # ...and from when uproxy first saw it otherwise (manifests rarely carry one).
    site = items[("web", "site")]
    assert site["type"] == "NodePort" and site["ports"][0]["nodePort"] == stack.node_port
    assert 0 <= site["age"] < 30


async def test_endpoints_like_kubectl_get_endpoints(client: Client, stack: Stack) -> None:
    data = await get_json(client, "/api/v1/endpoints")
    items = {(i["namespace"], i["name"]): i for i in data["items"]}
    echo = items[("default", "echo")]
    port = stack.backend_port
    # Ready addresses only, port by port (as kubectl prints them); the not-ready one is listed
    # with its conditions among all endpoints.
    assert echo["addresses"] == [f"127.0.0.{i}:{port}" for i in (1, 2, 3)] * 2
    not_ready = [e for e in echo["endpoints"] if not e["ready"]]
    assert {(e["ip"], e["portName"]) for e in not_ready} == {("127.0.0.9", "tcp"),
                                                            ("127.0.0.9", "alt")}
    assert items[("web", "site")]["addresses"] == [f"127.0.0.1:{port}"]


async def test_endpoints_follow_manifest_changes(client: Client, stack: Stack) -> None:
    path = stack.manifest_dir / "services.yaml"
    docs = [json.loads(d) for d in path.read_text().split("\n---\n")]
    docs[1]["endpoints"] = docs[1]["endpoints"][:1]
    path.write_text("\n---\n".join(json.dumps(d) for d in docs))

    async def one_left() -> bool:
        data = await get_json(client, "/api/v1/endpoints")
        echo = next(i for i in data["items"] if i["name"] == "echo")
        return bool(echo["addresses"] == [f"127.0.0.1:{stack.backend_port}"] * 2)

    await wait_until_async(one_left, timeout=10, message="the endpoint change to show")


# ------------------------------------------------------------------ connections
async def test_connection_appears_grows_and_goes(client: Client, stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy_port())
    local = f"127.0.0.1:{writer.get_extra_info('sockname')[1]}"
    try:
        await talk(writer, reader, b"x" * 1000)

        async def row(min_up: int) -> dict[str, Any] | None:
            data = await get_json(client, "/api/v1/connections")
            mine = [c for c in data["items"] if c["client"] == local]
            if mine and mine[0]["bytes_up"] >= min_up and mine[0]["bytes_down"] >= min_up:
                return mine[0]
            return None

        first = await wait_until_async(lambda: row(1000), timeout=10, message="the connection row")
        assert first["service"] == "default/echo:tcp" and first["protocol"] == "TCP"
        assert first["state"] == "open" and first["scope"] == "cluster"
        assert first["backend"].endswith(f":{stack.backend_port}")
        assert first["native"] == (stack.daemon.relay.name == "native")

        await talk(writer, reader, b"y" * 50_000)
        grown = await wait_until_async(lambda: row(51_000),
                                       timeout=10, message="the byte counts to grow")
        assert grown["id"] == first["id"] and grown["age"] >= first["age"]

        # Filters: by service port, by service, by another service; limit bounds the rows.
        for wanted, count in (("default/echo:tcp", 1), ("default/echo", 1), ("echo", 1),
                              ("default/echo:alt", 0), ("web/site", 0)):
            data = await get_json(client, f"/api/v1/connections?service={wanted}")
            assert data["matched"] == count, wanted
            assert data["counts"] == {"default/echo:tcp": 1}
        data = await get_json(client, "/api/v1/connections?limit=1")
        assert data["limit"] == 1 and len(data["items"]) == 1
        await get_json(client, "/api/v1/connections?limit=zero", status=400)
    finally:
        writer.close()
        await writer.wait_closed()

    async def gone() -> bool:
        data = await get_json(client, "/api/v1/connections")
        return not any(c["client"] == local for c in data["items"])

    await wait_until_async(gone, timeout=10, message="the closed connection to leave the table")


async def read_events(response: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    event = None
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event:
            yield event, json.loads(line[6:])
            event = None


async def test_watch_streams_open_and_close(client: Client, stack: Stack) -> None:
    response = await client.get("/api/v1/connections/watch?service=default/echo:tcp&limit=10")
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = read_events(response)
    kind, first = await anext(events)
    assert kind == "snapshot" and first["items"] == [] and first["limit"] == 10

    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy_port())
    local = f"127.0.0.1:{writer.get_extra_info('sockname')[1]}"
    await talk(writer, reader, b"z" * 4096)
    seen_id = None

    async def until(pred: Any) -> dict[str, Any]:
        async with asyncio.timeout(10):
            async for kind, data in events:
                if pred(kind, data):
                    return data
        raise AssertionError("stream ended")

    def shows_bytes(kind: str, data: dict[str, Any]) -> bool:
        rows = data["items"] if kind == "snapshot" else data["opened"] + data["updated"]
        return any(r["client"] == local and r["bytes_up"] >= 4096 for r in rows)

    data = await until(shows_bytes)
    rows = data["items"] if "items" in data else data["opened"] + data["updated"]
    seen_id = next(r["id"] for r in rows if r["client"] == local)
    if "counts" in data:
        assert data["counts"] == {"default/echo:tcp": 1}
    writer.close()
    await writer.wait_closed()

    def closed(kind: str, data: dict[str, Any]) -> bool:
        if kind == "batch":
            return seen_id in data["closed"]
        return all(r["id"] != seen_id for r in data["items"])

    await until(closed)
    response.close()


async def test_stream_sends_rows_within_limit_and_counts_all(client: Client,
                                                              stack: Stack) -> None:
    conns = [await asyncio.open_connection("127.0.0.1", stack.proxy_port()) for _ in range(5)]
    try:
        for reader, writer in conns:
            await talk(writer, reader, b"ping")
        response = await client.get("/api/v1/connections/watch?limit=2")
        async with asyncio.timeout(10):
            async for kind, data in read_events(response):
                if kind == "snapshot" and data["total"] == 5:
                    break
        assert len(data["items"]) == 2 and data["matched"] == 5
        assert data["counts"] == {"default/echo:tcp": 5}
        ids = [r["id"] for r in data["items"]]
        assert ids == sorted(ids)  # oldest first, so rows do not jump around
        response.close()
    finally:
        for _, writer in conns:
            writer.close()


# ------------------------------------------------------------------ rules / info / metrics
async def test_rules_are_the_iptables_save_lines(client: Client, stack: Stack) -> None:
    data = await get_json(client, "/api/v1/rules")
    assert data["chain"] == "UPROXY-SERVICES" and data["applied"] is False
    assert data["lines"] == [*(render_rule(r) for r in sorted(stack.daemon.redirects)),
                             KEEP_NAT_V4]
    tcp = stack.proxy_port(port="tcp")
    assert (f'-A UPROXY-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment '
            f'"default/echo:tcp cluster IP" -m tcp --dport 80 -j REDIRECT --to-ports {tcp}'
            ) in data["lines"]
    listeners = {(x["service"], x["scope"]): x for x in data["listeners"]}
    assert listeners[("web/site:", "nodeport")]["port"] == stack.node_port
    assert listeners[("default/echo:tcp", "cluster")]["port"] == tcp


async def test_info(client: Client, stack: Stack) -> None:
    data = await get_json(client, "/api/v1/info")
    assert data["relay"] == stack.daemon.relay.name and data["native"] in ("native", "python")
    assert data["engineThreads"] == (stack.daemon.relay.threads  # type: ignore[attr-defined]
                                     if data["relay"] == "native" else 0)
    assert data["loop"] == "asyncio" and data["source"] == "files"
    assert data["ready"] is True and data["healthy"] is True
    assert data["node"] == "status-test-node" and data["servicePorts"] == 3


def samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of the samples called ``name`` whose labels include ``labels``."""
    return [s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and labels.items() <= s.labels.items()]


async def test_metrics_has_kube_proxy_names_and_live_counts(client: Client,
                                                             stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy_port())
    await talk(writer, reader, b"m" * 10_000)
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    for name in ("kubeproxy_sync_proxy_rules_duration_seconds_bucket",
                 "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                 "kubeproxy_network_programming_duration_seconds_count"):
        assert samples(text, name), name
    svc = "default/echo:tcp"
    assert samples(text, "uproxy_connections_total", service=svc, result="ok") == [1.0]
    assert samples(text, "uproxy_connections_active", service=svc) == [1.0]
    assert samples(text, "uproxy_connections_tracked", service=svc, state="open") == [1.0]

    async def live_bytes_counted() -> bool:
        # The relay may count the last chunk a moment after the client has read it.
        body = await (await client.get("/metrics")).text()
        return (samples(body, "uproxy_live_bytes", service=svc, direction="up") == [10_000.0]
                and samples(body, "uproxy_live_bytes", service=svc, direction="down")
                == [10_000.0])

    await wait_until_async(live_bytes_counted, timeout=10, message="live bytes in the metrics")
    writer.close()
    await writer.wait_closed()

    async def closed_bytes_counted() -> bool:
        body = await (await client.get("/metrics")).text()
        return (samples(body, "uproxy_bytes_total", service=svc, direction="up") == [10_000.0]
                and samples(body, "uproxy_live_bytes") == []
                and samples(body, "uproxy_connections_active", service=svc) == [0.0])

    await wait_until_async(closed_bytes_counted,
                           timeout=10, message="bytes to move from live to closed totals")


# ------------------------------------------------------------------ the page and its safety
async def test_page_and_static_files(client: Client) -> None:
    response = await client.get("/")
    assert response.status == 200
    html = await response.text()
    assert '<script src="/static/app.js"' in html
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    for path in ("/static/app.js", "/static/style.css"):
        r = await client.get(path)
        assert r.status == 200, path
        body = await r.text()
        assert not re.search(r"\.(inner|outer)HTML|insertAdjacentHTML|document\.write|eval\(",
                             body), path
        assert "http://" not in body and "https://" not in body, path  # no CDN, no other origin
    # The charting library: fetched at its pinned version by `make venv` (never committed),
    # served from the same origin with its license.
    assert '<script src="/static/vendor/uPlot.iife.min.js"' in html
    for path in ("/static/vendor/uPlot.iife.min.js", "/static/vendor/uPlot.min.css",
                 "/static/vendor/uPlot.LICENSE"):
        assert (await client.get(path)).status == 200, path
    assert "MIT" in await (await client.get("/static/vendor/uPlot.LICENSE")).text()
    assert (await client.get("/static/")).status in (403, 404)
    assert (await client.get("/static/../server.py")).status in (403, 404)


@pytest.mark.parametrize("path", ["/", "/api/v1/services", "/metrics",
                                  "/api/v1/connections"])
async def test_read_only_and_no_cors(client: Client, path: str) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        response = await client.request(method, path)
        assert response.status == 405, (method, path)
    head = await client.head(path)
    assert head.status == 200
    response = await client.get(path, headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers
    assert response.headers["X-Content-Type-Options"] == "nosniff"


# ------------------------------------------------------------------ health
async def test_health_when_synced(health: Client, stack: Stack) -> None:
    for path in ("/healthz", "/livez"):
        data = await get_json(health, path)
        # kube-proxy's fields; /livez has no nodeEligible; a 200 shows lastUpdated = now
        fields = ["lastUpdated", "currentTime", "nodeEligible", "healthy", "status"]
        if path == "/livez":
            fields.remove("nodeEligible")
        assert list(data) == fields
        assert data.get("nodeEligible", True) is True and data["healthy"] is True
        assert data["lastUpdated"] == data["currentTime"]
        assert parse_timestamp(data["status"]["IPv4"]["lastUpdated"]) == pytest.approx(
            stack.daemon.last_sync, abs=0.01)
        assert parse_timestamp(data["currentTime"]) == pytest.approx(time.time(), abs=5)
    assert (await get_json(health, "/readyz"))["ready"] is True
    assert (await health.head("/healthz")).status == 200
    assert (await health.post("/healthz")).status == 405


async def test_health_while_an_update_waits_and_the_node_goes(tmp_path: Path) -> None:
    # The source reports a change but never its first complete view: nothing is applied.
    async with running_stack(tmp_path, gated=True, wait_ready=False, sync_period=0.3) as stack:
        app = server.make_health_app(stack.daemon)
        async with test_utils.TestClient(test_utils.TestServer(app)) as health:
            data = await get_json(health, "/readyz", status=503)
            assert data == {"ready": False, "sourceSynced": False, "rulesApplied": False}
            await get_json(health, "/healthz")  # queued, but not for long yet
            await asyncio.sleep(0.7)  # > 2 x sync period
            data = await get_json(health, "/healthz", status=503)
            assert data["lastUpdated"] == "0001-01-01T00:00:00Z"
            await get_json(health, "/livez", status=503)

            stack.daemon.source.release.set()  # type: ignore[attr-defined]
            await wait_until_async(lambda: stack.daemon.ready,
                                   timeout=10, message="the daemon to apply")
            await get_json(health, "/healthz")
            await get_json(health, "/livez")
            await get_json(health, "/readyz")

            stack.daemon.source.node_terminating = True  # type: ignore[attr-defined]
            data = await get_json(health, "/healthz", status=503)
            assert data["nodeEligible"] is False and data["healthy"] is True
            assert "nodeEligible" not in await get_json(health, "/livez")  # still alive


# ------------------------------------------------------------------ start_servers
async def test_start_servers_binds_both_and_reports_bind_errors(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        runners = await server.start_servers(stack.daemon)
        try:
            status_port, health_port = (server.bound_port(r) for r in runners)
            async with ClientSession() as session:
                r = await session.get(f"http://127.0.0.1:{status_port}/api/v1/info")
                assert r.status == 200 and (await r.json())["ready"] is True
                r = await session.get(f"http://127.0.0.1:{health_port}/healthz")
                assert r.status == 200
                # Each app serves only its own routes.
                assert (await session.get(f"http://127.0.0.1:{health_port}/metrics")).status == 404
            # The health port is taken (by our own status server): OSError, as the CLI expects.
            original = stack.daemon.settings
            stack.daemon.settings = dataclasses.replace(
                original, healthz_address=("127.0.0.1", status_port))
            try:
                with pytest.raises(OSError):
                    await server.start_servers(stack.daemon)
            finally:
                stack.daemon.settings = original
        finally:
            for runner in runners:
                await runner.cleanup()


async def test_stopping_the_server_ends_open_streams(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        runners = await server.start_servers(stack.daemon)
        try:
            url = f"http://127.0.0.1:{server.bound_port(runners[0])}/api/v1/connections/watch"
            async with ClientSession() as session, session.get(url) as response:
                kind, _ = await anext(read_events(response))
                assert kind == "snapshot"
                for runner in runners:
                    await runner.cleanup()
                runners = []
                # The stream ends cleanly (EOF), not by a reset after a shutdown timeout.
                rest = [kind async for kind, _ in read_events(response)]
                assert set(rest) <= {"snapshot", "batch"}
                assert response.content.at_eof()
        finally:
            for runner in runners:
                await runner.cleanup()


async def test_garbage_collection_waits_for_ready_then_resumes(tmp_path: Path) -> None:
    """Start-up builds its state without the cyclic collector (0.5 s of 2 s with 10,000
    services); once ready, the start-up state is frozen out of the collector's sight and
    collection resumes -- also when the daemon stops without ever being ready."""
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        async with running_stack(tmp_path, gated=True, wait_ready=False) as stack:
            await wait_until_async(lambda: stack.daemon.store.table(),
                                   timeout=10, message="the manifests to load")
            assert not gc.isenabled()
            stack.daemon.source.release.set()  # type: ignore[attr-defined]
            await wait_until_async(lambda: stack.daemon.ready,
                                   timeout=10, message="the daemon to apply")
            assert gc.isenabled()
            assert gc.get_freeze_count() > frozen
        async with running_stack(tmp_path / "never", gated=True, wait_ready=False) as stack:
            await wait_until_async(lambda: stack.daemon.store.table(),
                                   timeout=10, message="the manifests to load")
            assert not gc.isenabled()
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
