"""The incremental sync misses no change: each kind of edit, among other services, through
the files source and a running daemon (sockets only, loopback, no iptables).

A sync hands the protocol proxies only the service ports it changed (issue 16: an
endpoint change among 10,000 services costs one service's work). Whatever the change,
what each proxy serves must equal what the daemon says it serves, and a connection must
go where the manifests say; the services not edited keep their entry objects and their
sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
from pathlib import Path
from typing import Any

import pytest

from tests.status.support import free_port, settings_for
from tests.support.matrix import LOOPS, run_on
from tests.support.waiting import wait_until_async
from uproxy.daemon import Daemon, ListenerKey
from uproxy.demo.node import endpoint_slice, service
from uproxy.model import ServicePortName
from uproxy.sources.files import FilesSource
from uproxy.state import Entry

FILLERS = 30
WEB_TCP = ServicePortName("default", "web", "http", "TCP")
WEB_UDP = ServicePortName("default", "web", "http", "UDP")


def _stamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _web(ip: str, target: int, *, port: int = 80, protocol: str = "TCP") -> list[dict[str, Any]]:
    slice_ = endpoint_slice("web", [ip], [{"name": "http", "port": target,
                                           "protocol": protocol}])
    slice_["metadata"]["annotations"] = {
        "endpoints.kubernetes.io/last-change-trigger-time": _stamp()}
    return [service("web", "10.96.1.1", [{"name": "http", "port": port, "targetPort": target,
                                          "protocol": protocol}]), slice_]


def _fillers(backend_port: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(FILLERS):
        out += [service(f"filler-{i}", f"10.96.2.{i + 1}",
                        [{"name": "http", "port": 80, "targetPort": backend_port}]),
                endpoint_slice(f"filler-{i}", ["127.0.0.3"],
                               [{"name": "http", "port": backend_port, "protocol": "TCP"}])]
    return out


def _write(path: Path, objects: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n---\n".join(json.dumps(o) for o in objects))  # (JSON is YAML)
    tmp.replace(path)


async def _identity_server(host: str, port: int, name: bytes) -> asyncio.Server:
    """Answers every connection with its name, then closes."""
    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, host, port)


async def _ask(port: int) -> bytes:
    """Who answers on the proxy port (b"" when nobody does)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return b""
    try:
        return await asyncio.wait_for(reader.read(100), 2)
    except (OSError, TimeoutError):
        return b""
    finally:
        writer.close()


def _consistent(daemon: Daemon) -> None:
    """What each protocol proxy serves is exactly the served table's entries of its protocol
    (what the whole-table sync gave it by construction)."""
    for proto, proxy in daemon.proxies.items():
        want: dict[ServicePortName, Entry] = {n: e for n, e in daemon.served.items()
                                              if e.port.protocol == proto}
        assert proxy.entries == want, proto
        assert all(proxy.entries[n] is e for n, e in want.items()), proto


def _programmed(daemon: Daemon) -> float:
    for metric in daemon.metrics.network_programming.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    return 0.0


async def _scenario(tmp_path: Path) -> None:
    p1, p2 = free_port(), free_port()
    servers = [await _identity_server("127.0.0.1", p1, b"a"),
               await _identity_server("127.0.0.2", p1, b"b"),
               await _identity_server("127.0.0.1", p2, b"c")]
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    _write(manifests / "fillers.yaml", _fillers(p1))
    web = manifests / "web.yaml"
    _write(web, _web("127.0.0.1", p1))
    daemon = Daemon(settings_for(manifests), FilesSource((str(manifests),)))

    def proxy_port(name: ServicePortName) -> int:
        return daemon.listeners[ListenerKey(name, "cluster", "127.0.0.1", 0)].port

    async def answers(name: ServicePortName, want: bytes, what: str) -> None:
        async def check() -> bool:
            return await _ask(proxy_port(name)) == want

        await wait_until_async(check, timeout=10, message=what)

    try:
        await daemon.start()
        await wait_until_async(lambda: daemon.ready, timeout=10, message="the daemon ready")
        await answers(WEB_TCP, b"a", "the first endpoint to answer")
        _consistent(daemon)
        fillers = {k: v for k, v in daemon.listeners.items() if k.name.name != "web"}
        filler_entries = {n: e for n, e in daemon.proxies["TCP"].entries.items()
                          if n.name != "web"}
        assert len(filler_entries) == FILLERS
        programmed = _programmed(daemon)

        # 1. Endpoint only: the same listener, the new endpoint; its trigger time observed once.
        listener = daemon.listeners[ListenerKey(WEB_TCP, "cluster", "127.0.0.1", 0)]
        _write(web, _web("127.0.0.2", p1))
        await answers(WEB_TCP, b"b", "the endpoint change to apply")
        _consistent(daemon)
        assert daemon.listeners[ListenerKey(WEB_TCP, "cluster", "127.0.0.1", 0)] is listener
        assert _programmed(daemon) == programmed + 1

        # 2. Target port: the same endpoint address, another port.
        _write(web, _web("127.0.0.1", p2))
        await answers(WEB_TCP, b"c", "the target port change to apply")
        _consistent(daemon)

        # 3. Service port: the redirect follows (rules are not applied here: no iptables).
        _write(web, _web("127.0.0.1", p2, port=8080))
        await wait_until_async(
            lambda: [r.port for r in daemon.redirects if r.address == "10.96.1.1"] == [8080],
            timeout=10, message="the redirect to follow the service port")
        _consistent(daemon)
        assert await _ask(proxy_port(WEB_TCP)) == b"c"

        # 4. Protocol: the TCP port goes (entry and socket), a UDP one comes.
        _write(web, _web("127.0.0.1", p2, protocol="UDP"))
        await wait_until_async(lambda: WEB_UDP in daemon.proxies["UDP"].entries,
                               timeout=10, message="the protocol change to apply")
        _consistent(daemon)
        assert WEB_TCP not in daemon.proxies["TCP"].entries
        assert not [k for k in daemon.listeners if k.name == WEB_TCP]
        assert [k.name for k in daemon.listeners if k.name.name == "web"] == [WEB_UDP]

        # 5. Removed: gone from every proxy.
        web.unlink()
        await wait_until_async(lambda: WEB_UDP not in daemon.served,
                               timeout=10, message="the removal to apply")
        _consistent(daemon)
        assert not [k for k in daemon.listeners if k.name.name == "web"]

        # The other services were never touched: same sockets, same entry objects.
        assert {k: v for k, v in daemon.listeners.items() if k.name.name != "web"} == fillers
        assert all(daemon.proxies["TCP"].entries[n] is e for n, e in filler_entries.items())
    finally:
        await daemon.shutdown()
        for server in servers:
            server.close()
            await server.wait_closed()


@pytest.mark.parametrize("loop", LOOPS)
def test_incremental_syncs_apply_every_kind_of_change(tmp_path: Path, loop: str) -> None:
    run_on(loop, lambda: _scenario(tmp_path), timeout=60)
