"""UDP flow bookkeeping (LRU, expiry, eviction), conntrack parsing and matching, and the UDP
proxy itself over real sockets on loopback (no root, no namespace, no iptables).

Conntrack is disabled here (these tests do not own the root namespace's table); the lab
tests in tests/udp/test_udp.py exercise it for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import pytest

from tests.support.matrix import Flavor, run_on
from tests.support.waiting import wait_until_async
from uproxy import native
from uproxy.balance import Balancer
from uproxy.connections import ConnTable
from uproxy.conntrack import Conntrack, CtEntry, Stale, parse_entries, select
from uproxy.metrics import Metrics
from uproxy.model import Endpoint, ServicePort, ServicePortName
from uproxy.proxy.udp import IP_PKTINFO, FlowLru, UdpProxy, default_max_flows
from uproxy.settings import Settings
from uproxy.state import Entry

# --- FlowLru (pure) ----------------------------------------------------------------------------


@dataclass(eq=False)
class Item:
    name: str
    last: float = 0.0


def test_lru_expires_oldest_first_and_touch_keeps_alive() -> None:
    lru: FlowLru[Item] = FlowLru(10)
    a, b, c = Item("a"), Item("b"), Item("c")
    lru.add(a, 0.0)
    lru.add(b, 1.0)
    lru.add(c, 2.0)
    lru.touch(a, 3.0)  # a is now the most recent
    assert lru.oldest() is b
    assert lru.next_expiry(5.0) == 6.0
    assert lru.expired(6.5, 5.0) == [b]
    assert lru.expired(7.5, 5.0) == [c]
    assert list(lru) == [a] and len(lru) == 1
    assert lru.expired(7.9, 5.0) == []
    assert lru.expired(8.0, 5.0) == [a]
    assert lru.next_expiry(5.0) is None and lru.oldest() is None


def test_lru_bound_and_victim_respects_min_idle() -> None:
    lru: FlowLru[Item] = FlowLru(2, evict_min_idle=1.0)
    a, b = Item("a"), Item("b")
    lru.add(a, 10.0)
    lru.add(b, 10.2)
    assert lru.full
    with pytest.raises(OverflowError):
        lru.add(Item("c"), 10.3)
    assert lru.victim(10.5) is None  # everyone active within the last second: drop newcomers
    assert lru.victim(11.0) is a
    lru.touch(a, 11.0)
    assert lru.victim(11.1) is None
    assert lru.victim(11.2) is b
    lru.remove(b)
    assert not lru.full and b not in lru and a in lru
    lru.remove(b)  # idempotent


def test_lru_rejects_a_zero_bound() -> None:
    with pytest.raises(ValueError):
        FlowLru(0)


def test_max_flows_parameter_and_the_fd_limit() -> None:
    assert default_max_flows(nofile=1 << 20) == 65536
    assert default_max_flows(nofile=20000) == 10000  # half the descriptors at most
    assert default_max_flows(nofile=1024) == 512

    async def body() -> None:
        def proxy(max_flows: int | None) -> UdpProxy:
            return UdpProxy(loop=asyncio.get_running_loop(), balancer=Balancer(node_name="n"),
                            conns=ConnTable(), metrics=Metrics(), settings=Settings(),
                            max_flows=max_flows, conntrack=Conntrack(enabled=False),
                            native=False)
        assert proxy(32).flows.max_flows == 32  # the udp_max_flows setting, when given
        assert proxy(None).flows.max_flows == default_max_flows()
        with pytest.raises(ValueError):
            proxy(0)

    run_on("asyncio", body)


# --- conntrack (pure parts) --------------------------------------------------------------------

LISTING = """\
udp      17 29 src=10.99.0.2 dst=10.0.0.10 sport=40001 dport=53 src=10.99.0.1 dst=10.99.0.2 \
sport=41234 dport=40001 mark=0 use=1
udp      17 25 src=10.99.0.2 dst=10.0.0.10 sport=40002 dport=53 [UNREPLIED] src=10.99.0.1 \
dst=10.99.0.2 sport=39999 dport=40002 mark=0 use=1
udp      17 20 src=10.99.0.2 dst=10.0.0.10 sport=40003 dport=53 [UNREPLIED] src=10.0.0.10 \
dst=10.99.0.2 sport=53 dport=40003 mark=0 use=1
udp      17 170 src=172.17.0.1 dst=172.17.0.2 sport=50000 dport=53 src=172.17.0.2 \
dst=172.17.0.1 sport=53 dport=50000 [ASSURED] mark=0 use=1
udp      17 10 src=172.17.0.1 dst=172.17.0.3 sport=50001 dport=53 src=172.17.0.3 \
dst=172.17.0.1 sport=53 dport=50001 mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.99.0.2 dst=10.0.0.10 sport=1 dport=53 src=10.99.0.1 \
dst=10.99.0.2 sport=2 dport=1 [ASSURED] mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 6 flow entries have been shown.
"""


def test_parse_entries_reads_both_tuples_and_skips_other_protocols() -> None:
    entries = parse_entries(LISTING)
    assert len(entries) == 5
    first = entries[0]
    assert (first.orig_src, first.orig_dst, first.orig_sport, first.orig_dport) == (
        "10.99.0.2", "10.0.0.10", 40001, 53)
    assert (first.reply_src, first.reply_sport) == ("10.99.0.1", 41234)
    assert first.delete_line() == (
        "-D -p udp -s 10.99.0.2 -d 10.0.0.10 --sport 40001 --dport 53")
    assert len(parse_entries(LISTING, "tcp")) == 1


def _ports(found: list[CtEntry]) -> list[int]:
    return [e.orig_sport for e in found]


def test_select_removed_frontend_takes_every_entry_to_it() -> None:
    found = select(parse_entries(LISTING), [Stale.frontend("10.0.0.10", 53)])
    assert _ports(found) == [40001, 40002, 40003]


def test_select_new_frontend_keeps_entries_already_on_the_current_proxy_port() -> None:
    # 40001 is redirected to the current proxy port 41234 (kept); 40002 to an old port and
    # 40003 not NATed at all (sent before the rule existed): both stale.
    found = select(parse_entries(LISTING), [Stale.frontend("10.0.0.10", 53, keep_reply_port=41234)])
    assert _ports(found) == [40002, 40003]
    both = select(parse_entries(LISTING), [Stale.frontend("10.0.0.10", 53, keep_reply_port=41234),
                                           Stale.frontend("10.0.0.10", 53)])
    assert _ports(both) == [40001, 40002, 40003]


def test_select_endpoint_by_reply_source() -> None:
    found = select(parse_entries(LISTING), [Stale.endpoint("172.17.0.2", 53)])
    assert _ports(found) == [50000]
    assert select(parse_entries(LISTING), [Stale.endpoint("172.17.0.2", 54)]) == []


async def test_conntrack_missing_binary_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    ct = Conntrack(binary="/nonexistent/conntrack")
    assert await ct.delete([Stale.frontend("10.0.0.10", 53)]) == 0
    assert await ct.delete([Stale.frontend("10.0.0.10", 53)]) == 0
    assert not ct.available
    assert sum("not installed" in r.message for r in caplog.records) == 1


async def test_conntrack_failure_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    ct = Conntrack(binary="false")  # exits 1 without a word
    for _ in range(3):
        assert await ct.delete([Stale.endpoint("172.17.0.2", 53)]) == 0
    assert ct.available
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "failed (exit 1)" in warnings[0].message


async def test_conntrack_timeout_kills_the_tool(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    slow = tmp_path / "conntrack"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    ct = Conntrack(binary=str(slow), timeout=0.2)
    started = asyncio.get_running_loop().time()
    assert await ct.delete([Stale.frontend("10.0.0.10", 53)]) == 0
    assert asyncio.get_running_loop().time() - started < 5
    assert any("timed out" in r.message for r in caplog.records)


# --- the proxy over loopback ---------------------------------------------------------------------

NAME = ServicePortName("default", "dns", "dns", "UDP")


def entry_for(*ports: int, affinity: int | None = None, host: str = "127.0.0.1") -> Entry:
    cluster_ips = ("fd00::10",) if ":" in host else ("10.0.0.10",)
    port = ServicePort(name=NAME, type="ClusterIP", cluster_ips=cluster_ips,
                       port=53, protocol="UDP", target_port=53, affinity_timeout=affinity)
    return Entry(port, tuple(Endpoint(host, p) for p in ports))


class Backend(asyncio.DatagramProtocol):
    """whoami -> the port; anything else echoed."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.received += 1
        assert self.transport is not None
        self.transport.sendto(str(self.port).encode() if data == b"whoami" else data, addr)


# Every proxy test runs on both loops and both paths (the ``flavor`` fixture): the native
# batches (recvmmsg/sendmmsg, native/udp.c) and the socket module's one call per datagram.


@dataclass
class Setup:
    proxy: UdpProxy
    port: int
    backends: list[Backend]
    conns: ConnTable
    metrics: Metrics


@contextlib.asynccontextmanager
async def setup(flavor: Flavor, backends: int = 2, *, timeout: float = 30.0, max_flows: int = 64,
                evict_min_idle: float = 1.0, affinity: int | None = None,
                listen: str = "127.0.0.1",
                rng: random.Random | None = None) -> AsyncIterator[Setup]:
    loop = asyncio.get_running_loop()
    protos: list[Backend] = []
    transports: list[asyncio.BaseTransport] = []
    proxy: UdpProxy | None = None
    try:
        for _ in range(backends):
            transport, proto = await loop.create_datagram_endpoint(
                Backend, local_addr=("::1" if ":" in listen else "127.0.0.1", 0))
            protos.append(proto)
            transports.append(transport)
        metrics, conns = Metrics(), ConnTable()
        proxy = UdpProxy(loop=loop, balancer=Balancer(node_name="node", rng=rng), conns=conns,
                         metrics=metrics, settings=Settings(udp_timeout=timeout),
                         max_flows=max_flows, evict_min_idle=evict_min_idle,
                         conntrack=Conntrack(enabled=False), native=flavor.native)
        assert proxy.native is flavor.native
        family = socket.AF_INET6 if ":" in listen else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((listen, 0))
        sock.setblocking(False)
        proxy.entries = {NAME: entry_for(*(p.port for p in protos), affinity=affinity,
                                         host="::1" if ":" in listen else "127.0.0.1")}
        listener = proxy.listen(sock, NAME, "cluster")
        assert listener.batched is flavor.native  # both families on both paths
        yield Setup(proxy, listener.port, protos, conns, metrics)
    finally:
        if proxy is not None:
            await proxy.drain(0.1)
        for t in transports:
            t.close()


async def ask(port: int, payload: bytes = b"whoami", *, sock: socket.socket | None = None,
              timeout: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    own = sock is None
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))  # connected: replies from another source are refused
    try:
        await loop.sock_sendall(sock, payload)
        async with asyncio.timeout(timeout):
            return await loop.sock_recv(sock, 65536)
    finally:
        if own:
            sock.close()


def client(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(("127.0.0.1", port))
    return sock


def test_relays_whoami_spreads_and_registers_flows(flavor: Flavor) -> None:
    async def body() -> None:
        async with setup(flavor, backends=3) as s:
            socks = [client(s.port) for _ in range(60)]  # held open: 60 distinct ports
            try:
                answers = [await ask(s.port, sock=sock) for sock in socks]
            finally:
                for sock in socks:
                    sock.close()
            ports = {str(b.port).encode() for b in s.backends}
            assert set(answers) == ports  # every endpoint answered some of 60 new clients
            assert len(s.proxy.flows) == 60
            rows = [c for c in s.conns if c.protocol == "UDP"]
            assert len(rows) == 60 and all(c.state == "open" for c in rows)
            assert sum(c.bytes_up for c in rows) == 60 * len(b"whoami")
            assert s.metrics.udp_flows_active.labels(str(NAME))._value.get() == 60

    run_on(flavor, body)


def test_largest_datagrams_pass_whole_both_ways(flavor: Flavor) -> None:
    async def body() -> None:
        async with setup(flavor, backends=1) as s:
            with client(s.port) as sock:
                for size in (1, 9000, 65507):
                    payload = os.urandom(size)
                    assert await ask(s.port, payload, sock=sock) == payload
            assert len(s.proxy.flows) == 1

    run_on(flavor, body)


def test_idle_flows_expire_and_close_their_rows(flavor: Flavor) -> None:
    async def body() -> None:
        async with setup(flavor, backends=1, timeout=0.3) as s:
            with client(s.port) as sock:
                await ask(s.port, sock=sock)
                assert len(s.proxy.flows) == 1 and len(s.conns) == 1
                flow = next(iter(s.proxy.flows))
                await wait_until_async(lambda: not s.proxy.flows, timeout=5, interval=0.1,
                                       message="the idle flow expired")
                assert len(s.proxy.flows) == 0 and len(s.conns) == 0
                assert flow.closed and flow.sock.fileno() == -1
                assert s.metrics.udp_flows_active.labels(str(NAME))._value.get() == 0
                # the same client afterwards gets a new flow
                await ask(s.port, sock=sock)
                assert len(s.proxy.flows) == 1 and next(iter(s.proxy.flows)) is not flow

    run_on(flavor, body)


def test_active_flow_does_not_expire(flavor: Flavor) -> None:
    async def body() -> None:
        async with setup(flavor, backends=1, timeout=0.4) as s:
            with client(s.port) as sock:
                await ask(s.port, sock=sock)
                flow = next(iter(s.proxy.flows))
                for _ in range(8):  # 0.8 s of traffic every 0.1 s: twice the timeout
                    await asyncio.sleep(0.1)
                    await ask(s.port, sock=sock)
                assert not flow.closed and list(s.proxy.flows) == [flow]

    run_on(flavor, body)


class Talker(asyncio.DatagramProtocol):
    """An endpoint that remembers who wrote to it (and then talks on its own)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.peer: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if not self.peer.done():
            self.peer.set_result(cast(tuple[str, int], addr))


def test_replies_alone_keep_a_flow_alive(flavor: Flavor) -> None:
    """An endpoint that keeps sending while the client is silent keeps the flow from
    expiring: replies count as activity, as requests do."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        transport, talker = await loop.create_datagram_endpoint(
            Talker, local_addr=("127.0.0.1", 0))
        try:
            async with setup(flavor, backends=0, timeout=0.4) as s:
                s.proxy.entries = {NAME: entry_for(transport.get_extra_info("sockname")[1])}
                with client(s.port) as sock:
                    sock.send(b"subscribe")
                    async with asyncio.timeout(2):
                        peer = await talker.peer
                    flow = next(iter(s.proxy.flows))
                    for i in range(12):  # 1.2 s of replies every 0.1 s: three timeouts
                        transport.sendto(f"tick{i}".encode(), peer)
                        async with asyncio.timeout(2):
                            assert await loop.sock_recv(sock, 100) == f"tick{i}".encode()
                        await asyncio.sleep(0.1)
                    assert not flow.closed and list(s.proxy.flows) == [flow]
                    assert flow.bytes_down == sum(len(f"tick{i}") for i in range(12))
                    await wait_until_async(lambda: flow.closed, timeout=3, interval=0.1,
                                           message="the quiet flow expired")  # quiet now
                    assert flow.closed and not s.proxy.flows
        finally:
            transport.close()

    run_on(flavor, body)


def test_flood_keeps_the_bound_and_the_active_flow(flavor: Flavor) -> None:
    async def body() -> None:
        async with setup(flavor, backends=1, max_flows=8, evict_min_idle=0.2) as s:
            with client(s.port) as steady:
                await ask(s.port, sock=steady)
                steady_flow = next(iter(s.proxy.flows))
                answered = 0
                for round_ in range(3):
                    await ask(s.port, sock=steady)  # the steady client is in use...
                    socks = [client(s.port) for _ in range(40)]
                    try:
                        for sock in socks:  # ...when 40 new clients arrive at once
                            sock.send(b"whoami")
                        await ask(s.port, sock=steady)
                        await asyncio.sleep(0.1)
                        for sock in socks:
                            try:
                                sock.recv(100)
                                answered += 1
                            except BlockingIOError:
                                pass
                    finally:
                        for sock in socks:
                            sock.close()
                    assert len(s.proxy.flows) <= 8, round_
                    await asyncio.sleep(0.25)  # the flood's flows go idle: evictable next round
                assert not steady_flow.closed  # in use all along: never evicted
                assert 7 <= answered < 120  # some newcomers served, the rest dropped
            evicted = s.metrics.udp_flows_evicted.labels(str(NAME))._value.get()
            assert evicted >= 7
            assert s.proxy.dropped.get("table_full", 0) >= 40
            assert len(s.conns) == len(s.proxy.flows) <= 8

    run_on(flavor, body)


def test_refusing_endpoint_closes_the_flow_and_the_next_datagram_moves_on(flavor: Flavor) -> None:
    async def body() -> None:
        async with setup(flavor, backends=1) as s:
            dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            dead.bind(("127.0.0.1", 0))
            dead_port = dead.getsockname()[1]
            dead.close()  # nothing listens there now: ICMP port unreachable
            live = s.backends[0].port
            s.proxy.entries = {NAME: replace(entry_for(dead_port, live))}
            with client(s.port) as sock:
                answers = []
                for _ in range(20):
                    try:
                        answers.append(await ask(s.port, sock=sock, timeout=0.3))
                    except TimeoutError:
                        answers.append(b"lost")
                # at most the first datagram to the dead endpoint is lost; then always the live one
                assert answers.count(b"lost") <= 1, answers
                assert answers[-1] == str(live).encode()
                assert all(f.endpoint.port == live for f in s.proxy.flows)

    run_on(flavor, body)


class FirstChoice(random.Random):
    """Deterministic "random": always the first candidate (endpoints keep the entry's order)."""

    def choice(self, seq: Any) -> Any:
        return seq[0]


def test_refusing_endpoint_in_the_middle_of_a_burst(flavor: Flavor) -> None:
    """Loopback reports the ICMP error during the send itself, so the refusal lands between
    two datagrams of one batch: it must be noticed there, not after the whole burst."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with setup(flavor, backends=1, rng=FirstChoice()) as s:
            dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            dead.bind(("127.0.0.1", 0))
            dead_port = dead.getsockname()[1]
            dead.close()
            live = s.backends[0].port
            s.proxy.entries = {NAME: entry_for(dead_port, live)}  # the first flow: the dead one
            with client(s.port) as sock:
                burst = [f"q{i:02d}".encode() for i in range(20)]
                for payload in burst:  # all sent before the proxy reads any
                    sock.send(payload)
                got: list[bytes] = []
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        while len(got) < len(burst):
                            got.append(await loop.sock_recv(sock, 100))
                # the first goes to the dead endpoint; the refusal is noticed at the second,
                # which is sent again, to the live one
                assert got == burst[1:]
                assert [f.endpoint.port for f in s.proxy.flows] == [live]
                assert s.proxy.balancer.choose(
                    s.proxy.entries[NAME], "127.0.0.1", loop.time()) == Endpoint(
                        "127.0.0.1", live)  # the dead one is avoided

    run_on(flavor, body)


def test_endpoint_that_answered_then_went_away_in_a_burst(flavor: Flavor) -> None:
    """A flow whose endpoint answered sends whole batches (GSO runs, one sendmmsg): when the
    endpoint then goes away, what was in flight may be lost (as on any real network, where
    the ICMP error comes back after the datagrams), but the flow moves on at once."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with setup(flavor, backends=1, rng=FirstChoice()) as s:
            doomed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            doomed.bind(("127.0.0.1", 0))
            doomed.setblocking(False)
            doomed_port = doomed.getsockname()[1]
            live = s.backends[0].port
            s.proxy.entries = {NAME: entry_for(doomed_port, live)}
            with client(s.port) as sock:
                sock.send(b"hello")
                await asyncio.sleep(0.1)
                data, peer = doomed.recvfrom(100)
                doomed.sendto(data, peer)  # the endpoint answers once...
                assert await loop.sock_recv(sock, 100) == b"hello"
                doomed.close()  # ...and goes away
                burst = [f"q{i:02d}".encode() for i in range(20)]
                for payload in burst:
                    sock.send(payload)
                got: list[bytes] = []
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        while len(got) < len(burst):
                            got.append(await loop.sock_recv(sock, 100))
                assert got == burst[len(burst) - len(got):]  # a tail of the burst, in order
                assert await ask(s.port, b"after", sock=sock) == b"after"
                assert [f.endpoint.port for f in s.proxy.flows] == [live]

    run_on(flavor, body)


async def flows_on_both_endpoints(s: Setup) -> tuple[list[socket.socket], tuple[int, int]]:
    """20 clients with a flow each, spread over both backends; returns them and the ports."""
    socks = [client(s.port) for _ in range(20)]
    for sock in socks:
        await ask(s.port, sock=sock)
    a, b = (be.port for be in s.backends)
    assert {f.endpoint.port for f in s.proxy.flows} == {a, b}
    return socks, (a, b)


def test_removed_endpoint_closes_its_flows(flavor: Flavor) -> None:
    async def body() -> None:
        async with setup(flavor, backends=2) as s:
            socks, (a, _b) = await flows_on_both_endpoints(s)
            try:
                s.proxy.entries = {NAME: entry_for(a)}
                assert {f.endpoint.port for f in s.proxy.flows} == {a}
                assert all(c.backend == ("127.0.0.1", a) for c in s.conns)
                for sock in socks:  # every client still answered, now by a
                    assert await ask(s.port, sock=sock) == str(a).encode()
                s.proxy.entries = {}
                assert len(s.proxy.flows) == 0 and len(s.conns) == 0
                sock = socks[0]
                sock.send(b"whoami")
                await asyncio.sleep(0.1)
                with pytest.raises(BlockingIOError):
                    sock.recv(100)
                assert s.proxy.dropped["no_service"] >= 1
            finally:
                for sock in socks:
                    sock.close()

    run_on(flavor, body)


def test_local_policy_change_closes_flows_to_other_nodes(flavor: Flavor) -> None:
    async def body() -> None:
        async with setup(flavor, backends=2) as s:
            socks, (a, b) = await flows_on_both_endpoints(s)
            try:
                # internalTrafficPolicy: Local, and only a's endpoint is on this node.
                entry = entry_for(a, b)
                port = dataclasses.replace(entry.port, internal_local=True)
                eps = tuple(dataclasses.replace(e, node_name="node" if e.port == a else "other")
                            for e in entry.endpoints)
                s.proxy.entries = {NAME: Entry(port, eps)}
                assert {f.endpoint.port for f in s.proxy.flows} == {a}
                for sock in socks:  # every client answered again, by the local endpoint
                    assert await ask(s.port, sock=sock) == str(a).encode()
            finally:
                for sock in socks:
                    sock.close()

    run_on(flavor, body)


def test_a_terminating_endpoint_keeps_its_flows_while_it_serves(flavor: Flavor) -> None:
    """As kube-proxy keeps the conntrack entries of serving endpoints: a flow stays on an
    endpoint that terminates but still serves (while new clients get a ready one), and
    moves only when the endpoint stops serving; conntrack clean-up agrees."""
    async def body() -> None:
        async with setup(flavor, backends=2) as s:
            socks, (a, b) = await flows_on_both_endpoints(s)
            try:
                entry = entry_for(a, b)
                ready_a, ready_b = entry.endpoints
                term_b = dataclasses.replace(ready_b, ready=False, terminating=True)
                s.proxy.entries = {NAME: Entry(entry.port, (ready_a, term_b))}
                assert {f.endpoint.port for f in s.proxy.flows} == {a, b}
                assert Stale.endpoint("127.0.0.1", b) not in s.proxy.pending_conntrack
                answers = {await ask(s.port, sock=sock) for sock in socks}
                assert answers == {str(a).encode(), str(b).encode()}
                assert await ask(s.port) == str(a).encode()  # a new client: the ready one
                gone_b = dataclasses.replace(term_b, serving=False)
                s.proxy.entries = {NAME: Entry(entry.port, (ready_a, gone_b))}
                assert {f.endpoint.port for f in s.proxy.flows} == {a}
                assert Stale.endpoint("127.0.0.1", b) in s.proxy.pending_conntrack
                for sock in socks:
                    assert await ask(s.port, sock=sock) == str(a).encode()
            finally:
                for sock in socks:
                    sock.close()

    run_on(flavor, body)


def test_client_ip_affinity_pins_new_flows(flavor: Flavor) -> None:
    async def body() -> None:
        async with setup(flavor, backends=3, affinity=10) as s:
            answers = {await ask(s.port) for _ in range(30)}
            assert len(answers) == 1

    run_on(flavor, body)


def test_no_endpoints_drops_and_counts(flavor: Flavor) -> None:
    async def body() -> None:
        async with setup(flavor, backends=1) as s:
            s.proxy.entries = {NAME: entry_for()}
            with pytest.raises(TimeoutError):
                await ask(s.port, timeout=0.2)
            assert s.proxy.dropped["no_endpoints"] == 1 and len(s.proxy.flows) == 0

    run_on(flavor, body)


def test_entry_changes_queue_the_right_conntrack_deletions() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        ct = Conntrack(enabled=False)
        proxy = UdpProxy(loop=loop, balancer=Balancer(node_name="node"), conns=ConnTable(),
                         metrics=Metrics(), settings=Settings(), conntrack=ct)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        listener = proxy.listen(sock, NAME, "cluster")  # the daemon listens, then syncs
        proxy.entries = {NAME: entry_for(1053, 2053)}
        # a new frontend: entries made before our rule (or to an old proxy port) are stale
        assert proxy.pending_conntrack == [
            Stale.frontend("10.0.0.10", 53, keep_reply_port=listener.port)]
        proxy.rules_applied()
        await proxy.flush_conntrack()
        assert proxy.pending_conntrack == [] and ct.calls == 1
        proxy.entries = {NAME: entry_for(1053, 2053)}  # nothing changed: nothing to delete
        assert proxy.pending_conntrack == []
        proxy.entries = {NAME: entry_for(1053)}
        assert proxy.pending_conntrack == [Stale.endpoint("127.0.0.1", 2053)]
        listener.close()  # the service goes away: listeners first, then the entries
        proxy.entries = {}
        assert proxy.pending_conntrack == [Stale.endpoint("127.0.0.1", 2053),
                                           Stale.frontend("10.0.0.10", 53),
                                           Stale.endpoint("127.0.0.1", 1053)]
        proxy.rules_applied()
        await proxy.flush_conntrack()
        assert proxy.pending_conntrack == [] and ct.calls == 2
        await proxy.drain(0.1)

    run_on("asyncio", body)


# --- batches: many datagrams per wake-up, replies from the arrival address --------------------


def test_bursts_from_several_clients_arrive_whole_and_in_order(flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with setup(flavor, backends=2) as s:
            socks = [client(s.port) for _ in range(4)]
            try:
                # Interleaved and sent before the proxy runs: one receive batch holds datagrams
                # of every client, which must each reach that client's endpoint, in order.
                sent: dict[int, list[bytes]] = {i: [] for i in range(4)}
                for n in range(30):
                    for i, sock in enumerate(socks):
                        payload = f"c{i}-{n:03d}-".encode() + b"x" * (n * 37 % 500)
                        sock.send(payload)
                        sent[i].append(payload)
                for i, sock in enumerate(socks):
                    got: list[bytes] = []
                    async with asyncio.timeout(3):
                        while len(got) < 30:
                            got.append(await loop.sock_recv(sock, 65536))
                    assert got == sent[i]
                assert len(s.proxy.flows) == 4
                rows = sorted(s.conns, key=lambda c: c.client)
                expected = sorted(sum(len(p) for p in sent[i]) for i in range(4))
                assert sorted(c.bytes_up for c in rows) == expected
                assert sorted(c.bytes_down for c in rows) == expected
                assert all(c.native is flavor.native for c in rows)
                assert sum(b.received for b in s.backends) == 120
            finally:
                for sock in socks:
                    sock.close()

    run_on(flavor, body)


def test_runs_of_equal_sized_datagrams_arrive_as_the_same_datagrams(flavor: Flavor) -> None:
    """The native path sends such runs as one UDP_SEGMENT message: the receivers must still
    see every datagram on its own, with its own bytes, in order (a shorter one ends a run)."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with setup(flavor, backends=1, listen="0.0.0.0") as s:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.connect(("127.0.0.2", s.port))  # replies must come from 127.0.0.2
                sizes = [64] * 40 + [20] + [1200] * 10 + [1232] * 5 + [1233] * 3 + [7]
                sent = [bytes([i]) * size for i, size in enumerate(sizes)]
                for payload in sent:
                    sock.send(payload)
                got: list[bytes] = []
                async with asyncio.timeout(3):
                    while len(got) < len(sent):
                        got.append(await loop.sock_recv(sock, 65536))
                assert got == sent
                assert s.backends[0].received == len(sent)
                flow = next(iter(s.proxy.flows))
                assert flow.bytes_up == flow.bytes_down == sum(sizes)

    run_on(flavor, body)


def test_replies_leave_from_the_address_the_client_sent_to(flavor: Flavor) -> None:
    async def body() -> None:
        async with setup(flavor, backends=1, listen="0.0.0.0") as s:
            # A connected client accepts replies only from the address it sent to: the
            # listener, bound to the wildcard, must answer from 127.0.0.2 (IP_PKTINFO).
            for address in ("127.0.0.2", "127.0.0.1", "127.0.0.3"):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.setblocking(False)
                    sock.connect((address, s.port))
                    for size in (6, 9000):
                        payload = b"whoami" if size == 6 else os.urandom(size)
                        answer = await ask(s.port, payload, sock=sock)
                        assert answer == (str(s.backends[0].port).encode()
                                          if size == 6 else payload)
            sources = sorted(socket.inet_ntoa(f.reply_src) for f in s.proxy.flows
                             if f.reply_src is not None)
            assert sources == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]

    run_on(flavor, body)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback in this environment")
def test_ipv6_listener_relays_on_either_path(flavor: Flavor) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with setup(flavor, backends=1, listen="::1") as s:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.connect(("::1", s.port))
                for size in (6, 65507, 65527):  # 65,527: the IPv6 maximum (no jumbograms)
                    payload = os.urandom(size)
                    await loop.sock_sendall(sock, payload)
                    async with asyncio.timeout(2):
                        assert await loop.sock_recv(sock, 65536) == payload
                # a burst (the native path's batches and GSO), back whole and in order
                burst = [bytes([i]) * 1000 for i in range(40)]
                for payload in burst:
                    sock.send(payload)
                got = []
                async with asyncio.timeout(5):
                    while len(got) < len(burst):
                        got.append(await loop.sock_recv(sock, 65536))
                assert got == burst
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as other:  # a second flow
                other.setblocking(False)
                other.connect(("::1", s.port))
                await loop.sock_sendall(other, b"hello")
                async with asyncio.timeout(2):
                    assert await loop.sock_recv(other, 65536) == b"hello"
            assert len(s.proxy.flows) == 2
            assert all(c.native is flavor.native for c in s.conns)  # who moved the bytes

    run_on(flavor, body)


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback in this environment")
def test_native_batch_groups_ipv6_clients_by_address_and_port() -> None:
    """IPv6 sources do not fit the packed key: the batch carries address and port (src6)
    and the IPV6_PKTINFO destination (dst6); replies go with uproxy_udp_reply6."""
    if native.ACTIVE != "native":
        pytest.skip(f"native path not active: {native.REASON}")
    lib, ffi = native.lib(), native.ffi()
    batch = ffi.gc(lib.uproxy_udp_batch_new(), lib.uproxy_udp_batch_free)
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
        listener.bind(("::1", 0))
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        socks = [stack.enter_context(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
                 for _ in range(2)]
        for sock in socks:
            sock.connect(listener.getsockname()[:2])
        for i in range(6):
            socks[i % 2].send(bytes([i]) * (100 + i))
        n = lib.uproxy_udp_recv(listener.fileno(), batch, 1)
        assert n == 6 and batch.ngroups == 2
        assert [batch.order[k] for k in range(n)] == [0, 2, 4, 1, 3, 5]
        loopback = socket.inet_pton(socket.AF_INET6, "::1")
        for i in range(n):
            src = bytes(ffi.buffer(batch.src6[i]))
            assert src == loopback + socks[i % 2].getsockname()[1].to_bytes(2, "big")
            assert batch.dst[i] == 0 and bytes(ffi.buffer(batch.dst6[i])) == loopback
        out = ffi.new("struct uproxy_udp_sent *")
        port = socks[1].getsockname()[1]
        assert lib.uproxy_udp_reply6(listener.fileno(), batch, loopback, port, loopback,
                                     out) == 6
        socks[1].settimeout(2)
        # every datagram of the batch, in the batch's (grouped) order, from ::1
        assert [len(socks[1].recv(65536)) for _ in range(6)] == [100, 102, 104, 101, 103, 105]


def test_native_batch_groups_datagrams_by_client() -> None:
    if native.ACTIVE != "native":
        pytest.skip(f"native path not active: {native.REASON}")
    lib, ffi = native.lib(), native.ffi()
    batch = ffi.gc(lib.uproxy_udp_batch_new(), lib.uproxy_udp_batch_free)
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        listener.bind(("127.0.0.1", 0))
        listener.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        assert lib.uproxy_udp_recv(listener.fileno(), batch, 1) == -errno.EAGAIN
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                 for _ in range(3)]
        for sock in socks:
            sock.connect(listener.getsockname())
        payloads = [os.urandom(1 + i * 1000) for i in range(9)] + [os.urandom(65507)]
        for i, payload in enumerate(payloads):
            socks[i % 3].send(payload)
        n = lib.uproxy_udp_recv(listener.fileno(), batch, 1)
        assert n == 10 and batch.ngroups == 3
        assert [batch.order[k] for k in range(n)] == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]
        assert [batch.group[g] for g in range(4)] == [0, 4, 7, 10]
        ports = [sock.getsockname()[1] for sock in socks]
        assert [batch.key[i] for i in range(3)] == [(0x7F000001 << 16) | p for p in ports]
        assert {batch.dst[i] for i in range(n)} == {0x7F000001}
        buf = ffi.new("unsigned char[]", 65536)
        for i, payload in enumerate(payloads):
            assert batch.len[i] == len(payload)
            assert lib.uproxy_udp_copy(batch, i, buf, 65536) == len(payload)
            assert ffi.buffer(buf, len(payload))[:] == payload
        # group 0 (the first client's four datagrams) to a connected socket, whole
        backend = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        backend.bind(("127.0.0.1", 0))
        up = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        up.connect(backend.getsockname())
        out = ffi.new("struct uproxy_udp_sent *")
        assert lib.uproxy_udp_send(up.fileno(), batch, 0, 4, 0, out) == 4
        assert (out.err, out.err_at, out.bytes) == (0, -1, sum(map(len, payloads[::3])))
        assert [backend.recv(65536) for _ in range(4)] == payloads[::3]
        # a run of equal-sized datagrams (one UDP_SEGMENT message) arrives as separate datagrams
        assert batch.gso == lib.UPROXY_UDP_GSO_MAX_SEGMENT
        run = [bytes([i]) * 100 for i in range(20)] + [b"end"]
        for payload in run:
            socks[0].send(payload)
        assert lib.uproxy_udp_recv(listener.fileno(), batch, 1) == 21
        assert lib.uproxy_udp_send(up.fileno(), batch, 0, 21, 0, out) == 21
        assert (out.err, out.busy, out.bytes) == (0, 0, 2003)
        assert [backend.recv(65536) for _ in range(21)] == run
        assert batch.gso == lib.UPROXY_UDP_GSO_MAX_SEGMENT  # loopback segments: still on
