"""Connection set-up through the real daemon, IPv4 and IPv6: a dual-stack Service whose
endpoints are one that answers, one blackholed (its pod drops the SYNs) and one that
refuses (nothing listens): every client still reaches the one that answers, and the
daemon says which path set the connections up (with ``--masquerade-all`` the native
engine does it; transparent mode and ``UPROXY_NO_NATIVE`` keep it in Python).
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.support.matrix import Flavor
from uproxy.demo.lab import Lab
from uproxy.demo.node import NodeProxy, endpoint_slice, service
from uproxy.proxy.relay import engine_threads

pytestmark = pytest.mark.lab

V4, V6 = "10.0.0.31", "fd00:96::31"
PORTS = [{"name": "http", "port": 80, "targetPort": 6789}]
SLICE_PORTS = [{"name": "http", "port": 6789, "protocol": "TCP"}]


def metric(lab: Lab, name: str, **labels: str) -> float:
    text = lab.run("node", ["curl", "-sS", "--max-time", "3",
                            "http://127.0.0.1:10249/metrics"]).stdout
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_blackholed_and_refusing_endpoints_are_skipped_on_both_families(
        lab: Lab, flavor: Flavor) -> None:
    if shutil.which("iptables") is None or shutil.which("ip6tables") is None:
        pytest.skip("iptables/ip6tables needed to blackhole a pod")
    lab.start_echo(1, tcp_ports=(6789,))
    lab.start_echo(2, tcp_ports=(6789,))  # pod3 listens on nothing: it refuses
    for tool in ("iptables", "ip6tables"):  # pod2: a blackhole (in its own namespace)
        lab.run(lab.pod_ns(2), [tool, "-w", "5", "-A", "INPUT", "-p", "tcp", "--dport",
                                "6789", "-j", "DROP"])
    svc = service("setup", V4, PORTS, clusterIPs=[V4, V6], ipFamilyPolicy="PreferDualStack",
                  ipFamilies=["IPv4", "IPv6"])
    node = NodeProxy(lab, loop=flavor.loop, native=flavor.native, args=["--masquerade-all"])
    node.write("setup.yaml", svc,
               endpoint_slice("setup", lab.pod_ips[:3], SLICE_PORTS, name="setup-v4"),
               endpoint_slice("setup", lab.pod_ips6[:3], SLICE_PORTS, name="setup-v6"))
    node.start(wait_for="default/setup:http cluster IP")
    try:
        for host in (V4, V6):
            result = lab.probe("tcp", host, "80", "--count", "30", "--concurrency", "3",
                               "--timeout", "5")
            assert result["counts"] == {"pod1": 30}, result
            assert sum(result["errors"].values()) == 0, result
        path = "native" if flavor.native else "python"
        other = "python" if flavor.native else "native"
        assert metric(lab, "uproxy_relay_setup_total", path=path) == 60
        assert metric(lab, "uproxy_relay_setup_total", path=other) == 0
        failures = metric(lab, "uproxy_endpoint_connect_failures_total",
                          service="default/setup:http")
        assert failures >= 4, failures  # each bad endpoint of each family failed at least once
        assert metric(lab, "uproxy_connections_total", service="default/setup:http",
                      result="ok") == 60
        if flavor.native:  # the daemon's engine threads (--engine-threads auto) set them up
            threads = engine_threads(0)
            per = [metric(lab, "uproxy_engine_thread_connections_total", thread=str(i))
                   for i in range(threads + 1)]
            assert sum(per) == 60 and per[threads] == 0, per
            assert metric(lab, "uproxy_engine_thread_connections_active",
                          thread=str(threads - 1)) == 0
            assert f'uproxy_engine_thread_connections_active{{thread="{threads - 1}"}}' in \
                lab.run("node", ["curl", "-sS", "--max-time", "3",
                                 "http://127.0.0.1:10249/metrics"]).stdout
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []


def _peer(lab: Lab, host: str, port: int) -> str:
    """The address the backend saw for an HTTP request through ``host:port``."""
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    done = lab.run("client", ["curl", "-sS", "-m", "5", "-g", url], check=False)
    assert done.returncode == 0, (host, port, done.stderr)
    return str(json.loads(done.stdout)["client"]).rpartition(":")[0].strip("[]")


def test_transparent_connections_keep_the_client_address_on_both_families(
        lab: Lab, flavor: Flavor) -> None:
    """Transparent mode (the default): the backend sees the client's address, IPv4 and
    IPv6, and on the native path the engine set the connections up (binding the backend
    socket to the client's address itself). The first sync pushed each listener to the
    engine once, with its transparent bits (not again when transparent mode came on)."""
    lab.start_echo(1, tcp_ports=(6789,))
    svc = service("setup", V4, PORTS, clusterIPs=[V4, V6], ipFamilyPolicy="PreferDualStack",
                  ipFamilies=["IPv4", "IPv6"])
    node = NodeProxy(lab, loop=flavor.loop, native=flavor.native, args=["-v", "1"])
    node.write("setup.yaml", svc,
               endpoint_slice("setup", [lab.pod_ip(1)], SLICE_PORTS, name="setup-v4"),
               endpoint_slice("setup", [lab.pod_ip6(1)], SLICE_PORTS, name="setup-v6"))
    node.start(wait_for="default/setup:http cluster IP")
    try:
        if "transparent backend connections on:" not in node.log:
            pytest.skip("transparent mode refused on this node: " + node.log[-300:])
        assert _peer(lab, V4, 80) == lab.client_ip
        assert _peer(lab, V6, 80) == lab.client_ip6
        path = "native" if flavor.native else "python"
        assert metric(lab, "uproxy_relay_setup_total", path=path) == 2
        assert "listeners pushed again" not in node.log
        text = lab.run("node", ["curl", "-sS", "--max-time", "3",
                                "http://127.0.0.1:10249/metrics"]).stdout
        for what in ("fin", "ack"):  # the engine's saved segments (counted in tests/relay)
            assert (f'uproxy_engine_merged_segments_total{{what="{what}"}}' in text) \
                == flavor.native, what
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []
