"""Connection set-up on both paths: the engine's (accept, choose, connect in C) and
Python's (:mod:`uproxy.connect` driven by :mod:`uproxy.proxy.tcp`) follow the same table.

Real sockets on loopback, IPv4 and IPv6, the real :class:`~uproxy.proxy.tcp.TcpProxy`
with the flavor's relay; endpoints that misbehave as real ones do, made with the kernel
only: a bound socket that does not listen refuses (RST), a listener whose accept queue is
full drops SYNs (a blackhole: the connect hangs until its timeout). Every test asserts
which path set the connections up (``uproxy_relay_setup_total{path}``), so a native
flavor cannot pass on the Python path by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from tests.support.matrix import Flavor, relay_for, run_on, select_path
from tests.support.sockets import (
    congestion,
    congestion_choices,
    own_tcp_socket,
    segments_in,
    send_with_fin,
)
from uproxy.balance import Balancer
from uproxy.connections import Conn, ConnTable
from uproxy.metrics import Metrics
from uproxy.model import Endpoint, ServicePort, ServicePortName
from uproxy.proxy.tcp import TcpProxy
from uproxy.state import Entry
from uproxy.status.stream import ConnHub

NAME = ServicePortName("default", "svc", "")
FAMILIES = (4, 6)
LOOPBACK = {4: "127.0.0.1", 6: "::1"}
AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def _entry(endpoints: Sequence[tuple[str, int]], *, affinity: int | None = None) -> Entry:
    port = ServicePort(NAME, "ClusterIP", ("10.0.0.1",), 80, "TCP", 80,
                       affinity_timeout=affinity)
    return Entry(port, tuple(Endpoint(ip, p, node_name="node") for ip, p in endpoints))


@dataclass
class Rig:
    family: int
    proxy: TcpProxy
    metrics: Metrics
    conns: ConnTable
    balancer: Balancer
    address: tuple[str, int]
    socks: list[socket.socket] = field(default_factory=list)

    def setup_count(self, path: str) -> float:
        return self.metrics.registry.get_sample_value(
            "uproxy_relay_setup_total", {"path": path}) or 0.0

    async def settle(self, path: str, n: int) -> None:
        """Wait until ``n`` set-ups on ``path`` were counted: under load the engine hands
        its records to Python in batches (at most ~10 ms late), so counts may lag."""
        await _until(lambda: self.setup_count(path) >= n)

    def total(self, result: str) -> float:
        return self.metrics.registry.get_sample_value(
            "uproxy_connections_total",
            {"service": str(NAME), "protocol": "TCP", "result": result}) or 0.0

    def set_endpoints(self, endpoints: Sequence[tuple[str, int]], **kw: int) -> None:
        self.proxy.entries = {NAME: _entry(endpoints, **kw)}

    def refusing(self) -> tuple[str, int]:
        """An address whose connects get RST: bound, not listening."""
        sock = socket.socket(AF[self.family], socket.SOCK_STREAM)
        sock.bind((LOOPBACK[self.family], 0))
        self.socks.append(sock)
        return sock.getsockname()[:2]

    def blackhole(self) -> tuple[str, int]:
        """An address whose connects hang: a listener with a full accept queue drops SYNs."""
        lsock = socket.socket(AF[self.family], socket.SOCK_STREAM)
        lsock.bind((LOOPBACK[self.family], 0))
        lsock.listen(0)
        self.socks.append(lsock)
        address = lsock.getsockname()[:2]
        for _ in range(2):  # fill the queue (backlog 0 holds one); never accepted
            filler = socket.socket(AF[self.family], socket.SOCK_STREAM)
            filler.settimeout(0.5)
            with contextlib.suppress(OSError):
                filler.connect(address)
            self.socks.append(filler)
        return address

    async def connect(self, source: str | None = None) -> tuple[bytes | None, str | None, float]:
        """One client (from address ``source``, else the kernel's choice): (the tag its
        backend sent, or None; the error; seconds taken)."""
        start = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(
                *self.address, local_addr=(source, 0) if source else None)
        except OSError as exc:
            return None, type(exc).__name__, time.monotonic() - start
        try:
            tag = await reader.read(1)
            return (tag or None), (None if tag else "eof"), time.monotonic() - start
        except OSError as exc:
            return None, type(exc).__name__, time.monotonic() - start
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _tagged_backend(family: int, tag: bytes) -> tuple[asyncio.Server, tuple[str, int]]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(tag)
        with contextlib.suppress(OSError):
            await writer.drain()
            await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(serve, LOOPBACK[family], 0)
    return server, server.sockets[0].getsockname()[:2]


@contextlib.asynccontextmanager
async def rig(flavor: Flavor, family: int, congestion: str = "",
              defer: bool = False) -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    relay = relay_for(flavor, loop)
    metrics, conns = Metrics(), ConnTable()
    balancer = Balancer(node_name="node")
    proxy = TcpProxy(loop=loop, relay=relay, balancer=balancer, conns=conns, metrics=metrics,
                     congestion=congestion)
    lsock = socket.socket(AF[family], socket.SOCK_STREAM)
    lsock.bind((LOOPBACK[family], 0))
    lsock.listen(128)
    lsock.setblocking(False)
    if defer:
        proxy.defer()
    listener = proxy.listen(lsock, NAME, "cluster")
    r = Rig(family, proxy, metrics, conns, balancer, lsock.getsockname()[:2])
    try:
        yield r
    finally:
        listener.close()
        await proxy.drain(0.5)
        for sock in r.socks:
            sock.close()


def _run(flavor: Flavor, main: object, timeout: float = 60.0) -> None:
    run_on(select_path(flavor), main, timeout=timeout)  # type: ignore[arg-type]


def _path(flavor: Flavor) -> str:
    return "native" if flavor.native else "python"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_refusing_endpoint_sends_the_client_to_the_next(flavor: Flavor, family: int) -> None:
    async def main() -> None:
        async with rig(flavor, family) as r:
            server, good = await _tagged_backend(family, b"G")
            async with server:
                r.set_endpoints([r.refusing(), good])
                results = [await r.connect() for _ in range(20)]
                assert [tag for tag, _, _ in results] == [b"G"] * 20, results
                await r.settle(_path(flavor), 20)
                # The refusal was learnt: counted once per failure, and avoided after it.
                failed = r.conns.services[NAME].failed
                assert 1 <= failed < 20, failed
                assert r.setup_count(_path(flavor)) == 20
                assert r.total("ok") == 20

    _run(flavor, main)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_blackholed_endpoint_is_left_after_250_ms(flavor: Flavor, family: int) -> None:
    async def main() -> None:
        async with rig(flavor, family) as r:
            server, good = await _tagged_backend(family, b"G")
            async with server:
                hole = r.blackhole()
                # The good one failed a moment ago: the first choice is the blackhole.
                r.balancer.connect_failed(Endpoint(*good), time.monotonic())
                r.set_endpoints([hole, good])
                tag, error, took = await r.connect()
                assert (tag, error) == (b"G", None)
                assert 0.2 <= took < 0.9, took
                await r.settle(_path(flavor), 1)
                assert r.conns.services[NAME].by_endpoint[hole].failed == 1
                assert r.setup_count(_path(flavor)) == 1

    _run(flavor, main)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_endpoint_failing_resets_the_client(flavor: Flavor, family: int) -> None:
    async def main() -> None:
        async with rig(flavor, family) as r:
            r.set_endpoints([r.refusing(), r.refusing()])
            tag, error, took = await r.connect()
            assert tag is None and error in ("ConnectionResetError", "eof"), error
            assert error == "ConnectionResetError"
            assert took < 0.5, took
            await _until(lambda: r.total("connect_failed") == 1)
            assert r.conns.services[NAME].failed == 2
            assert r.conns.services[NAME].open == 0

    _run(flavor, main)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_endpoints_resets_at_once(flavor: Flavor, family: int) -> None:
    async def main() -> None:
        async with rig(flavor, family) as r:
            r.set_endpoints([])
            tag, error, took = await r.connect()
            assert (tag, error) == (None, "ConnectionResetError")
            assert took < 0.2, took
            await _until(lambda: r.total("no_endpoints") == 1)

    _run(flavor, main)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_deferred_listener_keeps_its_clients_waiting_until_its_entry(flavor: Flavor,
                                                                        family: int) -> None:
    """The daemon's first sync opens every listener first and hands them to the engine (or
    the loop) with their endpoints afterwards: a client that comes in between waits in
    the kernel's backlog, then is served, on the flavor's path."""
    async def main() -> None:
        server, backend = await _tagged_backend(family, b"A")
        try:
            async with rig(flavor, family, defer=True) as r:
                pending = asyncio.ensure_future(r.connect())
                await asyncio.sleep(0.3)
                assert not pending.done()  # neither served nor reset: not accepted yet
                assert r.setup_count("native") + r.setup_count("python") == 0
                r.proxy.update_entries({NAME: _entry([backend])})
                r.proxy.undefer()
                tag, error, _ = await asyncio.wait_for(pending, 10)
                assert (tag, error) == (b"A", None)
                await r.settle(_path(flavor), 1)
        finally:
            server.close()

    _run(flavor, main)


def test_deferred_listeners_get_their_own_endpoints_in_one_hand_over(flavor: Flavor) -> None:
    """The first sync's listeners (deferred; the engine takes them in one call,
    ``TcpProxy._attach_many``) of several service ports and both families: each serves its
    own endpoints of its family, on the flavor's path; one whose service port got no
    entry waits (after undefer too) until it gets one: with no endpoints, a reset."""
    async def main() -> None:
        names = {tag: ServicePortName("default", f"svc-{tag.decode().lower()}", "")
                 for tag in (b"A", b"B", b"C")}
        servers, entries, addresses, socks = [], {}, {}, []
        async with rig(flavor, 4, defer=True) as r:
            try:
                for tag, name in names.items():
                    backends = []
                    for family in FAMILIES:
                        server, backend = await _tagged_backend(family, tag + bytes([48 + family]))
                        servers.append(server)
                        backends.append(backend)
                        lsock = socket.socket(AF[family], socket.SOCK_STREAM)
                        socks.append(lsock)
                        lsock.bind((LOOPBACK[family], 0))
                        lsock.listen(128)
                        lsock.setblocking(False)
                        listener = r.proxy.listen(lsock, name, "cluster")
                        socks.append(listener)  # type: ignore[arg-type]
                        addresses[(tag, family)] = lsock.getsockname()[:2]
                    port = ServicePort(name, "ClusterIP", ("10.0.0.1", "fd00::1"), 80, "TCP", 80)
                    entries[name] = Entry(port, tuple(Endpoint(ip, p, node_name="node")
                                                      for ip, p in backends))
                waiting = asyncio.ensure_future(_connect(addresses[(b"A", 6)]))
                await asyncio.sleep(0.2)
                assert not waiting.done()  # deferred: in the kernel's backlog
                r.proxy.update_entries({names[b"A"]: entries[names[b"A"]],
                                        names[b"B"]: entries[names[b"B"]]})
                assert await asyncio.wait_for(waiting, 10) == b"A6"
                for tag in (b"A", b"B"):
                    for family in FAMILIES:
                        for _ in range(3):
                            got = await _connect(addresses[(tag, family)])
                            assert got == tag + bytes([48 + family]), (tag, family, got)
                unserved = asyncio.ensure_future(_connect(addresses[(b"C", 4)]))
                await asyncio.sleep(0.2)
                assert not unserved.done()  # no entry yet: still deferred
                r.proxy.undefer()  # (accepting from now on, nothing to send it to yet)
                r.proxy.update_entries({names[b"C"]: Entry(entries[names[b"C"]].port, ())})
                assert await asyncio.wait_for(unserved, 10) is None
                await r.settle(_path(flavor), 13)
            finally:
                for server in servers:
                    server.close()
                for sock in socks:
                    sock.close()

    _run(flavor, main)


async def _connect(address: tuple[str, int]) -> bytes | None:
    """One client of ``address``: the tag its backend sent, or None (reset or closed)."""
    try:
        reader, writer = await asyncio.open_connection(*address)
    except OSError:
        return None
    try:
        return await reader.read(2) or None
    except OSError:
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_deferred_listener_closed_before_its_entry_stays_closed(flavor: Flavor,
                                                                   family: int) -> None:
    async def main() -> None:
        async with rig(flavor, family, defer=True) as r:
            next(iter(r.proxy._listeners[NAME])).close()  # (the sync closed it: service gone)
            r.proxy.update_entries({NAME: _entry([("127.0.0.1", 9)])})
            r.proxy.undefer()
            tag, error, _ = await r.connect()
            assert (tag, error) == (None, "ConnectionRefusedError")
            assert r.setup_count("native") + r.setup_count("python") == 0

    _run(flavor, main)


@contextlib.contextmanager
def _speak_and_close(family: int, data: bytes) -> Iterator[tuple[str, int]]:
    """A backend on its own thread that sends at once and closes: its bytes and FIN
    usually arrive before the proxy has even seen its connect complete."""
    lsock = socket.socket(AF[family], socket.SOCK_STREAM)
    lsock.bind((LOOPBACK[family], 0))
    lsock.listen(128)
    lsock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.sendall(data)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield lsock.getsockname()[:2]
    finally:
        stop.set()
        thread.join(5)
        lsock.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_backend_that_speaks_and_closes_at_once_is_relayed_to_the_end(
        flavor: Flavor, family: int) -> None:
    """The bytes and the FIN that came with the connect reach the client, every time."""
    async def main() -> None:
        async with rig(flavor, family) as r:
            with _speak_and_close(family, b"hello") as address:
                r.set_endpoints([address])
                for _ in range(100):
                    reader, writer = await asyncio.open_connection(*r.address)
                    try:
                        assert await asyncio.wait_for(reader.read(), 5) == b"hello"
                    finally:
                        writer.close()
                await r.settle(_path(flavor), 100)
                assert r.setup_count(_path(flavor)) == 100

    _run(flavor, main)


# chi-square with 3 bins (2 degrees of freedom): P(X > 13.82) = 0.001
CHI2_P001_DF2 = 13.82


@pytest.mark.parametrize("family", FAMILIES)
def test_the_choice_is_uniform(flavor: Flavor, family: int) -> None:
    async def main() -> None:
        async with rig(flavor, family) as r:
            servers = [await _tagged_backend(family, tag) for tag in (b"A", b"B", b"C")]
            try:
                r.set_endpoints([address for _, address in servers])
                n = 600
                counts = {b"A": 0, b"B": 0, b"C": 0}
                for _ in range(n):
                    tag, error, _ = await r.connect()
                    assert tag in counts, error
                    counts[tag] += 1
                expected = n / 3
                chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
                assert chi2 < CHI2_P001_DF2, counts
                await r.settle(_path(flavor), n)
                assert r.setup_count(_path(flavor)) == n
                assert r.setup_count("python" if flavor.native else "native") == 0
            finally:
                for server, _ in servers:
                    server.close()

    _run(flavor, main, timeout=120.0)


def test_client_ip_affinity_is_set_up_in_the_engine(native_flavor: Flavor) -> None:
    """The engine does ClientIP affinity (native/affinity.c): such a service stays on the
    native path, with and without its affinity, and its pins go when the affinity does."""
    async def main() -> None:
        async with rig(native_flavor, 4) as r:
            server, good = await _tagged_backend(4, b"G")
            async with server:
                r.set_endpoints([good], affinity=10800)
                assert (await r.connect())[0] == b"G"
                await r.settle("native", 1)
                assert r.setup_count("native") == 1 and r.setup_count("python") == 0
                assert r.proxy.affinity_count() == 1
                r.set_endpoints([good])
                assert (await r.connect())[0] == b"G"
                await r.settle("native", 2)
                assert r.setup_count("native") == 2 and r.setup_count("python") == 0
                assert r.proxy.affinity_count() == 0

    _run(native_flavor, main)


def test_a_paused_listener_accepts_nothing_until_resumed(flavor: Flavor) -> None:
    """Takeover's pause/resume hold on both paths (the backlog waits in the kernel)."""
    async def main() -> None:
        async with rig(flavor, 4) as r:
            server, good = await _tagged_backend(4, b"G")
            async with server:
                r.set_endpoints([good])
                (listener,) = r.proxy._listeners[NAME]
                listener.pause()
                pending = asyncio.ensure_future(r.connect())
                await asyncio.sleep(0.3)
                assert not pending.done()
                assert r.setup_count(_path(flavor)) == 0
                listener.resume()
                tag, error, _ = await pending
                assert (tag, error) == (b"G", None)
                await r.settle(_path(flavor), 1)
                assert r.setup_count(_path(flavor)) == 1

    _run(flavor, main)


async def _until(check: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _fetch_all(address: tuple[str, int], family: int, count: int) -> list[bytes]:
    """``count`` clients one after another, each reading until the backend's EOF."""
    got = []
    for _ in range(count):
        with socket.socket(AF[family], socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(address)
            data = b""
            while chunk := sock.recv(64):
                data += chunk
            got.append(data)
    return got


async def _short_ones(r: Rig, flavor: Flavor, address: tuple[str, int], count: int) -> None:
    """``count`` clients that each fetch ``address``'s "hello" (the only endpoint) and go;
    on the native flavor with the loop blocked throughout, so that the engine's OPENED and
    DONE of every one arrive in one batch. Returns once the table counted all closed."""
    r.set_endpoints([address])
    if flavor.native:  # the engine needs no loop: block it for the whole run
        got = _fetch_all(r.address, r.family, count)
    else:
        got = await asyncio.to_thread(_fetch_all, r.address, r.family, count)
    assert got == [b"hello"] * count
    await _until(lambda: NAME in r.conns.services
                 and r.conns.services[NAME].opened == count
                 and r.conns.services[NAME].open == 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("watched", [False, True], ids=["unwatched", "watched"])
def test_connections_that_end_within_one_batch_are_counted_as_any_other(
        flavor: Flavor, family: int, watched: bool) -> None:
    """On the native flavor the loop is kept busy while the clients come and go, so the
    engine's OPENED and DONE of every one arrive in one batch: unwatched, they get no
    table entry (ConnTable.opened_and_closed); the tallies, metrics and ids must come out
    as the Python twin's, and a status stream (a subscriber) still sees each of them."""
    count = 12

    async def main() -> None:
        async with rig(flavor, family) as r:
            seen: list[tuple[str, int]] = []
            if watched:
                r.conns.subscribers.add(lambda event, conn: seen.append((event, conn.id)))
            with _speak_and_close(family, b"hello") as address:
                await _short_ones(r, flavor, address, count)
                tally = r.conns.services[NAME]
                at = tally.by_endpoint[address]
                assert (tally.bytes_up, tally.bytes_down, tally.failed) == (0, 5 * count, 0)
                assert (at.opened, at.open, at.bytes_up, at.bytes_down) == (count, 0, 0, 5 * count)
                assert len(r.conns) == 0
                assert r.total("ok") == count
                assert r.setup_count(_path(flavor)) == count
                sample = r.metrics.registry.get_sample_value
                assert sample("uproxy_connections_active",
                              {"service": str(NAME), "protocol": "TCP"}) == 0
                assert sample("uproxy_bytes_total",
                              {"service": str(NAME), "direction": "down"}) == 5 * count
                assert sample("uproxy_relay_connections_total",
                              {"path": r.proxy.relay.name}) == count
                if watched:
                    assert sorted(e for e, _ in seen) == sorted(
                        ["open", "update", "close"] * count)
                    assert sorted({i for _, i in seen}) == list(range(1, count + 1))
                # The ids went on as if every connection had had an entry.
                later: list[int] = []
                r.conns.subscribers.add(lambda event, conn: later.append(conn.id))
                assert await asyncio.to_thread(_fetch_all, r.address, family, 1) == [b"hello"]
                await _until(lambda: bool(later))
                assert later[0] == count + 1

    _run(flavor, main)


class _CountingHub(ConnHub):
    """The status stream's hub, counting the table events it hears."""

    def __init__(self, conns: ConnTable) -> None:
        super().__init__(conns)
        self.heard = 0

    def _on_event(self, event: str, conn: Conn) -> None:
        self.heard += 1
        super()._on_event(event, conn)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_open_status_stream_costs_short_connections_no_entry(
        flavor: Flavor, family: int) -> None:
    """The status stream never sends a connection that opened and closed between two of
    its flushes, so it subscribes as ``brief_blind``: with only a stream open, the engine's
    connections that end within one batch are counted as unwatched ones are (no entry, no
    event; the Python twin's still get both), while a connection that lives on reaches
    the stream as a row; the tallies come out the same either way."""
    count = 12

    async def main() -> None:
        async with rig(flavor, family) as r:
            hub = _CountingHub(r.conns)
            watcher = hub.add()
            assert not r.conns.sees_brief()
            with _speak_and_close(family, b"hello") as address:
                await _short_ones(r, flavor, address, count)
                tally = r.conns.services[NAME]
                assert (tally.bytes_up, tally.bytes_down) == (0, 5 * count)
                assert hub.heard == (0 if flavor.native else 3 * count)
            server, longer = await _tagged_backend(family, b"t")
            try:
                r.set_endpoints([longer])
                reader, writer = await asyncio.open_connection(*r.address)
                assert await reader.read(1) == b"t"
                await _until(lambda: len(r.conns) == 1)  # (after the hold, by itself)
                hub.flush()
                kind, data = watcher.queue.get_nowait().split("\n", 2)[:2]
                assert kind == "event: snapshot", kind
                assert [row["id"] for row in json.loads(data[len("data: "):])["items"]] == \
                    [count + 1]
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                await _until(lambda: len(r.conns) == 0)
            finally:
                server.close()
                await server.wait_closed()
            hub.remove(watcher)
            assert not r.conns.subscribers and not r.conns.brief_blind

    _run(flavor, main)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_live_connection_is_in_the_table_for_readers_and_soon_without_one(
        flavor: Flavor, family: int) -> None:
    """The engine's OPENED may wait in Python for its DONE (nativerelay.HOLD_OPENED, a short
    connection then needs no table entry). A connection that lives on must still be in the
    table at once for a reader (``catch_up``, what the status API and /metrics call), and
    within the hold without one; closed, it leaves the table with its bytes counted."""

    async def main() -> None:
        async with rig(flavor, family) as r:
            server, address = await _tagged_backend(family, b"t")
            try:
                r.set_endpoints([address])
                clients = []
                for _ in range(2):
                    reader, writer = await asyncio.open_connection(*r.address)
                    assert await reader.read(1) == b"t"  # connected through the proxy
                    clients.append(writer)
                    if len(clients) == 1:  # a reader: everything the engine did is known
                        r.proxy.relay.catch_up()
                        assert [c.backend for c in r.conns] == [address]
                        assert len(r.proxy.live) == 1
                # no reader: the second one shows up by itself (the hold is 50 ms)
                await _until(lambda: len(r.conns) == 2 and len(r.proxy.live) == 2)
                assert all(c.state == "open" and c.backend == address for c in r.conns)
                assert r.conns.services[NAME].open == 2
                await r.settle(_path(flavor), 2)
                for writer in clients:
                    writer.write(b"abc")
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
                await _until(lambda: len(r.conns) == 0 and not r.proxy.live)
                tally = r.conns.services[NAME]
                assert (tally.opened, tally.open, tally.bytes_up, tally.bytes_down) == (
                    2, 0, 6, 2)
            finally:
                server.close()
                await server.wait_closed()

    _run(flavor, main)


class _Greeter:
    """A backend on its own thread: per connection, how its handshake and the client's
    first bytes came (TCP_INFO's segments, counted when accept returns and after reading
    ``expect`` bytes), then ``greeting`` + FIN in one segment, or, with ``expect`` 0, the
    greeting first (a server-first protocol) and then the client's bytes."""

    def __init__(self, family: int, expect: int, greeting: bytes) -> None:
        self.lsock = socket.socket(AF[family], socket.SOCK_STREAM)
        self.lsock.bind((LOOPBACK[family], 0))
        self.lsock.listen(16)
        self.lsock.settimeout(0.2)
        self.address = self.lsock.getsockname()[:2]
        self.expect, self.greeting = expect, greeting
        self.seen: list[tuple[bytes, tuple[int, int]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                if not self.expect:
                    conn.sendall(self.greeting)
                got = b""
                while len(got) < max(self.expect, 1):
                    chunk = conn.recv(64)
                    if not chunk:
                        break
                    got += chunk
                self.seen.append((got, segments_in(conn)))
                if self.expect:
                    send_with_fin(conn, self.greeting)
                with contextlib.suppress(OSError):
                    while conn.recv(64):
                        pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.lsock.close()


@contextlib.asynccontextmanager
async def _greeter_rig(flavor: Flavor, family: int, expect: int,
                       greeting: bytes) -> AsyncIterator[tuple[Rig, _Greeter]]:
    """:func:`rig` whose one endpoint is a :class:`_Greeter`."""
    async with rig(flavor, family) as r:
        greeter = _Greeter(family, expect, greeting)
        r.set_endpoints([greeter.address])
        try:
            yield r, greeter
        finally:
            await asyncio.to_thread(greeter.close)  # (the loop relays its last FIN)


def _speaking_client(family: int, address: tuple[str, int], data: bytes) -> socket.socket:
    """A client whose handshake's last ACK leaves with ``data`` (TCP_DEFER_ACCEPT on its own
    socket): its bytes are there when the proxy accepts it, every time."""
    sock = socket.socket(AF[family], socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    sock.settimeout(5)
    sock.connect(address)
    sock.sendall(data)
    return sock


@pytest.mark.parametrize("family", FAMILIES)
def test_the_handshake_ack_to_the_endpoint_leaves_with_the_clients_first_bytes(
        flavor: Flavor, family: int) -> None:
    """A client that has spoken by the time it is accepted: the proxy's connect to the
    endpoint holds its handshake's last ACK back (TCP_DEFER_ACCEPT on the connecting
    socket) and sends it with those bytes. The endpoint sees SYN, then ACK+data: two
    segments, one with data -- not SYN, ACK, data. Both paths do it."""
    async def main() -> None:
        async with _greeter_rig(flavor, family, 4, b"pong") as (r, greeter):
            acks = r.proxy.relay.stats().get("acks_with_data", 0)
            for _ in range(5):
                sock = await asyncio.to_thread(_speaking_client, family, r.address, b"ping")
                try:
                    answer = await asyncio.to_thread(_recv_all, sock)
                finally:
                    sock.close()
                assert answer == b"pong"  # (sent after the greeter noted what it saw)
            await r.settle(_path(flavor), 5)
            assert [got for got, _ in greeter.seen] == [b"ping"] * 5
            assert [segs for _, segs in greeter.seen] == [(2, 1)] * 5
            if flavor.native:
                assert r.proxy.relay.stats()["acks_with_data"] == acks + 5

    _run(flavor, main)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_client_that_has_not_spoken_does_not_hold_the_handshake_back(
        flavor: Flavor, family: int) -> None:
    """The other side of the rule above: a client that waits for the server to speak
    first (SMTP, MySQL, SSH) must not have the endpoint's accept wait for a held ACK (the
    kernel would send it alone only after 200 ms): the greeting comes at once."""
    async def main() -> None:
        async with _greeter_rig(flavor, family, 0, b"220 ready\r\n") as (r, greeter):
            acks = r.proxy.relay.stats().get("acks_with_data", 0)
            took = []
            for _ in range(3):
                start = time.monotonic()
                reader, writer = await asyncio.open_connection(*r.address)
                try:
                    assert await asyncio.wait_for(reader.readexactly(11), 5) \
                        == b"220 ready\r\n"
                    took.append(time.monotonic() - start)
                    writer.write(b"QUIT")
                    await writer.drain()
                finally:
                    writer.close()
            await r.settle(_path(flavor), 3)
            await _until(lambda: len(greeter.seen) == 3)
            assert [got for got, _ in greeter.seen] == [b"QUIT"] * 3
            # a held ACK would cost each connection 200 ms; a fast one takes a few ms
            assert sorted(took)[1] < 0.15, took
            if flavor.native:
                assert r.proxy.relay.stats()["acks_with_data"] == acks

    _run(flavor, main)


def _recv_all(sock: socket.socket) -> bytes:
    got = b""
    while chunk := sock.recv(64):
        got += chunk
    return got


@pytest.mark.parametrize("family", FAMILIES)
def test_relay_congestion_control_is_set_on_both_sides(flavor: Flavor, family: int) -> None:
    """--relay-congestion-control: the proxy's accepted socket (from its listener) and its
    backend socket (set by the engine or by the Python path) use it."""
    default, other = congestion_choices(AF[family])
    if not other:
        pytest.skip(f"no congestion control allowed here besides {default}")

    async def main() -> None:
        async with rig(flavor, family, congestion=other[0]) as r:
            peers: list[tuple[str, int]] = []

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                peers.append(writer.get_extra_info("peername")[:2])
                writer.write(b"G")
                with contextlib.suppress(OSError):
                    await writer.drain()
                    await reader.read()
                writer.close()

            server = await asyncio.start_server(serve, LOOPBACK[family], 0)
            async with server:
                backend = server.sockets[0].getsockname()[:2]
                r.set_endpoints([backend])
                reader, writer = await asyncio.open_connection(*r.address)
                try:
                    assert await reader.read(1) == b"G"
                    client = writer.get_extra_info("sockname")[:2]
                    near = own_tcp_socket(r.address, client)
                    far = own_tcp_socket(peers[0], backend)
                    assert near is not None and far is not None
                    try:
                        assert (congestion(near), congestion(far)) == (other[0], other[0])
                    finally:
                        near.close()
                        far.close()
                    await r.settle(_path(flavor), 1)
                finally:
                    writer.close()

    _run(flavor, main)
