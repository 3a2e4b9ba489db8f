"""``uproxy get`` (the real CLI, as a subprocess) against a running status server on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.waiting import wait_until_async
from uproxy.status import server
from uproxy.status.client import human_duration
from uproxy.status.views import parse_timestamp

from .support import CREATED, Stack, free_port, running_stack, talk


@dataclass
class Running:
    stack: Stack
    url: str


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_stack(tmp_path) as stack:
        runners = await server.start_servers(stack.daemon)
        try:
            yield Running(stack, f"http://127.0.0.1:{server.bound_port(runners[0])}")
        finally:
            for runner in runners:
                await runner.cleanup()


async def uproxy(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uproxy", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def parse_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Cut every line at the header's column starts: this only gives the right cells when
    the columns are aligned (and at least three spaces apart, as kubectl prints them)."""
    lines = text.rstrip("\n").split("\n")
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    header = lines[0].split()
    assert len(starts) == len(header)
    rows = []
    for line in lines[1:]:
        cells = []
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(line)
            chunk = line[start:end]
            if i + 1 < len(starts):
                assert chunk.endswith("   ") or chunk.strip() == "", (line, chunk)
            assert start == 0 or line[start - 1] == " ", (line, header[i])
            cells.append(chunk.strip())
        rows.append(cells)
    return header, rows


async def test_get_services_table(running: Running) -> None:
    code, out, err = await uproxy("get", "svc", "--status", running.url)
    assert (code, err) == (0, "")
    header, rows = parse_table(out)
    # Two namespaces: the NAMESPACE column comes first, as with kubectl -A.
    assert header == ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    by_name = {r[1]: r for r in rows}
    age = human_duration(time.time() - (parse_timestamp(CREATED) or 0))
    assert by_name["echo"] == ["default", "echo", "ClusterIP", "10.96.0.10", "<none>",
                               "80/TCP,8080/TCP", age]
    node_port = running.stack.node_port
    assert by_name["site"][:6] == ["web", "site", "NodePort", "10.96.0.20", "<none>",
                                   f"443:{node_port}/TCP"]
    assert re.fullmatch(r"\d+s", by_name["site"][6])

    code, out, _ = await uproxy("get", "services", "--status", running.url, "-o", "wide")
    header, rows = parse_table(out)
    assert header[-3:] == ["SELECTOR", "PROXY-PORT(S)", "CLUSTER-IPS"]
    echo = next(r for r in rows if r[1] == "echo")
    tcp, alt = (running.stack.proxy_port(port=p) for p in ("tcp", "alt"))
    assert echo[-3:] == ["app=echo", f"80->{tcp}/TCP,8080->{alt}/TCP", "10.96.0.10"]


async def test_get_endpoints_table(running: Running) -> None:
    port = running.stack.backend_port
    code, out, err = await uproxy("get", "ep", "--status", running.url)
    assert (code, err) == (0, "")
    header, rows = parse_table(out)
    assert header == ["NAMESPACE", "NAME", "ENDPOINTS", "AGE"]
    by_name = {r[1]: r for r in rows}
    assert by_name["echo"][2] == (
        f"127.0.0.1:{port},127.0.0.2:{port},127.0.0.3:{port} + 3 more...")
    assert by_name["site"][2] == f"127.0.0.1:{port}"

    reader, writer = await asyncio.open_connection("127.0.0.1", running.stack.proxy_port())
    try:
        await talk(writer, reader, b"w" * 700)
        code, out, _ = await uproxy("get", "endpoints", "--status", running.url, "-o", "wide")
    finally:
        writer.close()
    kubectl, traffic = out.split("\n\n")
    header, rows = parse_table(kubectl)
    echo = next(r for r in rows if r[1] == "echo")
    assert echo[2].split(",") == [f"127.0.0.{i}:{port}" for i in (1, 2, 3)] * 2
    assert header[-1] == "NOT-READY" and echo[-1] == f"127.0.0.9:{port}"
    # -o wide: a second table, one row per endpoint of each service port, with its traffic.
    header, rows = parse_table(traffic)
    assert header == ["NAMESPACE", "NAME", "ENDPOINT", "PORT", "READY", "OPEN", "CONNECTIONS",
                      "FAILED", "BYTES-IN", "BYTES-OUT", "UDP-FLOWS"]
    tcp = [r for r in rows if r[1] == "echo" and r[3] == "tcp/TCP"]
    assert len(tcp) == 4 and len([r for r in rows if r[1] == "echo"]) == 8
    (busy,) = [r for r in tcp if r[5] == "1"]
    assert busy[4:] == ["true", "1", "1", "0", "700", "700", "0"]
    assert [r[4] for r in tcp if r[2] == f"127.0.0.9:{port}"] == ["false"]


async def test_get_connections_table_and_json(running: Running) -> None:
    code, out, err = await uproxy("get", "conn", "--status", running.url)
    assert (code, out, err) == (0, "", "No resources found.\n")

    reader, writer = await asyncio.open_connection("127.0.0.1", running.stack.proxy_port())
    local = f"127.0.0.1:{writer.get_extra_info('sockname')[1]}"
    try:
        await talk(writer, reader, b"q" * 3000)
        await wait_until_async(
            lambda: any(c.bytes_down >= 3000 for c in running.stack.daemon.conns),
            timeout=10, message="the echo to be counted")
        code, out, err = await uproxy("get", "connections", "--status", running.url)
        assert (code, err) == (0, "")
        header, rows = parse_table(out)
        assert header == ["CLIENT", "SERVICE", "BACKEND", "PROTO", "AGE", "BYTES-IN",
                          "BYTES-OUT", "STATE", "PATH"]
        (row,) = rows
        path = "native" if running.stack.daemon.relay.name == "native" else "python"
        assert row[0] == local and row[1] == "default/echo:tcp" and row[3] == "TCP"
        assert row[2].endswith(f":{running.stack.backend_port}")
        assert re.fullmatch(r"\d+s", row[4])
        assert row[5:] == ["2.9Ki", "2.9Ki", "open", path]

        code, out, _ = await uproxy("get", "conn", "--status", running.url, "-o", "wide")
        header, (row,) = parse_table(out)
        assert header[0] == "ID" and header[-1] == "SCOPE"
        assert row[6:8] == ["3000", "3000"] and row[-1] == "cluster"

        code, out, _ = await uproxy("get", "conn", "--status", running.url, "-o", "json")
        data = json.loads(out)
        assert data["kind"] == "ConnectionList" and data["total"] == 1
        assert data["items"][0]["client"] == local and data["items"][0]["bytes_up"] == 3000
    finally:
        writer.close()
        await writer.wait_closed()


async def test_get_json_is_the_api_document(running: Running) -> None:
    code, out, _ = await uproxy("get", "svc", "--status", running.url, "-o", "json")
    assert code == 0
    data = json.loads(out)
    assert data["kind"] == "ServiceList"
    assert {i["name"] for i in data["items"]} == {"echo", "site"}


async def test_unreachable_status_server_is_one_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, out, err = await uproxy("get", "svc", "--status", url)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"uproxy: cannot reach the status server at {url}: ")
    assert "refused" in err.lower()


async def test_not_a_status_server() -> None:
    from aiohttp import web

    async def html(_: web.Request) -> web.Response:
        return web.Response(text="<html>hi</html>")

    app = web.Application()
    app.router.add_get("/api/v1/services", html)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{server.bound_port(runner)}"
        code, _, err = await uproxy("get", "svc", "--status", url)
        assert code == 1 and err.count("\n") == 1
        assert "did not return JSON" in err
        code, _, err = await uproxy("get", "ep", "--status", url)
        assert code == 1 and "HTTP 404" in err
    finally:
        await runner.cleanup()
