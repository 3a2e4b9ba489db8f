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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from uproxy.connections import Conn, ConnTable, EndpointKey, Tally
from uproxy.series import Counters

Family = GaugeMetricFamily | CounterMetricFamily
_REGISTERED: weakref.WeakKeyDictionary[CollectorRegistry, LiveCollector] = (
    weakref.WeakKeyDictionary())


class LiveCollector(Collector):
    def __init__(self, conns: ConnTable) -> None:
        self.conns = conns

    def describe(self) -> Iterator[Family]:
        yield from self._families()
        yield from self._endpoint_families(live=False)

    def collect(self) -> Iterator[Family]:
        yield from self._families(list(self.conns))
        yield from self._endpoint_families(live=True)

    def _endpoint_families(self, *, live: bool) -> Iterator[Family]:
        """Per endpoint, from the table's tallies (nothing on the data path): how a Service
        spreads its traffic, for Grafana's balance panels."""
        opened = CounterMetricFamily(
            "uproxy_endpoint_connections",
            "TCP connections and UDP flows established to an endpoint since start",
            labels=["service", "endpoint"])
        active = GaugeMetricFamily(
            "uproxy_endpoint_connections_active",
            "TCP connections and UDP flows open to an endpoint now", labels=["service", "endpoint"])
        moved = CounterMetricFamily(
            "uproxy_endpoint_bytes",
            "Bytes relayed to and from an endpoint, open connections included "
            "(up: client to backend; down: backend to client)",
            labels=["service", "endpoint", "direction"])
        if live:
            now = self.conns.live_bytes()
            for key, tally in sorted(self.conns.endpoints.items(), key=_endpoint_order):
                labels = [str(key[0]), _hostport(key[1])]
                opened.add_metric(labels, tally.opened + tally.flows_opened)
                active.add_metric(labels, tally.open + tally.flows)
                up, down = now.get(key, (0, 0))
                moved.add_metric([*labels, "up"], tally.bytes_up + up)
                moved.add_metric([*labels, "down"], tally.bytes_down + down)
        yield opened
        yield active
        yield moved

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


def _endpoint_order(item: tuple[EndpointKey, Tally]) -> tuple[str, str, int]:
    key = item[0]
    return (str(key[0]), key[1][0], key[1][1])


def _hostport(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


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
