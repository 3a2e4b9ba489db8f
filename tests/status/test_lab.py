"""The status and health servers of a real ``uproxy run`` in the lab's node namespace.

Real iptables, real pods, real clients: what ``uproxy get`` and the API show must
match what the kernel and the clients see (the rules listed are the lines
``iptables-save`` prints; the connections listed are the probe's).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.waiting import wait_until
from uproxy.demo.lab import CLIENT_IP, Lab
from uproxy.demo.node import NodeProxy, endpoint_slice, service
from uproxy.rules import parse_rules

pytestmark = pytest.mark.lab

STATUS = "http://127.0.0.1:10249"
HEALTH = "http://127.0.0.1:10256"
PORTS = [{"name": "port1", "port": 6789, "targetPort": 6789},
         {"name": "port2", "port": 9876, "targetPort": 9876}]
SLICE_PORTS = [{"name": "port1", "port": 6789, "protocol": "TCP"},
               {"name": "port2", "port": 9876, "protocol": "TCP"}]


@pytest.fixture
def node(lab: Lab) -> Iterator[NodeProxy]:
    for pod in (1, 2):
        lab.start_echo(pod, tcp_ports=(6789, 9876))
    proxy = NodeProxy(lab)
    proxy.write("multi-port.yaml", service("multi-port", "10.0.0.180", PORTS),
                endpoint_slice("multi-port", lab.pod_ips[:2], SLICE_PORTS))
    proxy.start(wait_for="default/multi-port:port2 cluster IP")
    # The rules show in iptables-save a moment before the sync that wrote them completes.
    wait_until(lambda: curl(lab, HEALTH + "/readyz")[0] == 200, timeout=10,
               message=lambda: f"uproxy never became ready:\n{proxy.log}")
    yield proxy
    if proxy.proc is not None and proxy.proc.poll() is None:
        assert proxy.stop() == 0


def uproxy_get(lab: Lab, *args: str) -> str:
    return lab.run("node", [sys.executable, "-m", "uproxy", "get", *args, "--status", STATUS],
                   timeout=20).stdout


def curl(lab: Lab, url: str) -> tuple[int, str]:
    out = lab.run("node", ["curl", "-s", "-m", "5", "-w", "\n%{http_code}", url]).stdout
    body, _, code = out.rpartition("\n")
    return int(code), body


def test_get_tables_match_the_lab(lab: Lab, node: NodeProxy) -> None:
    svc = uproxy_get(lab, "svc").splitlines()
    assert svc[0].split() == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    assert svc[1].split()[:5] == ["multi-port", "ClusterIP", "10.0.0.180", "<none>",
                                  "6789/TCP,9876/TCP"]
    ep = uproxy_get(lab, "ep").splitlines()
    p1, p2 = lab.pod_ips[:2]
    assert ep[1].split()[:2] == ["multi-port", f"{p1}:6789,{p2}:6789,{p1}:9876"]
    assert ep[1].split()[2:5] == ["+", "1", "more..."]


def test_rules_shown_are_the_rules_applied(lab: Lab, node: NodeProxy) -> None:
    code, body = curl(lab, f"{STATUS}/api/v1/rules")
    assert code == 200
    data = json.loads(body)
    assert data["applied"] is True
    assert data["interception"] == node.interception
    if node.interception == "iptables":
        applied = [line for line in node.iptables_save().splitlines()
                   if line.startswith("-A UPROXY-SERVICES")]
        assert sorted(data["lines"]) == sorted(applied) and len(applied) == 3  # + KEEP_NAT
    # The redirects shown (as iptables lines) are the ones in place, whatever the interception.
    shown = parse_rules("\n".join(data["lines"]))
    assert sorted(shown) == sorted(node.redirects()) and len(shown) == 2


def test_live_connections_from_the_client_namespace(lab: Lab, node: NodeProxy) -> None:
    # Four connections that stay open for a while, from the client namespace.
    probe = lab.spawn("client", [sys.executable, "-m", "uproxy.demo.probe", "tcp", "10.0.0.180",
                                 "9876", "--count", "4", "--concurrency", "4", "--hold", "4"],
                      "probe-hold")
    try:
        data: dict[str, Any] = {}

        def four_answered() -> bool:
            nonlocal data
            data = json.loads(uproxy_get(lab, "conn", "-o", "json"))
            return len(data["items"]) == 4 and all(c["bytes_down"] > 0 for c in data["items"])

        wait_until(four_answered, timeout=10, interval=0.1,
                   message=lambda: f"four answered connections: {data}")
        assert len(data["items"]) == 4, data
        for c in data["items"]:
            assert c["client"].startswith(CLIENT_IP + ":")
            assert c["service"] == "default/multi-port:port2" and c["state"] == "open"
            assert c["backend"] in {f"{ip}:9876" for ip in lab.pod_ips[:2]}
            assert (c["bytes_up"], c["bytes_down"]) == (7, 10)  # "whoami\n", "podN 9876\n"
        table = uproxy_get(lab, "conn").splitlines()
        assert table[0].split() == ["CLIENT", "SERVICE", "BACKEND", "PROTO", "AGE", "BYTES-IN",
                                    "BYTES-OUT", "STATE", "PATH"]
        assert len(table) == 5
        code, metrics = curl(lab, f"{STATUS}/metrics")
        assert code == 200
        assert ('uproxy_connections_tracked{protocol="TCP",service="default/multi-port:port2",'
                'state="open"} 4.0') in metrics
    finally:
        try:
            probe.wait(15)
        except subprocess.TimeoutExpired:
            probe.kill()
            raise
    assert json.loads(lab.log("probe-hold").strip().splitlines()[-1])["counts"].keys() <= {
        "pod1", "pod2"}
    wait_until(lambda: not json.loads(uproxy_get(lab, "conn", "-o", "json"))["items"],
               timeout=10, interval=0.1, message="closed connections stayed in the table")


def test_health_endpoints(lab: Lab, node: NodeProxy) -> None:
    for path in ("/healthz", "/livez", "/readyz"):
        code, body = curl(lab, HEALTH + path)
        assert code == 200, (path, body)
    code, body = curl(lab, HEALTH + "/healthz")
    data = json.loads(body)
    assert data["nodeEligible"] is True and data["lastUpdated"].endswith("Z")
    # The status server listens on the node's loopback only (the default).
    out = lab.run("node", ["ss", "-Hltn", "sport", "=", ":10249"]).stdout
    assert "127.0.0.1:10249" in out
