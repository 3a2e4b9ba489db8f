"""Traffic to two pods shows up per endpoint: a real ``uproxy run`` in the lab's node namespace
(real iptables REDIRECT), the probe in the client namespace, echo servers in two pods. The
per-endpoint counters of ``/api/v1/endpoints`` must equal what the probe saw per pod, for TCP
connections and UDP flows. IPv4 only (this branch's lab has no IPv6)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.waiting import wait_until
from uproxy.demo.lab import Lab
from uproxy.demo.node import NodeProxy, endpoint_slice, service

pytestmark = pytest.mark.lab

STATUS = "http://127.0.0.1:10249"
CLUSTER_IP = "10.0.0.190"


@pytest.fixture
def node(lab: Lab) -> Iterator[NodeProxy]:
    for pod in (1, 2):
        lab.start_echo(pod, tcp_ports=(6789,), udp_ports=(5353,))
    proxy = NodeProxy(lab)
    proxy.write("spread.yaml",
                service("spread", CLUSTER_IP, [
                    {"name": "tcp", "port": 80, "targetPort": 6789, "protocol": "TCP"},
                    {"name": "udp", "port": 53, "targetPort": 5353, "protocol": "UDP"}]),
                endpoint_slice("spread", lab.pod_ips[:2], [
                    {"name": "tcp", "port": 6789, "protocol": "TCP"},
                    {"name": "udp", "port": 5353, "protocol": "UDP"}]))
    proxy.start(wait_for="default/spread:udp cluster IP")
    yield proxy
    if proxy.proc is not None and proxy.proc.poll() is None:
        assert proxy.stop() == 0


def endpoints(lab: Lab) -> dict[tuple[str, str], dict[str, Any]]:
    out = lab.run("node", ["curl", "-s", "-m", "5", f"{STATUS}/api/v1/endpoints"]).stdout
    (item,) = [i for i in json.loads(out)["items"] if i["name"] == "spread"]
    return {(e["portName"], e["ip"]): e["traffic"] for e in item["endpoints"]}


def probe(lab: Lab, *args: str) -> dict[str, Any]:
    out = lab.run("client", [sys.executable, "-m", "uproxy.demo.probe", *args], timeout=60)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_traffic_to_two_pods_shows_per_endpoint(lab: Lab, node: NodeProxy) -> None:
    pods = {f"pod{i + 1}": ip for i, ip in enumerate(lab.pod_ips[:2])}
    tcp = probe(lab, "tcp", CLUSTER_IP, "80", "--count", "40", "--concurrency", "4")
    assert sum(tcp["counts"].values()) == 40 and tcp["counts"].keys() == pods.keys(), tcp

    def tcp_closed() -> bool:
        return all(endpoints(lab)[("tcp", ip)]["open"] == 0 for ip in pods.values())

    wait_until(tcp_closed, timeout=10, interval=0.1, message="the connections to close")
    counts = endpoints(lab)
    for pod, ip in pods.items():
        t = counts[("tcp", ip)]
        n = tcp["counts"][pod]
        # Every connection the probe saw answered by this pod, and its bytes:
        # "whoami\n" up, "podN 6789\n" down.
        assert (t["opened"], t["failed"], t["bytesUp"], t["bytesDown"]) == (n, 0, 7 * n, 10 * n)

    udp = probe(lab, "udp", CLUSTER_IP, "53", "--count", "30", "--new-socket-each")
    assert sum(udp["counts"].values()) == 30, udp
    counts = endpoints(lab)
    for pod, ip in pods.items():
        t = counts[("udp", ip)]
        n = udp["counts"].get(pod, 0)
        # One flow per client socket; flows stay until their idle timeout.
        assert t["udpFlowsOpened"] == n and t["udpFlows"] == n, (pod, t, udp)
        assert t["opened"] == 0
    assert sum(1 for pod in pods if udp["counts"].get(pod)) == 2, udp

    wide = lab.run("node", [sys.executable, "-m", "uproxy", "get", "endpoints", "-o", "wide",
                            "--status", STATUS], timeout=20).stdout
    rows = [line.split() for line in wide.split("\n\n", 1)[1].splitlines()[1:]]
    shown = {(r[3], r[2].rsplit(":", 1)[0]): r for r in rows if r[1] == "spread"}
    for pod, ip in pods.items():
        assert shown[("tcp/TCP", ip)][6] == str(tcp["counts"][pod])  # CONNECTIONS
        assert shown[("udp/UDP", ip)][10] == str(udp["counts"].get(pod, 0))  # UDP-FLOWS


def events(lab: Lab) -> list[dict[str, Any]]:
    out = lab.run("node", ["curl", "-s", "-m", "5", f"{STATUS}/api/v1/events"]).stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def test_event_log_shows_a_port_in_use_and_a_rule_repair(lab: Lab) -> None:
    lab.start_echo(1, tcp_ports=(9376,))
    blocker = lab.spawn("node", ["python3", "-c",
                                 "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',30091));"
                                 "s.listen(); time.sleep(60)"], "blocker")
    lab.wait_port("node", "0.0.0.0", 30091, proc=blocker)
    node = NodeProxy(lab, args=["--sync-period", "1s"])
    sp = [{"name": "", "port": 9376, "protocol": "TCP"}]
    node.write("taken.yaml", service("taken", "10.0.0.191",
                                     [{"port": 80, "targetPort": 9376, "nodePort": 30091}],
                                     type="NodePort"),
               endpoint_slice("taken", [lab.pod_ip(1)], sp))
    node.start(wait_for="default/taken: cluster IP")
    try:
        node.wait_log("nodePort 30091")
        # Someone deletes uproxy's OUTPUT hook (nftables: its table): the next full sync
        # puts it back.
        if node.interception == "nftables":
            lab.run("node", ["nft", "delete", "table", "ip", "uproxy"])
        else:
            lab.run("node", ["iptables", "-t", "nat", "-D", "OUTPUT", "-m", "comment",
                             "--comment", "uproxy service portals", "-j", "UPROXY-SERVICES"])
        found: list[dict[str, Any]] = []

        def logged() -> bool:
            nonlocal found
            found = events(lab)
            kinds = {e["kind"] for e in found}
            return {"RulesRepaired", "Warning", "ServiceAdded"} <= kinds

        wait_until(logged, timeout=15, interval=0.2, message=lambda: f"events: {found}")
        in_use = [e for e in found if e["kind"] == "Warning" and "30091" in e["message"]]
        assert in_use and in_use[0]["object"] == "Service default/taken", found
        assert in_use[0]["level"] == "warning" and "already in use" in in_use[0]["message"]
        (repair,) = [e for e in found if e["kind"] == "RulesRepaired"]
        if node.interception == "nftables":
            assert repair["object"] == "nftables tables", repair
            assert "re-created the nftables tables someone removed: ip uproxy" \
                in repair["message"]
        else:
            assert repair["object"] == "iptables nat hooks" and "re-inserted 1" in repair[
                "message"]
        assert all(e["time"] > 0 for e in found)
    finally:
        node.stop()
        blocker.kill()
        blocker.wait(5)
