"""Several native engine threads behind one relay (``--engine-threads``, native/relay.c's
engine groups): every thread accepts on the same listening sockets and sets connections up
and relays them itself, and the group behaves as one engine -- one table of ClientIP pins,
one endpoint set per listener (a failure one thread saw is avoided by all), one stream of
events and completions, sums in the stats, a takeover that takes every thread's connections.

Real sockets on loopback, IPv4 and IPv6, the real :class:`~uproxy.proxy.tcp.TcpProxy` and
tagged backends, on both loops; the native flavors only (the Python twin has no engine
threads: its ``thread_stats()`` is empty, asserted below).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.relay.test_affinity_paths import _sources, backends
from tests.relay.test_setup_paths import FAMILIES, NAME, Rig, _run, _until, rig
from tests.support.matrix import Flavor, relay_for, run_on, select_path
from uproxy.proxy.nativerelay import NativeRelay
from uproxy.proxy.relay import engine_threads

ROUNDS = 30  # bounded: the spread over the threads is asserted after at most this many


async def _burst(r: Rig, sources: list[str | None],
                 each: int) -> list[tuple[str | None, bytes | None]]:
    """``each`` connections from every source at once: (source, the tag it got)."""
    async def one(source: str | None) -> tuple[str | None, bytes | None]:
        tag, error, _ = await r.connect(source)
        assert error is None, (source, error)
        return source, tag
    return list(await asyncio.gather(*(one(s) for s in sources for _ in range(each))))


def _opened(relay: NativeRelay) -> list[int]:
    relay.catch_up()
    return [t["setups_opened"] for t in relay.thread_stats()]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_threads_share_the_clients_and_the_client_ip_pins(native_flavor: Flavor,
                                                              family: int) -> None:
    """Concurrent clients are set up by both threads, and with ClientIP affinity each client
    stays on one endpoint whichever thread accepts it (the pins are the group's)."""
    async def main() -> None:
        async with rig(native_flavor, family) as r, backends(family) as made:
            relay = r.proxy.relay
            assert isinstance(relay, NativeRelay) and relay.threads == 2
            r.set_endpoints([address for _, address in made.values()], affinity=10800)
            sources = _sources(family)
            each = 2 if family == 4 else 64
            seen: dict[str | None, set[bytes | None]] = {}
            n = 0
            for _ in range(ROUNDS):
                for source, tag in await _burst(r, sources, each):
                    seen.setdefault(source, set()).add(tag)
                n += len(sources) * each
                if min(_opened(relay)) > 0:
                    break
            opened = _opened(relay)
            assert min(opened) > 0 and sum(opened) == n, opened  # both threads set up clients
            for source, tags in seen.items():
                assert len(tags) == 1 and tags <= set(made), (source, tags)
            assert relay.affinity_count() == len(sources)
            await r.settle("native", n)
            assert r.total("ok") == n

    _run(native_flavor, main)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_failure_one_thread_saw_is_avoided_by_the_other(native_flavor: Flavor,
                                                          family: int) -> None:
    """One endpoint set per listener for the group: once a thread found the refusing
    endpoint, neither thread tries it again for FAILED_AVOID_SECONDS, so of many concurrent
    clients only the first few meet it (each thread's clients in flight before the mark)."""
    async def main() -> None:
        async with rig(native_flavor, family) as r, backends(family, b"G") as made:
            relay = r.proxy.relay
            assert isinstance(relay, NativeRelay)
            bad = r.refusing()
            r.set_endpoints([bad, made[b"G"][1]])
            n = 0
            for _ in range(ROUNDS):
                results = await _burst(r, [None], 64)
                assert {tag for _, tag in results} == {b"G"}, results
                n += len(results)
                if min(_opened(relay)) > 0:
                    break
            assert min(_opened(relay)) > 0, _opened(relay)
            await r.settle("native", n)
            failed = r.conns.services[NAME].by_endpoint[bad].failed
            assert 1 <= failed < 64, failed  # fewer than a burst, not one per client

    _run(native_flavor, main)


def test_thread_stats_add_up_to_the_group_and_the_twin_has_none(flavor: Flavor) -> None:
    async def main() -> None:
        relay = relay_for(flavor, asyncio.get_running_loop())
        try:
            per = relay.thread_stats()
            if not flavor.native:
                assert per == []
                return
            assert len(per) == 2
            whole = relay.stats()
            for key in ("conns_live", "pipes_max", "setups_opened"):
                assert whole[key] == sum(t[key] for t in per), key
            assert whole["pipes_max"] > 0 and per[0]["pipes_max"] == per[1]["pipes_max"]
        finally:
            await relay.close()

    run_on(select_path(flavor), main)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_threads_connections_are_taken_back_for_a_takeover(native_flavor: Flavor,
                                                                 family: int) -> None:
    """A takeover asks the group for each live connection: the ones either thread relays come
    back with their bytes (pause) and relay on from where they were (resume). Connections
    handed to the group go to its threads in turn, so after the first resume both threads
    hold some, and the second pause takes them back from both."""
    async def main() -> None:
        async with rig(native_flavor, family) as r, backends(family) as made:
            relay = r.proxy.relay
            assert isinstance(relay, NativeRelay)
            r.set_endpoints([address for _, address in made.values()])
            held = await asyncio.gather(*(asyncio.open_connection(*r.address)
                                          for _ in range(32)))
            for reader, _ in held:
                assert await reader.readexactly(1) in made
            relay.catch_up()
            handles = list(relay._live.values())
            assert len(handles) == len(held)
            for round_ in range(2):
                for handle in handles:
                    handle.request_pause()
                assert all(handle.pause() for handle in handles), round_
                assert relay.stats()["conns_live"] == 0
                for handle in handles:  # (handed back in turn: both threads get some)
                    handle.resume()
                await _until(lambda: relay.stats()["conns_live"] == len(held))
                per = [t["conns_live"] for t in relay.thread_stats()]
                assert min(per) > 0 and sum(per) == len(held), (round_, per)
            for i, (reader, writer) in enumerate(held):  # both ways still relay
                writer.write(b"x")
                writer.write_eof()
                assert await reader.read() == b"", i
                writer.close()
            await _until(lambda: relay.stats()["conns_live"] == 0)

    _run(native_flavor, main)


def test_auto_is_one_thread_per_usable_core(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    absent = str(tmp_path / "absent")
    assert engine_threads(0, absent) == max(1, min(8, cores))
    assert engine_threads(3, absent) == 3
    limit = tmp_path / "cpu.max"  # a cgroup v2 CPU limit: 1.5 CPUs -> 2 threads (or fewer cores)
    limit.write_text("150000 100000\n")
    assert engine_threads(0, str(limit)) == min(2, cores)
    limit.write_text("max 100000\n")
    assert engine_threads(0, str(limit)) == max(1, min(8, cores))
    limit.write_text("garbage\n")
    assert engine_threads(0, str(limit)) == max(1, min(8, cores))
