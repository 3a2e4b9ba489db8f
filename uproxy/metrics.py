"""Prometheus metrics, on a registry of our own (never the global one).

kube-proxy's names where they mean the same thing; ``uproxy_*`` for the rest; the
standard ``process_*`` metrics (memory, CPU, open files) as every Go component has them.
The data path only increments counters at connection open/close; byte totals
of live connections are added at scrape time by the status server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_SYNC_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_PROG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time a sync of proxy rules and sockets took", buckets=_SYNC_BUCKETS, registry=r)
        self.sync_full_duration = Histogram(  # (the repair: beside the syncs, not in them)
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "Time a full sync's repair of the rules took (whole tables, hooks)",
            buckets=_SYNC_BUCKETS, registry=r)
        self.sync_last = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the last successful sync finished", registry=r)
        self.network_programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "From an endpoint change (last-change-trigger-time) to rules applied",
            buckets=_PROG_BUCKETS, registry=r)
        self.connections_total = Counter(
            "uproxy_connections_total", "Connections accepted, by service and result",
            ["service", "protocol", "result"], registry=r)
        self.connections_active = Gauge(
            "uproxy_connections_active", "Connections open now, by service",
            ["service", "protocol"], registry=r)
        self.bytes_total = Counter(
            "uproxy_bytes_total", "Bytes relayed by closed connections, by service and direction",
            ["service", "direction"], registry=r)
        self.endpoint_failures = Counter(
            "uproxy_endpoint_connect_failures_total", "Failed connects to endpoints",
            ["service", "endpoint"], registry=r)
        self.relay_path = Counter(
            "uproxy_relay_connections_total", "Connections by relay path (native or python)",
            ["path"], registry=r)
        self.relay_setup = Counter(
            "uproxy_relay_setup_total",
            "TCP connections set up (accept, endpoint choice, connect), by path: in the native "
            "engine or in Python", ["path"], registry=r)
        self.udp_flows_active = Gauge(
            "uproxy_udp_flows_active", "UDP flows held now", ["service"], registry=r)
        self.affinity_pins = Gauge(
            "uproxy_affinity_pins", "ClientIP affinity pins held now (client -> endpoint), in "
            "the Python balancer and the native engine", registry=r)
        self.udp_flows_evicted = Counter(
            "uproxy_udp_flows_evicted_total", "UDP flows evicted from a full table",
            ["service"], registry=r)
        self.sync_errors = Counter(
            "uproxy_sync_errors_total", "Syncs that failed (iptables errors)", registry=r)

    def time_wait_from(self, read: Callable[[], tuple[dict[str, int], int]]) -> None:
        """``uproxy_transparent_time_wait_destroyed_total{how}`` and
        ``uproxy_transparent_time_wait_sweeps_total``, read at scrape time from the relays'
        and the sweep's own counts: ((``at_close``, ``sweep``), sweeps)."""
        self.registry.register(_TimeWait(read))


    def engine_threads_from(self, read: Callable[[], list[dict[str, int]]]) -> None:
        """``uproxy_engine_thread_connections_total{thread}`` and
        ``uproxy_engine_thread_connections_active{thread}``: what each native engine thread
        (``--engine-threads``) set up and relays; ``uproxy_engine_merged_segments_total{what}``:
        the segments the engine saved (all threads). Read at scrape time (``read``: the
        relay's per-thread stats; an empty list on the Python twin)."""
        self.registry.register(_EngineThreads(read))


class _EngineThreads(Collector):
    def __init__(self, read: Callable[[], list[dict[str, int]]]) -> None:
        self._read = read

    def describe(self) -> list[CounterMetricFamily | GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        opened, live, merged = self._families()
        threads = self._read()
        for i, stats in enumerate(threads):
            opened.add_metric([str(i)], stats.get("setups_opened", 0))
            live.add_metric([str(i)], stats.get("conns_live", 0))
        if threads:
            for what, key in (("fin", "fins_with_data"), ("ack", "acks_with_data")):
                merged.add_metric([what], sum(t.get(key, 0) for t in threads))
        yield opened
        yield live
        yield merged

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, GaugeMetricFamily, CounterMetricFamily]:
        return (CounterMetricFamily(
                    "uproxy_engine_thread_connections",
                    "Connections a native engine thread accepted and connected to an endpoint "
                    "(--engine-threads; the thread's number)", labels=["thread"]),
                GaugeMetricFamily(
                    "uproxy_engine_thread_connections_active",
                    "Connections a native engine thread relays now (set up there or handed "
                    "to it)", labels=["thread"]),
                CounterMetricFamily(
                    "uproxy_engine_merged_segments",
                    "TCP segments the native engine saved by merging: a FIN sent on the "
                    "segment of a direction's last bytes (fin), a backend handshake's last "
                    "ACK sent with the client's first bytes (ack)", labels=["what"]))


class _TimeWait(Collector):
    def __init__(self, read: Callable[[], tuple[dict[str, int], int]]) -> None:
        self._read = read

    def describe(self) -> list[CounterMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterator[CounterMetricFamily]:
        destroyed, sweeps = self._families()
        counts, runs = self._read()
        for how, count in sorted(counts.items()):
            destroyed.add_metric([how], count)
        sweeps.add_metric([], runs)
        yield destroyed
        yield sweeps

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily]:
        return (CounterMetricFamily(
                    "uproxy_transparent_time_wait_destroyed",
                    "Transparent backend sockets' TIME_WAIT sockets destroyed, by how: "
                    "at_close (by the relay, by their exact address) or sweep",
                    labels=["how"]),
                CounterMetricFamily(
                    "uproxy_transparent_time_wait_sweeps",
                    "Sweeps for transparent TIME_WAIT sockets (each a walk of every TCP "
                    "socket of the node; only for ones not destroyed at close)"))

