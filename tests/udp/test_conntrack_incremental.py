"""The UDP conntrack clean-up told only which service ports changed queues exactly what the
whole-table comparison would (issue 16: a sync's cost follows what it changed).

The reference is the pure rule itself: :func:`stale_between` over :func:`udp_frontends` and
:func:`serving_addresses` of the whole table before and after each change. Endpoints are
shared between service ports (one stays served while another still uses it), policies
are Local or not, proxy ports move, service ports come and go.
"""

from __future__ import annotations

import asyncio
import random

from tests.support.matrix import run_on
from uproxy.balance import serving_addresses
from uproxy.conntrack import Conntrack, Stale
from uproxy.model import Endpoint, ServicePort, ServicePortName
from uproxy.proxy.udp.conntrack_cleanup import ConntrackCleanup, stale_between, udp_frontends
from uproxy.state import Entry

NODE = "node"
NAMES = [ServicePortName("default", f"dns-{i}", "dns", "UDP") for i in range(6)]
POOL = [Endpoint(f"10.1.0.{i}", 53, node_name=NODE if i % 2 else "other") for i in range(1, 6)]


def _random_entry(rng: random.Random, name: ServicePortName, index: int) -> Entry:
    endpoints = tuple(Endpoint(e.ip, e.port, ready=rng.random() < 0.7,
                               serving=rng.random() < 0.8, node_name=e.node_name)
                      for e in rng.sample(POOL, rng.randint(0, 3)))
    port = ServicePort(name=name, type="NodePort" if rng.random() < 0.3 else "ClusterIP",
                       cluster_ips=(f"10.96.0.{index + 1}",), port=53, protocol="UDP",
                       target_port=53, node_port=30053 + index if rng.random() < 0.3 else None,
                       internal_local=rng.random() < 0.3, external_local=rng.random() < 0.3)
    return Entry(port, endpoints)


def _key(stale: Stale) -> tuple[str, ...]:
    return (repr(stale.orig_dst), repr(stale.reply_src), repr(stale.keep_reply_port))


def test_told_the_changed_names_it_queues_what_the_whole_table_comparison_does() -> None:
    async def body() -> None:
        rng = random.Random(16)
        cleanup = ConntrackCleanup(asyncio.get_running_loop(), Conntrack(enabled=False))
        table: dict[ServicePortName, Entry] = {}
        ports: dict[tuple[ServicePortName, str, int], int] = {}
        checked = 0
        for _ in range(400):
            before_table, before_ports = dict(table), dict(ports)
            changed = rng.sample(NAMES, rng.randint(1, 3))
            for name in changed:
                index = NAMES.index(name)
                if rng.random() < 0.25:
                    table.pop(name, None)
                    ports.pop((name, "cluster", 4), None)
                    continue
                if rng.random() < 0.8 or name not in table:
                    table[name] = _random_entry(rng, name, index)
                if rng.random() < 0.3 or (name, "cluster", 4) not in ports:
                    ports[(name, "cluster", 4)] = rng.choice((0, 40000 + index, 41000 + index))
            want = stale_between(udp_frontends(before_table, before_ports),
                                 udp_frontends(table, ports),
                                 serving_addresses(before_table.values(), node_name=NODE),
                                 serving_addresses(table.values(), node_name=NODE))
            queued = len(cleanup.pending)
            mine = {k: v for k, v in ports.items() if k[0] in changed}
            cleanup.entries_changed(table, mine, NODE, changed)
            got = cleanup.pending[queued:]
            assert sorted(map(_key, got)) == sorted(map(_key, want)), (changed, got, want)
            checked += bool(want)
        assert checked > 100  # (the sequence does make stale entries)
        # Told nothing about which changed, it compares the whole table: nothing more.
        queued = len(cleanup.pending)
        cleanup.entries_changed(table, ports, NODE)
        assert cleanup.pending[queued:] == []

    run_on("asyncio", body)
