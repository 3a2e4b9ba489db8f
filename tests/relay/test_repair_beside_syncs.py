"""A full sync's repair of the rules runs beside the syncs that follow (issue 16).

Every ``--sync-period`` the daemon re-applies its whole tables (``nft -f``, or
``iptables-restore`` and the hook checks): 0.4-1.3 s at 10,000 Services. An endpoint
change made meanwhile is applied at once (an endpoint change touches no kernel rule),
not after the repair; the repair still puts back what someone deleted, both families.
The repair is slow here for a real reason (10,000 Services in the tables), and the test
waits on the in-flight state the daemon logs (``-v 1``), never on a clock.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from uproxy.demo.lab import Lab, LabError
from uproxy.demo.node import NodeProxy, endpoint_slice, service

SERVICES = 10_000
VIP = "10.0.0.20"
LATE = "10.0.0.21"
STARTED = "repairing the rules"
DONE = "rules repair done"
APPLIED = f"synced {SERVICES + 1} service ports (+0 -0 ~1)"


def _others() -> str:
    """``SERVICES`` ClusterIP Services (10.1.0.0/16, port 80), one endpoint each."""
    items: list[dict[str, Any]] = []
    for i in range(SERVICES):
        name = f"svc-{i}"
        items += [service(name, f"10.1.{i // 250}.{i % 250 + 1}",
                          [{"name": "http", "port": 80, "targetPort": 9376}], namespace="scale"),
                  endpoint_slice(name, ["10.250.0.1"],
                                 [{"name": "http", "port": 9376, "protocol": "TCP"}],
                                 namespace="scale")]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def _churn(node: NodeProxy, lab: Lab, pod: int) -> None:
    node.write("churn.yaml",
               service("churn", VIP, [{"name": "http", "port": 80, "targetPort": 9376}]),
               endpoint_slice("churn", [lab.pod_ip(pod)],
                              [{"name": "http", "port": 9376, "protocol": "TCP"}]))


def _wait_from(node: NodeProxy, needle: str, start: int, timeout: float) -> int:
    """Where ``needle`` is first logged at or after ``start`` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while (at := node.log.find(needle, start)) < 0:
        if time.monotonic() > deadline:
            raise LabError(f"{needle!r} not logged after {timeout}s:\n{node.log[-3000:]}")
        time.sleep(0.005)
    return at


def _delete_rules(lab: Lab, interception: str) -> None:
    if interception == "nftables":
        for family in ("ip", "ip6"):
            lab.run("node", ["nft", "delete", "table", family, "uproxy"])
    else:
        for tool in ("iptables", "ip6tables"):
            lab.run("node", [tool, "-t", "nat", "-D", "OUTPUT", "-m", "comment", "--comment",
                             "uproxy service portals", "-j", "UPROXY-SERVICES"])


@pytest.mark.parametrize("interception", ["nftables", "iptables"])
def test_an_endpoint_change_is_applied_while_a_full_sync_repairs_the_rules(
        lab: Lab, interception: str) -> None:
    lab.start_echo(1, tcp_ports=(9376,))
    lab.start_echo(2, tcp_ports=(9376,))
    node = NodeProxy(lab, args=["--sync-period", "2s", "--interception", interception,
                                "-v", "1"])
    node.write_text("others.json", _others())
    _churn(node, lab, 1)
    node.start(wait_for="default/churn", timeout=120)
    try:
        assert lab.probe("tcp", VIP, "80", "--count", "3")["counts"] == {"pod1": 3}
        _delete_rules(lab, interception)  # the next repair must put them back
        pod, interleaved = 1, False
        for _ in range(3):  # (a repair that ends before the change is even seen: the next)
            started = _wait_from(node, STARTED, len(node.log), timeout=30)
            pod = 3 - pod
            _churn(node, lab, pod)
            done = _wait_from(node, DONE, started, timeout=60)
            applied = node.log.find(APPLIED, started)
            if 0 <= applied < done:
                interleaved = True
                break
        assert interleaved, "the endpoint change waited for the repair each time"
        if interception == "nftables":
            assert "re-created the nftables tables someone removed: ip uproxy, ip6 uproxy" \
                in node.log
            node.wait_rules(lambda t: f"{VIP} . tcp . 80" in t, timeout=10)
            node.wait_rules(lambda t: "chain output" in t, timeout=10, family=6)
        else:
            assert "re-inserted 2 uproxy hooks someone removed" in node.log
            for family in (4, 6):
                node.wait_rules(lambda t: "-A OUTPUT" in t, timeout=10, family=family)
        r = lab.probe("tcp", VIP, "80", "--count", "3", ns="node")  # (the output hook)
        assert r["counts"] == {f"pod{pod}": 3}, r
        # A Service added while a repair runs: its rules wait for the repair (never
        # interleaved with it) and are in place after it.
        started = _wait_from(node, STARTED, len(node.log), timeout=30)
        node.write("late.yaml",
                   service("late", LATE, [{"name": "http", "port": 80, "targetPort": 9376}]),
                   endpoint_slice("late", [lab.pod_ip(1)],
                                  [{"name": "http", "port": 9376, "protocol": "TCP"}]))
        added = _wait_from(node, f"synced {SERVICES + 2} service ports (+1 -0 ~0)", started,
                           timeout=60)
        assert _wait_from(node, DONE, started, timeout=0) < added
        assert lab.probe("tcp", LATE, "80", "--count", "3")["counts"] == {"pod1": 3}
        metrics = lab.run("node", ["curl", "-sf", "-m", "5", "http://127.0.0.1:10249/metrics"])
        repairs = [float(line.split()[-1]) for line in metrics.stdout.splitlines() if
                   line.startswith("kubeproxy_sync_full_proxy_rules_duration_seconds_count")]
        assert repairs and repairs[0] >= 1, repairs
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []
