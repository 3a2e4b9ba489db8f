"""Per-endpoint traffic in ``/api/v1/endpoints``: a real daemon on loopback, real connections
through its proxy socket to echo backends on 127.0.0.1-3 (a third one stopped to fail)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import test_utils, web

from tests.support.waiting import wait_until_async
from uproxy.status import server

from .support import Stack, running_stack, talk

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


async def traffic(client: Client) -> dict[str, dict[str, Any]]:
    """default/echo:tcp's endpoints by host: their ``traffic`` counters."""
    response = await client.get("/api/v1/endpoints")
    assert response.status == 200
    data = await response.json()
    echo = next(i for i in data["items"] if i["name"] == "echo")
    return {e["ip"]: e["traffic"] for e in echo["endpoints"]
            if e["service"] == "default/echo:tcp"}


async def test_traffic_to_each_pod_shows_per_endpoint(client: Client, stack: Stack) -> None:
    # One backend down: connects to it fail and are retried on the others.
    stack.servers[2].close()
    await stack.servers[2].wait_closed()
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(12):
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy_port())
            await talk(writer, reader, b"z" * 1000)
            opened.append((reader, writer))
        counts = await traffic(client)
        live = {h: t for h, t in counts.items() if h in ("127.0.0.1", "127.0.0.2")}
        # Both live pods got connections, all 12 are open, and the bytes of the open
        # connections are counted (read live from the relays) each way.
        assert all(t["opened"] >= 1 for t in live.values()), counts
        assert sum(t["opened"] for t in live.values()) == 12
        assert sum(t["open"] for t in live.values()) == 12
        assert sum(t["bytesUp"] for t in live.values()) == 12_000
        assert sum(t["bytesDown"] for t in live.values()) == 12_000
        assert counts["127.0.0.3"]["opened"] == 0 and counts["127.0.0.3"]["failed"] >= 1
        assert counts["127.0.0.9"] == {"opened": 0, "open": 0, "failed": 0, "bytesUp": 0,
                                       "bytesDown": 0, "udpFlows": 0, "udpFlowsOpened": 0}
        for _, writer in opened[:5]:
            writer.close()
            await writer.wait_closed()

        async def five_closed() -> dict[str, dict[str, Any]] | None:
            now = await traffic(client)
            return now if sum(t["open"] for t in now.values()) == 7 else None

        after = await wait_until_async(five_closed, timeout=10, message="5 closes to count")
        # Closed connections keep their bytes (added at close); opened does not go down.
        assert sum(t["opened"] for t in after.values()) == 12
        assert sum(t["bytesUp"] for t in after.values()) == 12_000
    finally:
        for _, writer in opened:
            writer.close()


async def test_series_follow_the_traffic(client: Client, stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy_port())
    try:
        await talk(writer, reader, b"s" * 4000)

        async def sampled() -> dict[str, Any] | None:
            response = await client.get("/api/v1/series?service=default/echo")
            data = await response.json()
            items = {i["service"]: i for i in data["items"]}
            echo = items.get("default/echo:tcp")
            if echo and sum(echo["connections"]) and sum(echo["bytesUp"]):
                return dict(data, echo=echo)
            return None

        data = await wait_until_async(sampled, timeout=10, message="a sample with the traffic")
        echo = data["echo"]
        assert data["interval"] == 1 and data["capacity"] == 900
        assert len(echo["connections"]) == len(data["times"]) >= 2
        # The connection was new in one sample (a rate >= 1/s; the sample period is about
        # a second) and is open in the last one; the bytes each way show as a rate too.
        assert max(echo["connections"]) >= 0.5 and echo["open"][-1] == 1
        assert sum(echo["bytesUp"]) > 0 and sum(echo["bytesDown"]) > 0
        assert {i["service"] for i in data["items"]} <= {"default/echo:tcp", "default/echo:alt"}
        assert data["total"]["open"][-1] == 1
    finally:
        writer.close()


async def test_event_log_shows_what_changed(client: Client, stack: Stack) -> None:
    response = await client.get("/api/v1/events")
    first = await response.json()
    kinds = {(e["kind"], e["object"]) for e in first["items"]}
    # The first sync added both services' ports.
    assert ("ServiceAdded", "Service default/echo:tcp") in kinds
    assert ("ServiceAdded", "Service web/site:") in kinds
    assert any(e["kind"] == "Synced" for e in first["items"])

    path = stack.manifest_dir / "services.yaml"
    docs = [json.loads(d) for d in path.read_text().split("\n---\n")]
    docs[1]["endpoints"] = [e for e in docs[1]["endpoints"] if e["addresses"] != ["127.0.0.2"]]
    path.write_text("\n---\n".join(json.dumps(d) for d in docs))

    async def removal() -> list[dict[str, Any]] | None:
        response = await client.get(f"/api/v1/events?since={first['lastSeq']}")
        items: list[dict[str, Any]] = (await response.json())["items"]
        return items if any(e["kind"] == "EndpointRemoved" for e in items) else None

    new = await wait_until_async(removal, timeout=10, message="the removal in the event log")
    removed = {e["object"] for e in new if e["kind"] == "EndpointRemoved"}
    port = stack.backend_port
    assert removed == {f"Endpoint 127.0.0.2:{port} of default/echo:tcp",
                       f"Endpoint 127.0.0.2:{port} of default/echo:alt"}
    assert all(e["seq"] > first["lastSeq"] and e["time"] >= e["firstTime"] for e in new)
    assert (await client.get("/api/v1/events?since=-1")).status == 400
    response = await client.get("/api/v1/events?limit=1")
    assert len((await response.json())["items"]) == 1


async def test_pages_of_services_and_endpoints_busiest_first(client: Client,
                                                             stack: Stack) -> None:
    async def get(path: str, status: int = 200) -> Any:
        response = await client.get(path)
        assert response.status == status, await response.text()
        return await response.json()

    everything = await get("/api/v1/services")
    assert everything["total"] == 2 and len(everything["items"]) == 2
    page = await get("/api/v1/services?offset=1&limit=1")
    assert page["total"] == 2 and page["offset"] == 1
    assert [i["name"] for i in page["items"]] == [everything["items"][1]["name"]]
    assert (await get("/api/v1/services?offset=5"))["items"] == []
    await get("/api/v1/endpoints?offset=-1", status=400)
    await get("/api/v1/endpoints?sort=age", status=400)

    # By name, default/echo comes first; by traffic, web/site once it has a connection.
    assert [i["name"] for i in (await get("/api/v1/endpoints"))["items"]] == ["echo", "site"]
    reader, writer = await asyncio.open_connection("127.0.0.1",
                                                   stack.proxy_port("web", "site", ""))
    try:
        await talk(writer, reader, b"t")
        busiest = await get("/api/v1/endpoints?sort=traffic&limit=1")
        assert [i["name"] for i in busiest["items"]] == ["site"] and busiest["total"] == 2
    finally:
        writer.close()
    series = await get("/api/v1/series?only=total")
    assert series["items"] == [] and "total" in series
    await get("/api/v1/series?only=all", status=400)


async def test_metrics_per_endpoint_and_process(client: Client, stack: Stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy_port())
    try:
        await talk(writer, reader, b"m" * 1234)
        text = await (await client.get("/metrics")).text()
    finally:
        writer.close()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    (backend,) = [c.backend for c in stack.daemon.conns]
    assert backend is not None
    labels = (("endpoint", f"{backend[0]}:{backend[1]}"), ("service", "default/echo:tcp"))
    assert samples[("uproxy_endpoint_connections_total", labels)] == 1
    assert samples[("uproxy_endpoint_connections_active", labels)] == 1
    for direction in ("up", "down"):
        key = ("uproxy_endpoint_bytes_total", tuple(sorted((*labels, ("direction", direction)))))
        assert samples[key] == 1234  # read live from the open connection
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert ("process_cpu_seconds_total", ()) in samples
