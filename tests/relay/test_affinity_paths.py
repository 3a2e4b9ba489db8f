"""ClientIP session affinity on both set-up paths: the engine's pin table (native/affinity.c)
and the Python balancer (:class:`uproxy.balance.Balancer`) keep the same rule.

Real sockets on loopback, IPv4 and IPv6, the real :class:`~uproxy.proxy.tcp.TcpProxy` and
tagged backends (each sends one byte naming itself). Different clients are different
source addresses on IPv4's loopback (127.0.0.2 and up); IPv6's loopback has one address,
so its tests use one client. Every test asserts the path that set the connections up
(``uproxy_relay_setup_total{path}``), so a native flavor cannot pass on the Python path.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest

from tests.relay.test_setup_paths import (
    FAMILIES,
    NAME,
    Rig,
    _path,
    _run,
    _tagged_backend,
    rig,
)
from tests.support.matrix import Flavor

# More clients than that, all on one of 3 endpoints by chance: (1/3)^29, never.
CLIENTS = 30


@contextlib.asynccontextmanager
async def backends(family: int, tags: bytes = b"ABC"
                   ) -> AsyncIterator[dict[bytes, tuple[asyncio.Server, tuple[str, int]]]]:
    made = {bytes([t]): await _tagged_backend(family, bytes([t])) for t in tags}
    try:
        yield made
    finally:
        for server, _ in made.values():
            server.close()


def _sources(family: int) -> list[str | None]:
    return [f"127.0.0.{i}" for i in range(2, 2 + CLIENTS)] if family == 4 else [None]


async def _tags(r: Rig, n: int, source: str | None = None) -> list[bytes | None]:
    return [(await r.connect(source))[0] for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_client_ip_affinity_keeps_each_client_on_its_endpoint(flavor: Flavor,
                                                              family: int) -> None:
    """e2e "should have session affinity work for service with type clusterIP": one client,
    many connections, one endpoint; different clients spread over the endpoints."""
    async def main() -> None:
        async with rig(flavor, family) as r, backends(family) as made:
            r.set_endpoints([address for _, address in made.values()], affinity=10800)
            n = 0
            seen: set[bytes | None] = set()
            for source in _sources(family):
                tags = await _tags(r, 20 if source is None else 4, source)
                n += len(tags)
                assert len(set(tags)) == 1 and tags[0] in made, (source, tags)
                seen.add(tags[0])
            if family == 4:
                assert len(seen) > 1, seen  # the clients spread
            await r.settle(_path(flavor), n)
            assert r.setup_count(_path(flavor)) == n
            assert r.total("ok") == n
            if flavor.native:
                assert r.proxy.affinity_count() == len(_sources(family))

    _run(flavor, main)


@pytest.mark.parametrize("family", FAMILIES)
def test_client_ip_affinity_expires_after_its_timeout_unused(flavor: Flavor,
                                                             family: int) -> None:
    """A 1 s timeout: within it the client stays; after it unused, the choice is made
    anew (a different endpoint, sooner or later), and the expired pin is freed."""
    async def main() -> None:
        async with rig(flavor, family) as r, backends(family) as made:
            r.set_endpoints([address for _, address in made.values()], affinity=1)
            first = await _tags(r, 3)
            assert len(set(first)) == 1, first
            n, moved = 3, False
            for _ in range(8):  # (1/3)^8 to stay on one endpoint by chance
                await asyncio.sleep(1.15)
                if flavor.native:
                    r.proxy.prune_affinity()
                    assert r.proxy.affinity_count() == 0  # the sweep freed it
                tags = await _tags(r, 2)
                n += 2
                assert tags[0] == tags[1], tags  # (re-pinned)
                if tags[0] != first[0]:
                    moved = True
                    break
            assert moved
            await r.settle(_path(flavor), n)
            assert r.setup_count(_path(flavor)) == n

    _run(flavor, main, timeout=60.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_removed_pinned_endpoint_sends_the_client_elsewhere_and_repins(
        flavor: Flavor, family: int) -> None:
    async def main() -> None:
        async with rig(flavor, family) as r, backends(family) as made:
            r.set_endpoints([address for _, address in made.values()], affinity=10800)
            (pinned,) = set(await _tags(r, 3))
            assert pinned is not None
            r.set_endpoints([address for tag, (_, address) in made.items() if tag != pinned],
                            affinity=10800)
            after = await _tags(r, 6)
            assert len(set(after)) == 1 and after[0] not in (pinned, None), after
            await r.settle(_path(flavor), 9)
            assert r.setup_count(_path(flavor)) == 9

    _run(flavor, main)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_refusing_pinned_endpoint_sends_the_client_elsewhere_and_repins(
        flavor: Flavor, family: int) -> None:
    """The pinned endpoint's pod is gone but still listed (it refuses): the connect
    failure drops the pin, the retry chooses and pins anew, and the client stays there."""
    async def main() -> None:
        async with rig(flavor, family) as r, backends(family, b"AB") as made:
            r.set_endpoints([address for _, address in made.values()], affinity=10800)
            (pinned,) = set(await _tags(r, 3))
            assert pinned is not None
            server, _ = made[pinned]
            server.close()
            await server.wait_closed()
            (other,) = set(made) - {pinned}
            assert await _tags(r, 6) == [other] * 6
            await r.settle(_path(flavor), 9)
            assert r.conns.services[NAME].failed >= 1
            assert r.setup_count(_path(flavor)) == 9

    _run(flavor, main)


@pytest.mark.parametrize("family", FAMILIES)
def test_client_ip_pins_survive_a_takeover(flavor: Flavor, family: int) -> None:
    """What daemon.py does across a takeover: the old process exports its pins (the
    engine's with the balancer's), the new one imports them (TCP's to its engine when
    it has one) and each client keeps its endpoint."""
    async def main() -> None:
        async with backends(family) as made:
            addresses = [address for _, address in made.values()]
            before: dict[str | None, bytes | None] = {}
            async with rig(flavor, family) as old:
                old.set_endpoints(addresses, affinity=10800)
                for source in _sources(family):
                    (before[source],) = set(await _tags(old, 2, source))
                now = time.monotonic()
                pins = old.balancer.export_affinity(now) + old.proxy.export_affinity(now)
                assert len(pins) == len(before)
            async with rig(flavor, family) as new:
                now = time.monotonic()
                new.balancer.import_affinity(new.proxy.import_affinity(pins, now), now)
                new.set_endpoints(addresses, affinity=10800)
                after = {source: (await new.connect(source))[0] for source in before}
                assert after == before
                await new.settle(_path(flavor), len(before))
                assert new.setup_count(_path(flavor)) == len(before)
                if flavor.native:
                    assert new.proxy.affinity_count() == len(before)
                    assert new.balancer.affinity_count() == 0  # (the engine's, not its)

    _run(flavor, main)


def test_every_listener_of_a_service_port_shares_its_pins(flavor: Flavor) -> None:
    """The pin is the service port's (kube-proxy's ServicePortName), not the listener's: a
    client pinned through the ClusterIP's listener keeps its endpoint through a NodePort
    listener of the same service port, and an IPv6 client has its own pin beside it."""
    async def main() -> None:
        async with rig(flavor, 4) as r, backends(4) as made, backends(6, b"XYZ") as made6:
            node = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            node.bind(("127.0.0.1", 0))
            node.listen(64)
            node.setblocking(False)
            six = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            six.bind(("::1", 0))
            six.listen(64)
            six.setblocking(False)
            listeners = [r.proxy.listen(node, NAME, "node"), r.proxy.listen(six, NAME, "cluster")]
            try:
                r.set_endpoints([a for _, a in made.values()] + [a for _, a in made6.values()],
                                affinity=10800)
                cluster = r.address
                n = 0
                for source in _sources(4)[:10]:
                    (tag,) = set(await _tags(r, 2, source))
                    r.address = node.getsockname()[:2]
                    assert set(await _tags(r, 2, source)) == {tag}, source
                    r.address = cluster
                    n += 4
                r.address = six.getsockname()[:2]
                (tag6,) = set(await _tags(r, 4))
                assert tag6 in made6
                n += 4
                await r.settle(_path(flavor), n)
                assert r.setup_count(_path(flavor)) == n
                now = time.monotonic()
                pins = r.balancer.export_affinity(now) + r.proxy.export_affinity(now)
                assert {p[0] for p in pins} == {NAME} and len(pins) == 11, pins
                assert {p[1] for p in pins} == {*_sources(4)[:10], "::1"}
            finally:
                for listener in listeners:
                    listener.close()
                r.address = cluster

    _run(flavor, main)


def test_the_engine_frees_expired_pins_as_new_clients_come(native_flavor: Flavor) -> None:
    """No unbounded growth between syncs: after an accept the engine sweeps part of its
    pin table, so expired pins go as new clients come, without Python's sweep."""
    async def main() -> None:
        async with rig(native_flavor, 4) as r, backends(4) as made:
            r.set_endpoints([address for _, address in made.values()], affinity=1)
            for source in _sources(4)[:10]:
                await r.connect(source)
            assert r.proxy.affinity_count() == 10
            await asyncio.sleep(1.15)
            assert r.proxy.affinity_count() == 10  # (nothing swept them yet)
            assert (await r.connect("127.0.0.99"))[0] in made
            assert r.proxy.affinity_count() == 1
            await r.settle("native", 11)
            assert r.setup_count("native") == 11

    _run(native_flavor, main)
