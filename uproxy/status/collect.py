"""Scrape-time metrics from the live connection table.

The data path only touches counters when a connection opens or closes
(:mod:`uproxy.metrics`); bytes of connections that are still open live in the
relay's counters. This collector reads them when Prometheus scrapes, so a
long-lived connection shows up in the byte totals while it is running and the
relay never pays for metrics per chunk.

Registered once per registry (a second status app on the same daemon, as in
tests, reuses it).
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from uproxy.connections import Conn, ConnTable
from uproxy.series import Counters

_REGISTERED: weakref.WeakKeyDictionary[CollectorRegistry, LiveCollector] = (
    weakref.WeakKeyDictionary())


class LiveCollector(Collector):
    def __init__(self, conns: ConnTable) -> None:
        self.conns = conns

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families(list(self.conns))

    def _families(self, table: list[Conn] | None = None) -> Iterator[GaugeMetricFamily]:
        tracked = GaugeMetricFamily(
            "uproxy_connections_tracked",
            "Entries in the live connection table now (any protocol), by service and state",
            labels=["service", "protocol", "state"])
        live = GaugeMetricFamily(
            "uproxy_live_bytes",
            "Bytes moved so far by connections that are open now, by service and direction "
            "(up: client to backend; down: backend to client)",
            labels=["service", "direction"])
        if table:
            states: Counter[tuple[str, str, str]] = Counter()
            up: Counter[str] = Counter()
            down: Counter[str] = Counter()
            for conn in table:
                name = str(conn.service)
                states[(name, conn.protocol, conn.state)] += 1
                up[name] += conn.bytes_up
                down[name] += conn.bytes_down
            for labels, count in sorted(states.items()):
                tracked.add_metric(list(labels), count)
            for name in sorted(up):
                live.add_metric([name, "up"], up[name])
                live.add_metric([name, "down"], down[name])
        yield tracked
        yield live


def register_live_collector(registry: CollectorRegistry, conns: ConnTable) -> None:
    existing = _REGISTERED.get(registry)
    if existing is not None:
        existing.conns = conns
        return
    collector = LiveCollector(conns)
    registry.register(collector)
    _REGISTERED[registry] = collector


def readings(conns: ConnTable) -> dict[str, Counters]:
    """Every service port's counters now, for :meth:`uproxy.series.Series.sample`.

    Bytes are those of closed connections plus what the open ones moved so far,
    so the byte rates follow long-lived connections while they run.
    """
    live: dict[str, tuple[int, int]] = {}
    for (service, _), (up, down) in conns.live_bytes().items():
        name = str(service)
        was = live.get(name, (0, 0))
        live[name] = (was[0] + up, was[1] + down)
    out = {}
    for service, t in conns.services.items():
        name = str(service)
        up, down = live.get(name, (0, 0))
        out[name] = Counters(t.opened + t.flows_opened, t.bytes_up + up, t.bytes_down + down,
                             t.open, t.flows)
    return out
