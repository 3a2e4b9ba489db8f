"""TCP services over IPv6 and dual-stack, end to end: the real daemon in the lab's node
namespace, real ``ip6tables`` and ``iptables``, echo servers in pod namespaces listening on
both families, clients in the client namespace and on the node itself.

Named after Kubernetes' e2e "Granular Checks: Services Secondary IP Family [LinuxOnly]"
(test/e2e/network/dual_stack.go), which repeats the Service checks on ``clusterIPs[1]``
and ``SecondaryNodeIP:NodePort``. Each family is served by its own sockets and chooses
among its own endpoints (kube-proxy's per-family proxiers): the dual-stack Service here
has different endpoints per family, and each family must reach only its own.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from tests.relay.test_setup_lab import metric
from tests.support.matrix import Flavor
from tests.support.waiting import wait_until
from uproxy.demo.lab import Lab
from uproxy.demo.node import NodeProxy, endpoint_slice, service

pytestmark = pytest.mark.lab

V4, V6 = "10.0.0.30", "fd00:96::30"
SINGLE6 = "fd00:96::40"
EXTERNAL6, LB6 = "2001:db8::7", "2001:db8::8"
NODE_PORT = 30080
PORTS = [{"name": "http", "port": 80, "targetPort": 6789, "nodePort": NODE_PORT}]
SLICE_PORTS = [{"name": "http", "port": 6789, "protocol": "TCP"}]


def dual_stack_objects(lab: Lab) -> list[dict[str, object]]:
    """A PreferDualStack LoadBalancer Service: IPv4 endpoint pod1, IPv6 endpoints pod2+pod3."""
    svc = service("dual", V4, PORTS, type="LoadBalancer", clusterIPs=[V4, V6],
                  ipFamilyPolicy="PreferDualStack", ipFamilies=["IPv4", "IPv6"],
                  externalIPs=[EXTERNAL6],
                  status={"loadBalancer": {"ingress": [{"ip": LB6}]}})
    return [svc,
            endpoint_slice("dual", [lab.pod_ip(1)], SLICE_PORTS, name="dual-v4"),
            endpoint_slice("dual", [lab.pod_ip6(2), lab.pod_ip6(3)], SLICE_PORTS,
                           name="dual-v6")]


def who(lab: Lab, host: str, port: int, *, ns: str = "client", count: int = 30,
        source: str | None = None) -> dict[str, int]:
    args = ["tcp", host, str(port), "--count", str(count), "--concurrency", "5",
            "--timeout", "3"]
    if source:
        args += ["--source-ip", source]
    result = lab.probe(*args, ns=ns)
    assert sum(result["errors"].values()) == 0, result
    counts: dict[str, int] = result["counts"]
    assert sum(counts.values()) == count, result
    return counts


def test_should_function_for_pod_service_http_secondary_ip_family(lab: Lab,
                                                                   flavor: Flavor) -> None:
    """e2e "should function for pod-Service: http" (and node-Service: http) on the secondary
    family: ClusterIP, NodePort, externalIP and LoadBalancer IP over IPv6, from a client
    and from the node itself (OUTPUT); the IPv4 family still reaches only its own endpoint."""
    for pod in (1, 2, 3):
        lab.start_echo(pod, tcp_ports=(6789,))
    node = NodeProxy(lab, loop=flavor.loop, native=flavor.native)
    node.write("dual.yaml", *dual_stack_objects(lab))
    node.start(wait_for="default/dual:http loadbalancer IP")
    try:
        rules6 = node.wait_rules(lambda t: LB6 in t, family=6)
        mine = [r for r in node.redirects(6) if r[0].startswith("default/dual:http")]
        assert sorted(r[1] for r in mine) == sorted([EXTERNAL6, LB6, V6]), rules6
        if node.interception == "nftables":  # one map lookup on each hook
            assert rules6.count("ip6 daddr . meta l4proto . th dport map @services") == 2
            assert "hook output" in rules6 and "hook prerouting" in rules6
        else:
            assert ('-A OUTPUT -m comment --comment "uproxy service portals" '
                    '-j UPROXY-SERVICES') in rules6
            assert ('-A PREROUTING -m comment --comment "uproxy service portals" '
                    '-j UPROXY-SERVICES') in rules6
        rules4 = node.redirects()
        assert V4 in {r[1] for r in rules4} and V6 not in {r[1] for r in rules4}

        both = {"pod2", "pod3"}
        assert set(who(lab, V6, 80)) == both  # secondary ClusterIP
        assert set(who(lab, V4, 80)) == {"pod1"}  # each family only its own endpoints
        assert set(who(lab, lab.node_ip6, NODE_PORT)) == both  # secondary nodeIP:NodePort
        assert set(who(lab, lab.node_ip, NODE_PORT)) == {"pod1"}
        assert set(who(lab, EXTERNAL6, 80)) == both
        assert set(who(lab, LB6, 80)) == both
        # node-Service: the node's own connections (ip6tables OUTPUT -> ::1)
        assert set(who(lab, V6, 80, ns="node")) == both
        assert set(who(lab, lab.node_ip6, NODE_PORT, ns="node")) == both
        # the proxy reaches the endpoint over IPv6 too, from the client's own address
        # (transparent mode, issue 17: ClusterIP traffic keeps the client's address)
        body = lab.run("client", ["curl", "-sS", "--max-time", "5", f"http://[{V6}]/x"]).stdout
        assert json.loads(body)["client"].rsplit(":", 1)[0] == lab.client_ip6
        # large requests: http with a 2000-byte body (e2e "should be able to handle large
        # requests: http"), and a bulk echo with half-close over IPv6
        big = lab.run("client", ["curl", "-sS", "--max-time", "5", "--data-binary",
                                 "x" * 2000, f"http://[{V6}]/big"]).stdout
        assert json.loads(big)["pod"] in both
        echo = lab.probe("echo", V6, "80", "--bytes", str(4 << 20))
        assert echo["ok"] and echo["received"] == 4 << 20, echo
        assert f"relay path: {flavor.path}" in node.log
        assert "IPv6 is not served" not in node.log
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []  # both families cleaned up


def test_single_stack_ipv6_service_and_client_ip_affinity(lab: Lab, flavor: Flavor) -> None:
    """e2e "should function for client IP based session affinity: http [LinuxOnly]" on a
    single-stack IPv6 Service; a single-stack IPv4 Service's NodePort is not served on the
    node's IPv6 address (nor the IPv6 one's on IPv4)."""
    for pod in (1, 2, 3):
        lab.start_echo(pod, tcp_ports=(6789,))
    node = NodeProxy(lab, loop=flavor.loop, native=flavor.native)
    node.write("v6.yaml",
               service("sticky6", SINGLE6, [{"name": "http", "port": 80, "targetPort": 6789,
                                             "nodePort": 30081}],
                       type="NodePort", ipFamilies=["IPv6"], ipFamilyPolicy="SingleStack",
                       sessionAffinity="ClientIP"),
               endpoint_slice("sticky6", lab.pod_ips6, SLICE_PORTS))
    node.write("v4.yaml",
               service("only4", "10.0.0.41", [{"name": "http", "port": 80, "targetPort": 6789,
                                               "nodePort": 30082}], type="NodePort"),
               endpoint_slice("only4", lab.pod_ips, SLICE_PORTS))
    node.start(wait_for="default/sticky6:http cluster IP")
    try:
        assert SINGLE6 not in node.rules_text()
        first = who(lab, SINGLE6, 80)
        assert len(first) == 1, first  # one client: one endpoint, every time
        lab.add_client_ip("fd00:99::3")
        other = who(lab, SINGLE6, 80, source="fd00:99::3")
        assert len(other) == 1, other
        assert len(who(lab, lab.node_ip6, 30081)) == 1  # affinity holds on the NodePort
        assert set(who(lab, lab.node_ip, 30082)) == {"pod1", "pod2", "pod3"}
        refused4 = lab.probe("tcp", lab.node_ip, "30081", "--count", "1", "--timeout", "2")
        refused6 = lab.probe("tcp", lab.node_ip6, "30082", "--count", "1", "--timeout", "2")
        assert refused4["errors"]["refused"] == 1 and refused6["errors"]["refused"] == 1
        # e2e "should function for endpoint-Service: http": an endpoint reaches its own
        # Service over IPv6 (hairpin), sticking to one endpoint as well
        assert len(who(lab, SINGLE6, 80, ns="pod1", count=10)) == 1
        # The affine service was set up by the flavor's path (the engine's pins when native)
        other = "python" if flavor.native else "native"
        assert metric(lab, "uproxy_relay_setup_total", path=flavor.path) > 0
        assert metric(lab, "uproxy_relay_setup_total", path=other) == 0
        # e2e "should update endpoints: http": pod3 alone in the IPv6 slice
        node.write("v6.yaml",
                   service("sticky6", SINGLE6, [{"name": "http", "port": 80,
                                                 "targetPort": 6789, "nodePort": 30081}],
                           type="NodePort", ipFamilies=["IPv6"],
                           ipFamilyPolicy="SingleStack", sessionAffinity="ClientIP"),
                   endpoint_slice("sticky6", [lab.pod_ip6(3)], SLICE_PORTS))
        wait_until(lambda: set(who(lab, SINGLE6, 80, count=5)) == {"pod3"},
                   message="IPv6 traffic reaches only the remaining endpoint")
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []


@pytest.mark.parametrize("lack", ["ipv6-disabled", "no-ip6tables"])
def test_a_family_the_node_lacks_is_skipped_with_one_log_line(lab: Lab, lack: str) -> None:
    lab.start_echo(1, tcp_ports=(6789,))
    env_args: list[str] = []
    if lack == "ipv6-disabled":
        lab.run("node", ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                         "net.ipv6.conf.default.disable_ipv6=1"])
        reason = "the node has no IPv6 address (IPv6 disabled)"
        if shutil.which("nft"):  # an earlier run's IPv6 table: removed at start
            lab.run("node", ["nft", "add", "table", "ip6", "uproxy"])
    else:  # the same tools as usual, except the ip6tables ones
        tools = lab.workdir / "bin"
        tools.mkdir()
        for tool in ("iptables", "iptables-save", "iptables-restore", "conntrack", "ip"):
            found = shutil.which(tool)
            assert found is not None, tool
            (tools / tool).symlink_to(found)
        env_args = ["env", f"PATH={tools}"]
        reason = "ip6tables is not installed"
    # (without ip6tables the PATH has no nft either: auto chooses iptables, and says so)
    node = NodeProxy(lab, prefix=env_args,
                     args=["--interception", "iptables"] if env_args else [])
    node.write("dual.yaml", *dual_stack_objects(lab))
    node.start(wait_for="default/dual:http cluster IP")
    try:
        assert set(who(lab, V4, 80)) == {"pod1"}
        assert node.log.count("IPv6 is not served") == 1
        assert f"IPv6 is not served: {reason}; IPv6 Service addresses are skipped" in node.log
        assert " E " not in node.log and "Traceback" not in node.log
        if lack == "no-ip6tables":
            assert "UPROXY" not in node.iptables_save(6)
        assert node.nft_tables(6) == ""  # nor an ip6 uproxy table in nftables mode
    finally:
        assert node.stop() == 0
    assert [ln for ln in node.iptables_save().splitlines() if "UPROXY" in ln] == []
    assert node.nft_tables(None) == ""


@pytest.mark.parametrize("interception", ["iptables", "nftables"])
def test_resync_repairs_deleted_ipv6_rules(lab: Lab, interception: str) -> None:
    """The periodic full sync covers ip6tables: a flushed chain and a deleted hook return
    (nftables: the deleted ``ip6 uproxy`` table returns)."""
    if interception == "nftables" and shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    lab.start_echo(1, tcp_ports=(6789,))
    node = NodeProxy(lab, args=["--sync-period", "1s", "--interception", interception])
    node.write("v6.yaml", service("fix6", SINGLE6, [{"name": "http", "port": 80,
                                                     "targetPort": 6789}],
                                  ipFamilies=["IPv6"], ipFamilyPolicy="SingleStack"),
               endpoint_slice("fix6", [lab.pod_ip6(1)], SLICE_PORTS))
    node.start(wait_for="default/fix6:http cluster IP")
    if interception == "nftables":
        try:
            lab.run("node", ["nft", "delete", "table", "ip6", "uproxy"])
            assert node.nft_tables(6) == ""
            node.wait_rules(lambda t: "default/fix6:http cluster IP" in t, timeout=5, family=6)
            assert set(who(lab, SINGLE6, 80, ns="node", count=5)) == {"pod1"}
            assert "re-created the nftables tables someone removed: ip6 uproxy" in node.log
        finally:
            assert node.stop() == 0
        assert node.uproxy_lines() == []
        return
    try:
        lab.run("node", ["ip6tables", "-t", "nat", "-F", "UPROXY-SERVICES"])
        lab.run("node", ["ip6tables", "-t", "nat", "-D", "OUTPUT", "-m", "comment",
                         "--comment", "uproxy service portals", "-j", "UPROXY-SERVICES"])
        assert "default/fix6" not in node.iptables_save(6)
        node.wait_rules(lambda t: "default/fix6:http cluster IP" in t and "-A OUTPUT" in t,
                        timeout=5, family=6)
        assert set(who(lab, SINGLE6, 80, ns="node", count=5)) == {"pod1"}
        assert "re-inserted 1 uproxy hooks someone removed" in node.log
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []


def test_should_function_for_service_endpoints_using_host_network_ipv6(lab: Lab,
                                                                       flavor: Flavor) -> None:
    """e2e "should function for service endpoints using hostNetwork" on the secondary
    family: the endpoint is the node's own IPv6 address (a hostNetwork pod), reached from
    a client and from the node itself, with a 2000-byte request."""
    proc = lab.spawn("node", [sys.executable, "-m", "uproxy.demo.echo", "--name", "hostnet",
                              "--bind", "::", "--tcp", "7777"], "echo-hostnet")
    lab.wait_port("node", "::", 7777, "tcp", proc=proc, exact=True)
    node = NodeProxy(lab, loop=flavor.loop, native=flavor.native)
    node.write("host.yaml",
               service("host6", SINGLE6, [{"name": "http", "port": 80, "targetPort": 7777}],
                       ipFamilies=["IPv6"], ipFamilyPolicy="SingleStack"),
               endpoint_slice("host6", [lab.bridge_ip6],
                              [{"name": "http", "port": 7777, "protocol": "TCP"}]))
    node.start(wait_for="default/host6:http cluster IP")
    try:
        assert who(lab, SINGLE6, 80) == {"hostnet": 30}
        assert who(lab, SINGLE6, 80, ns="node", count=10) == {"hostnet": 10}
        big = lab.run("client", ["curl", "-sS", "--max-time", "5", "--data-binary",
                                 "x" * 2000, f"http://[{SINGLE6}]/big"]).stdout
        assert json.loads(big)["pod"] == "hostnet"
    finally:
        assert node.stop() == 0
