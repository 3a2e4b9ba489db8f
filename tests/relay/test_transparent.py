"""Transparent mode end to end: who the backend sees as its client.

The real daemon in the lab's node namespace, real iptables (nat and mangle), real
policy routing, backends in pod namespaces that report their peer (the echo's HTTP
``client`` field and its UDP ``peer`` datagram), clients in the client namespace and
in a pod on the same bridge. Every data-path test runs on both relay paths and both
loops (``flavor``). Through the daemon IPv4 only: uproxy serves IPv4 and the lab has no
IPv6 on this branch (the dual-stack branch adds both; those IPv6 variants are pending).
The IPv6 half of the edge -- sockets, ip6tables mark, ``ip -6`` policy routing -- is
exercised on its own with addresses this test adds to the lab.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator

import pytest

from tests.support.matrix import Flavor
from tests.support.waiting import wait_until
from uproxy import transparent
from uproxy.demo.lab import Lab
from uproxy.demo.node import NodeProxy, endpoint_slice, service

CLUSTER_IP, LB_IP, CLUSTER_POLICY_IP = "10.0.0.50", "10.0.0.251", "10.0.0.60"
LOCAL_NODEPORT, CLUSTER_NODEPORT = 30080, 30081
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
         {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 5353, "protocol": "UDP"}]

UDP_PEER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((sys.argv[1], int(sys.argv[2])))
for _ in range(3):
    s.send(b"peer")
    try:
        print(s.recv(200).decode().split()[0])
        break
    except TimeoutError:
        continue
else:
    print("timeout")
"""


def tcp_peer(lab: Lab, ns: str, host: str, port: int, source: str | None = None) -> str:
    """The address the backend saw for an HTTP request through ``host:port``."""
    bind = ["--interface", source] if source else []
    done = lab.run(ns, ["curl", "-sS", "-m", "5", *bind, f"http://{host}:{port}/"], check=False)
    assert done.returncode == 0, (ns, host, port, done.stderr)
    return str(json.loads(done.stdout)["client"]).rpartition(":")[0]


def udp_peer(lab: Lab, ns: str, host: str, port: int) -> str:
    return lab.run(ns, [sys.executable, "-c", UDP_PEER, host, str(port)]).stdout.strip()


@pytest.fixture
def web(lab: Lab) -> None:
    """pod1 serves two services: ``web`` (LoadBalancer, externalTrafficPolicy Local, its
    endpoint on this node) and ``web-cluster`` (NodePort, externalTrafficPolicy Cluster)."""
    lab.start_echo(1, tcp_ports=(8080,), udp_ports=(5353,))


def _write_services(lab: Lab, node: NodeProxy) -> None:
    local_ports = [{**p, "nodePort": LOCAL_NODEPORT if p["protocol"] == "TCP" else 30053}
                   for p in PORTS]
    cluster_ports = [{**p, "nodePort": CLUSTER_NODEPORT if p["protocol"] == "TCP" else 30054}
                     for p in PORTS]
    on_node = {lab.pod_ip(1): "node"}
    node.write("web.yaml",
               service("web", CLUSTER_IP, local_ports, type="LoadBalancer",
                       externalTrafficPolicy="Local",
                       status={"loadBalancer": {"ingress": [{"ip": LB_IP}]}}),
               endpoint_slice("web", [lab.pod_ip(1)], SLICE_PORTS, node_names=on_node),
               service("web-cluster", CLUSTER_POLICY_IP, cluster_ports, type="NodePort",
                       externalTrafficPolicy="Cluster"),
               endpoint_slice("web-cluster", [lab.pod_ip(1)], SLICE_PORTS,
                              node_names=on_node))


@pytest.fixture
def daemons() -> Iterator[list[NodeProxy]]:
    started: list[NodeProxy] = []
    yield started
    for node in started:
        if node.proc is not None and node.proc.poll() is None:
            node.stop()


def _start(lab: Lab, flavor: Flavor, daemons: list[NodeProxy], *args: str) -> NodeProxy:
    node = NodeProxy(lab, loop=flavor.loop, native=flavor.native, args=args)
    daemons.append(node)
    _write_services(lab, node)
    node.start(wait_for="default/web:http loadbalancer IP")
    return node


def test_should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip(
        lab: Lab, flavor: Flavor, web: None, daemons: list[NodeProxy]) -> None:
    node = _start(lab, flavor, daemons)
    assert "transparent backend connections on" in node.log
    client = lab.client_ip
    assert tcp_peer(lab, "client", CLUSTER_IP, 80) == client
    assert udp_peer(lab, "client", CLUSTER_IP, 53) == client


def test_external_traffic_keeps_the_client_address_only_under_local_policy(
        lab: Lab, flavor: Flavor, web: None, daemons: list[NodeProxy]) -> None:
    _start(lab, flavor, daemons)
    client = lab.client_ip
    assert tcp_peer(lab, "client", lab.node_ip, LOCAL_NODEPORT) == client
    assert tcp_peer(lab, "client", LB_IP, 80) == client
    assert udp_peer(lab, "client", LB_IP, 53) == client
    assert udp_peer(lab, "client", lab.node_ip, 30053) == client
    # externalTrafficPolicy: Cluster -> from the node (its address towards the pod)
    assert tcp_peer(lab, "client", lab.node_ip, CLUSTER_NODEPORT) == lab.bridge_ip
    assert udp_peer(lab, "client", lab.node_ip, 30054) == lab.bridge_ip
    # ClusterIP traffic of the Cluster-policy service still keeps the client's address
    assert tcp_peer(lab, "client", CLUSTER_POLICY_IP, 80) == client


def test_same_bridge_hairpin_and_node_clients_connect_from_the_node(
        lab: Lab, flavor: Flavor, web: None, daemons: list[NodeProxy]) -> None:
    """Where the replies would not come back through the node's IP stack, uproxy connects
    from the node -- and the connection works (the spike saw timeouts otherwise)."""
    _start(lab, flavor, daemons)
    bridge = lab.bridge_ip
    assert tcp_peer(lab, "pod2", CLUSTER_IP, 80) == bridge  # same bridge as pod1
    assert udp_peer(lab, "pod2", CLUSTER_IP, 53) == bridge
    assert tcp_peer(lab, "pod1", CLUSTER_IP, 80) == bridge  # hairpin
    assert udp_peer(lab, "pod1", CLUSTER_IP, 53) == bridge
    assert tcp_peer(lab, "node", CLUSTER_IP, 80) == bridge  # the node itself


def test_masquerade_all_gives_the_node_address_everywhere(
        lab: Lab, flavor: Flavor, web: None, daemons: list[NodeProxy]) -> None:
    node = _start(lab, flavor, daemons, "--masquerade-all")
    assert "transparent backend connections off (--masquerade-all)" in node.log
    bridge = lab.bridge_ip
    for host, port in ((CLUSTER_IP, 80), (lab.node_ip, LOCAL_NODEPORT), (LB_IP, 80)):
        assert tcp_peer(lab, "client", host, port) == bridge, (host, port)
    assert udp_peer(lab, "client", CLUSTER_IP, 53) == bridge
    assert udp_peer(lab, "client", LB_IP, 53) == bridge
    assert transparent.CHAIN not in lab.run("node", ["iptables-save", "-t", "mangle"]).stdout


def test_endpoints_on_other_nodes_keep_it_only_for_clients_routed_to_this_node(
        lab: Lab, flavor: Flavor, web: None, daemons: list[NodeProxy]) -> None:
    """A remote endpoint's reply goes where the client's address routes from its node:
    here for this node's pods (on-link, not an uplink), elsewhere for a client behind a
    router, which therefore gets the node's address (endpoints on this node keep it)."""
    routed = "10.98.0.2"  # the client namespace as a host behind a router
    lab.run("client", ["ip", "addr", "add", f"{routed}/32", "dev", "eth0"])
    lab.run("node", ["ip", "route", "add", f"{routed}/32", "via", lab.client_ip])
    node = NodeProxy(lab, loop=flavor.loop, native=flavor.native)
    daemons.append(node)
    _write_services(lab, node)
    node.write("far.yaml",
               service("far", "10.0.0.70", PORTS[:1]),
               endpoint_slice("far", [lab.pod_ip(1)], SLICE_PORTS[:1],
                              node_names={lab.pod_ip(1): "other-node"}))
    node.start(wait_for="default/far:http cluster IP")
    assert tcp_peer(lab, "client", "10.0.0.70", 80, source=routed) == lab.bridge_ip
    assert tcp_peer(lab, "client", "10.0.0.70", 80) == lab.client_ip  # pod-like: on-link
    assert tcp_peer(lab, "client", CLUSTER_IP, 80, source=routed) == routed  # endpoint here


def test_an_endpoint_on_a_link_that_appeared_after_start_is_learnt_at_once(
        lab: Lab, flavor: Flavor, daemons: list[NodeProxy]) -> None:
    """A CNI creates its bridge with the first pod, after uproxy started: until the links
    are read again uproxy cannot tell whether a client shares the endpoint's link, so it
    connects from the node -- and reads them again at once, not at the next full sync."""
    late = "172.18.0.2"
    lab.start_echo(3, tcp_ports=(8080,))
    node = NodeProxy(lab, loop=flavor.loop, native=flavor.native)  # --sync-period 30s
    daemons.append(node)
    node.write("late.yaml", service("late", "10.0.0.90", PORTS[:1]),
               endpoint_slice("late", [late], SLICE_PORTS[:1], node_names={late: "node"}))
    node.start(wait_for="default/late:http cluster IP")
    lab.run("pod3", ["ip", "addr", "add", f"{late}/32", "dev", "eth0"])
    lab.run("node", ["ip", "route", "add", f"{late}/32", "dev", "br0"])  # the new link
    assert tcp_peer(lab, "client", "10.0.0.90", 80) == lab.bridge_ip
    wait_until(lambda: tcp_peer(lab, "client", "10.0.0.90", 80) == lab.client_ip, timeout=5,
               message="the new link was not learnt")


# --- IPv6: the edge alone (the daemon serves IPv4 only on this branch) ------------------

PEER_SERVER_V6 = """
import select, socket
t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("::", 8080)); t.listen(8)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.bind(("::", 8080))
while True:
    for s in select.select([t, u], [], [])[0]:
        if s is t:
            c, peer = t.accept()
            c.sendall(peer[0].encode()); c.close()
        else:
            _, peer = u.recvfrom(100)
            u.sendto(peer[0].encode(), peer)
"""

EDGE_V6 = """
import asyncio, socket, sys
from uproxy.model import Endpoint
from uproxy.proxy.transparent import Transparent, backend_socket
client, pod = sys.argv[1], sys.argv[2]

async def main():
    t = Transparent("node")
    await t.start(wanted=True)
    print("families", sorted(t.families))
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        source = t.source_for(client, Endpoint(pod, 8080, node_name="node"), external=False,
                              external_local=False)
        s = backend_socket(socket.AF_INET6, kind, source)
        s.setblocking(True)
        s.settimeout(3)
        s.connect((pod, 8080))
        if kind == socket.SOCK_DGRAM:
            s.send(b"peer")
        print(kind.name, s.recv(100).decode())
        s.close()
    await t.cleanup()

asyncio.run(main())
"""


def test_ipv6_backend_sockets_from_the_client_address_and_their_replies(lab: Lab) -> None:
    """The IPv6 half of the edge, for real: ``IPV6_TRANSPARENT`` sockets bound to the
    client's address, and the ip6tables mark plus ``ip -6`` policy routing bringing the
    pod's replies back to them (TCP and UDP). Through the daemon, tests/relay/test_tcp_ipv6.py
    checks that an IPv6 backend sees the client's address."""
    client, pod = lab.client_ip6, lab.pod_ip6(1)  # the lab has IPv6 on every link
    server = lab.spawn("pod1", [sys.executable, "-c", PEER_SERVER_V6], "peer-server-v6")
    lab.wait_port("pod1", "::", 8080, "tcp", proc=server)
    done = lab.run("node", [sys.executable, "-c", EDGE_V6, client, pod], check=False)
    assert done.stdout.splitlines() == [
        "families [4, 6]", f"SOCK_STREAM {client}", f"SOCK_DGRAM {client}"], done.stderr
    assert _leftovers(lab) == []


PROBE_AS_NOBODY = """
import asyncio, logging
from uproxy.proxy.transparent import Transparent
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s %(message)s")
t = Transparent("node")
asyncio.run(t.start(wanted=True))
print("families", sorted(t.families))
"""


def test_a_refused_probe_says_so_in_one_line_and_stays_off(lab: Lab) -> None:
    """Without CAP_NET_ADMIN or CAP_NET_RAW the kernel refuses IP_TRANSPARENT: one line,
    and the mode stays off (backends see the node's address, as before)."""
    done = lab.run("node", ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c", PROBE_AS_NOBODY])
    assert done.stdout.strip() == "families []", (done.stdout, done.stderr)
    said = [ln for ln in done.stderr.splitlines() if ln.startswith(("INFO", "WARNING"))]
    assert said == ["WARNING uproxy.transparent transparent backend connections refused "
                    "(IP_TRANSPARENT: Operation not permitted): backends see the node's "
                    "address"], done.stderr


# --- the rules: shown, repaired, removed ---------------------------------------------------


def _leftovers(lab: Lab) -> list[str]:
    """Everything of transparent mode still on the node, both families."""
    out = []
    for save in ("iptables-save", "ip6tables-save"):
        text = lab.run("node", [save, "-t", "mangle"]).stdout
        out += [f"{save}: {line}" for line in text.splitlines() if "UPROXY" in line]
    for flag in ("-4", "-6"):
        rules = lab.run("node", ["ip", flag, "rule", "show"]).stdout
        out += [f"ip {flag} rule: {line}" for line in rules.splitlines()
                if f"lookup {transparent.TABLE}" in line]
        routes = lab.run("node", ["ip", flag, "route", "show", "table", str(transparent.TABLE)],
                         check=False).stdout
        out += [f"ip {flag} route: {line}" for line in routes.splitlines() if line.strip()]
    return out


def _present(lab: Lab) -> bool:
    """Everything in place, each exactly once, both families."""
    for save in ("iptables-save", "ip6tables-save"):
        text = lab.run("node", [save, "-t", "mangle"]).stdout
        hooks = [ln for ln in text.splitlines() if ln.startswith("-A PREROUTING")
                 and transparent.CHAIN in ln]
        if not transparent.chain_intact(text) or len(hooks) != 1:
            return False
    for flag in ("-4", "-6"):
        if transparent.count_rules(lab.run("node", ["ip", flag, "rule", "show"]).stdout) != 1:
            return False
        if not transparent.route_present(lab.run(
                "node", ["ip", flag, "route", "show", "table", str(transparent.TABLE)]).stdout):
            return False
    return True


def test_rules_are_repaired_and_removed_by_shutdown_and_cleanup(lab: Lab, web: None) -> None:
    node = NodeProxy(lab, args=["--sync-period", "1s"])
    _write_services(lab, node)
    node.start(wait_for="default/web:http loadbalancer IP")
    try:
        assert _present(lab), _leftovers(lab)
        # Someone deletes the rule, the hook's chain content and the routing rule:
        lab.run("node", ["iptables", "-t", "mangle", "-F", transparent.CHAIN])
        lab.run("node", ["ip", "-4", "rule", "del", *transparent.rule_spec()])
        lab.run("node", ["ip", "-6", "route", "flush", "table", str(transparent.TABLE)])
        wait_until(lambda: _present(lab), timeout=10, message="transparent rules not repaired")
        # ... or adds them twice:
        lab.run("node", ["iptables", "-t", "mangle", "-I", "PREROUTING", "-m", "comment",
                         "--comment", transparent.HOOK_COMMENT, "-j", transparent.CHAIN])
        lab.run("node", ["ip", "-6", "rule", "add", *transparent.rule_spec(pref=False),
                         "pref", "200"])
        wait_until(lambda: _present(lab), timeout=10, message="duplicates not removed")
        assert tcp_peer(lab, "client", CLUSTER_IP, 80) == lab.client_ip
        # A clean shutdown removes everything.
        assert node.stop() == 0
        assert _leftovers(lab) == []
        # A crash leaves it behind; the next start keeps it (once), `uproxy cleanup` removes it.
        node.start(wait_for="default/web:http loadbalancer IP")
        assert _present(lab)
        node.stop(signal.SIGKILL)
        node.start(wait_for="default/web:http loadbalancer IP")
        assert _present(lab)
        assert tcp_peer(lab, "client", CLUSTER_IP, 80) == lab.client_ip
        node.stop(signal.SIGKILL)
        assert _leftovers(lab) != []
        done = lab.run("node", [sys.executable, "-m", "uproxy", "cleanup"])
        assert "removed" in done.stdout
        assert _leftovers(lab) == []
        assert "UPROXY" not in lab.run("node", ["iptables-save"]).stdout
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop()
