"""What a node proxy must do on a current cluster (issue 14), end to end in the lab.

The real daemon in the node namespace, echo servers in pod namespaces, clients in the
client namespace. Each test is named after the Kubernetes e2e case it mirrors
(``test/e2e/network/service.go``; one node, so "the other node" is played by endpoints
whose ``nodeName`` is not this node's). IPv4 only: this branch's lab has no IPv6.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.matrix import Flavor
from tests.support.waiting import wait_until
from uproxy.demo.lab import Lab
from uproxy.demo.node import NodeProxy, endpoint_slice, service

PORT = 8080
PORTS = [{"name": "http", "port": 80, "targetPort": PORT}]
SLICE_PORTS = [{"name": "http", "port": PORT, "protocol": "TCP"}]
NODE = "node"  # NodeProxy's --hostname-override
HC_PORT = 32100
NODE_PORT = 30180
TERMINATING = {"ready": False, "serving": True, "terminating": True}


@pytest.fixture
def proxies() -> Iterator[list[NodeProxy]]:
    started: list[NodeProxy] = []
    yield started
    for proxy in started:
        if proxy.proc is not None and proxy.proc.poll() is None:
            proxy.stop()


def start(lab: Lab, proxies: list[NodeProxy], flavor: Flavor | None = None,
          args: tuple[str, ...] = (), **objects: list[dict[str, Any]]) -> NodeProxy:
    node = NodeProxy(lab, loop=flavor.loop if flavor else "asyncio",
                     native=flavor.native if flavor else True, args=args)
    for filename, objs in objects.items():
        node.write(f"{filename}.yaml", *objs)
    proxies.append(node)
    node.start()
    return node


def curl(lab: Lab, url: str, ns: str = "client") -> tuple[int, dict[str, str], str]:
    """HTTP status (0: no answer), headers and body, as curl from ``ns`` sees them."""
    out = lab.run(ns, ["curl", "-s", "-i", "-m", "3", url], check=False).stdout
    if not out:
        return 0, {}, ""
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def who(lab: Lab, ip: str, port: int, count: int = 20, timeout: float = 2.0) -> dict[str, Any]:
    return lab.probe("tcp", ip, str(port), "--count", str(count), "--timeout", str(timeout))


# --- which Services are ours ---------------------------------------------------------------

def labelled(labels: dict[str, str]) -> dict[str, Any]:
    svc = service("web", "10.0.0.50", PORTS)
    svc["metadata"]["labels"] = labels
    return svc


@pytest.mark.parametrize("label", ["service.kubernetes.io/service-proxy-name",
                                   "service.kubernetes.io/headless"])
def test_should_implement_service_kubernetes_io_label(lab: Lab, proxies: list[NodeProxy],
                                                      label: str) -> None:
    """e2e "should implement service.kubernetes.io/service-proxy-name" and "... /headless":
    a labelled Service is never up; adding the label takes a Service down, removing it
    brings the Service back. (The e2e's hostNetwork client is the node itself here, too.)"""
    lab.start_echo(1, tcp_ports=(PORT,))
    slice_ = endpoint_slice("web", lab.pod_ips[:1], SLICE_PORTS)
    down = service("down", "10.0.0.51", PORTS)
    down["metadata"]["labels"] = {label: "foo-bar"}
    node = start(lab, proxies, web=[labelled({}), slice_],
                 down=[down, endpoint_slice("down", lab.pod_ips[:1], SLICE_PORTS)])
    assert who(lab, "10.0.0.50", 80)["counts"] == {"pod1": 20}
    for ns in ("client", "node"):
        result = lab.probe("tcp", "10.0.0.51", "80", "--count", "3", "--timeout", "1", ns=ns)
        assert result["counts"] == {}, result
    assert "10.0.0.51" not in node.rules_text()
    node.write("web.yaml", labelled({label: "foo-bar"}), slice_)
    node.wait_rules(lambda text: "10.0.0.50" not in text)
    assert who(lab, "10.0.0.50", 80, count=3, timeout=1)["counts"] == {}
    node.write("web.yaml", labelled({}), slice_)
    node.wait_rules(lambda text: "10.0.0.50" in text)
    assert who(lab, "10.0.0.50", 80)["counts"] == {"pod1": 20}


def test_service_proxy_name_flag_serves_only_its_services(lab: Lab,
                                                          proxies: list[NodeProxy]) -> None:
    """``--service-proxy-name uproxy`` beside kube-proxy: only the labelled Service."""
    lab.start_echo(1, tcp_ports=(PORT,))
    ours = service("ours", "10.0.0.52", PORTS)
    ours["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "uproxy"}
    node = start(lab, proxies, args=("--service-proxy-name", "uproxy"),
                 ours=[ours, endpoint_slice("ours", lab.pod_ips[:1], SLICE_PORTS)],
                 web=[labelled({}), endpoint_slice("web", lab.pod_ips[:1], SLICE_PORTS)])
    rules = node.rules_text()
    assert "10.0.0.52" in rules and "10.0.0.50" not in rules
    assert who(lab, "10.0.0.52", 80)["counts"] == {"pod1": 20}


# --- health-check node port and externalTrafficPolicy: Local -------------------------------

def lb_local(**extra: Any) -> dict[str, Any]:
    spec = {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": HC_PORT, **extra}
    return service("lb", "10.0.0.60", [{**PORTS[0], "nodePort": NODE_PORT}], **spec)


def lb_slice(lab: Lab, local: dict[str, bool] | None = None) -> dict[str, Any]:
    ips = lab.pod_ips[:2]
    return endpoint_slice("lb", ips, SLICE_PORTS,
                          node_names={ips[0]: NODE, ips[1]: "node-2"},
                          conditions={ips[0]: local or {"ready": True}})


def test_should_fail_health_check_node_port_if_there_are_only_terminating_endpoints(
        lab: Lab, proxies: list[NodeProxy], flavor: Flavor) -> None:
    """e2e: 200 from ``http://nodeIP:hcport/healthz`` while the local pod is ready, 503 once
    it only terminates, while the NodePort still reaches it (local terminating fallback)."""
    lab.start_echo(1, tcp_ports=(PORT,))
    lab.start_echo(2, tcp_ports=(PORT,))
    node = start(lab, proxies, flavor, lb=[lb_local(), lb_slice(lab)])
    hc = f"http://{lab.node_ip}:{HC_PORT}/healthz"
    status, headers, body = wait_until(lambda: (r := curl(lab, hc))[0] and r, timeout=10,
                                       message="the health-check node port answers")
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "1"
    assert json.loads(body) == {"service": {"namespace": "default", "name": "lb"},
                                "localEndpoints": 1, "serviceProxyHealthy": True}
    # NodePort and ClusterIP traffic: external goes local only, ClusterIP to both
    assert who(lab, lab.node_ip, NODE_PORT)["counts"] == {"pod1": 20}
    assert set(who(lab, "10.0.0.60", 80, count=40)["counts"]) == {"pod1", "pod2"}

    node.write("lb.yaml", lb_local(), lb_slice(lab, TERMINATING))
    wait_until(lambda: curl(lab, hc)[0] == 503, timeout=10, message="503 when terminating")
    status, headers, body = curl(lab, hc)
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"
    assert json.loads(body)["localEndpoints"] == 0
    assert who(lab, lab.node_ip, NODE_PORT)["counts"] == {"pod1": 20}

    # externalTrafficPolicy: Cluster closes the port
    node.write("lb.yaml", lb_local(externalTrafficPolicy="Cluster"), lb_slice(lab))
    wait_until(lambda: curl(lab, hc)[0] == 0, timeout=10, message="closed under Cluster")


def test_should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_externalTrafficPolicy_Local(  # noqa: E501
        lab: Lab, proxies: list[NodeProxy], flavor: Flavor) -> None:
    """e2e: with only a terminating endpoint on this node, this node's NodePort reaches it;
    with the node's endpoint gone (the only one is on the other node), this node's
    NodePort fails (the e2e's "pod0 -> node1:NodePort fails"), ClusterIP still works."""
    lab.start_echo(1, tcp_ports=(PORT,))
    lab.start_echo(2, tcp_ports=(PORT,))
    ips = lab.pod_ips[:2]
    terminating = endpoint_slice("lb", ips, SLICE_PORTS,
                                 node_names={ips[0]: NODE, ips[1]: "node-2"},
                                 conditions={ips[0]: TERMINATING, ips[1]: TERMINATING})
    node = start(lab, proxies, flavor, lb=[lb_local(), terminating])
    assert who(lab, lab.node_ip, NODE_PORT)["counts"] == {"pod1": 20}
    remote_only = endpoint_slice("lb", ips[1:], SLICE_PORTS, node_names={ips[1]: "node-2"})
    node.write("lb.yaml", lb_local(), remote_only)
    wait_until(lambda: curl(lab, f"http://{lab.node_ip}:{HC_PORT}/")[0] == 503, timeout=10,
               message="no local endpoint")
    result = who(lab, lab.node_ip, NODE_PORT, count=3, timeout=1)
    assert result["counts"] == {}, result
    assert result["errors"]["timeout"] == 3, result  # dropped, as kube-proxy does (not refused)
    assert who(lab, "10.0.0.60", 80)["counts"] == {"pod2": 20}


# --- refusal, source ranges, ipMode: the filter table --------------------------------------

UDP_CLIENT = """\
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((sys.argv[1], int(sys.argv[2])))
sock.settimeout(2.0)
start = time.monotonic()
try:
    sock.send(b"ping")
    sock.recv(100)
    print("answered")
except ConnectionRefusedError:
    print(f"refused {time.monotonic() - start:.2f}")
except PermissionError:  # REJECT in OUTPUT: the node's own send() fails at once (EPERM)
    print(f"refused {time.monotonic() - start:.2f} locally")
except TimeoutError:
    print("timeout")
"""


def udp_try(lab: Lab, ip: str, port: int, ns: str = "client") -> str:
    return lab.run(ns, [sys.executable, "-c", UDP_CLIENT, ip, str(port)]).stdout.strip()


def test_should_be_rejected_when_no_endpoints_exist_udp(lab: Lab, proxies: list[NodeProxy],
                                                        flavor: Flavor) -> None:
    """e2e "should be rejected when no endpoints exist", for UDP: ICMP port unreachable at
    once (ECONNREFUSED), from the client and from the node; served again once an endpoint
    appears."""
    lab.start_echo(1, udp_ports=(PORT,))
    ports = [{"name": "u", "port": 53, "protocol": "UDP", "targetPort": PORT,
              "nodePort": 30153}]
    slice_ports = [{"name": "u", "port": PORT, "protocol": "UDP"}]
    svc = service("noep", "10.0.0.70", ports, type="NodePort")
    node = start(lab, proxies, flavor, noep=[svc, endpoint_slice("noep", [], slice_ports)])
    filter_text = lab.run("node", ["iptables-save", "-t", "filter"]).stdout
    assert '"default/noep:u has no endpoints"' in filter_text, filter_text
    for ip, port, ns in (("10.0.0.70", 53, "client"), ("10.0.0.70", 53, "node"),
                         (lab.node_ip, 30153, "client")):
        result = udp_try(lab, ip, port, ns)
        assert result.startswith("refused"), (ip, port, ns, result)
        assert float(result.split()[1]) < 1.0
    node.write("noep.yaml", svc, endpoint_slice("noep", lab.pod_ips[:1], slice_ports))
    wait_until(lambda: udp_try(lab, "10.0.0.70", 53) == "answered", timeout=10,
               message="served once an endpoint exists")
    assert udp_try(lab, lab.node_ip, 30153) == "answered"


LB_IP = "198.51.100.10"
PROXY_MODE_IP = "198.51.100.11"


def ranged(ranges: list[str]) -> dict[str, Any]:
    return service("ranged", "10.0.0.80", [{**PORTS[0], "nodePort": NODE_PORT}],
                   type="LoadBalancer", loadBalancerSourceRanges=ranges,
                   status={"loadBalancer": {"ingress": [
                       {"ip": LB_IP}, {"ip": PROXY_MODE_IP, "ipMode": "Proxy"}]}})


def test_load_balancer_source_ranges_and_ip_mode_proxy(lab: Lab, proxies: list[NodeProxy],
                                                       flavor: Flavor) -> None:
    """``loadBalancerSourceRanges``: only listed sources reach the LoadBalancer IP (the
    rest is dropped in the kernel), updated live; NodePort and ClusterIP are not subject
    to them. ``ipMode: Proxy``: that IP is not captured. On stop the filter chain goes."""
    other = "10.99.0.3"
    lab.add_client_ip(other)
    lab.start_echo(1, tcp_ports=(PORT,))
    slice_ = endpoint_slice("ranged", lab.pod_ips[:1], SLICE_PORTS)
    node = start(lab, proxies, flavor, ranged=[ranged([f"{lab.client_ip}/32"]), slice_])
    assert PROXY_MODE_IP not in node.rules_text()
    assert who(lab, LB_IP, 80)["counts"] == {"pod1": 20}

    def from_other(ip: str, port: int) -> dict[str, Any]:
        return lab.probe("tcp", ip, str(port), "--count", "3", "--timeout", "1",
                         "--source-ip", other)

    result = from_other(LB_IP, 80)
    assert result["counts"] == {} and result["errors"]["timeout"] == 3, result
    assert from_other(lab.node_ip, NODE_PORT)["counts"] == {"pod1": 3}
    assert from_other("10.0.0.80", 80)["counts"] == {"pod1": 3}
    result = who(lab, PROXY_MODE_IP, 80, count=3, timeout=1)  # not captured: nobody answers
    assert result["counts"] == {}, result

    node.write("ranged.yaml", ranged([f"{other}/32"]), slice_)
    wait_until(lambda: from_other(LB_IP, 80)["counts"] == {"pod1": 3}, timeout=10,
               message="the new range applies")
    result = who(lab, LB_IP, 80, count=3, timeout=1)
    assert result["counts"] == {} and result["errors"]["timeout"] == 3, result
    node.write("ranged.yaml", ranged([]), slice_)
    wait_until(lambda: who(lab, LB_IP, 80, count=3)["counts"] == {"pod1": 3}, timeout=10,
               message="no ranges: everyone")

    filter_text = lab.run("node", ["iptables-save", "-t", "filter"]).stdout
    assert "UPROXY-FIREWALL" in filter_text
    assert node.stop() == 0
    filter_text = lab.run("node", ["iptables-save", "-t", "filter"]).stdout
    assert "UPROXY" not in filter_text, filter_text


# --- traffic distribution (test/e2e/network/traffic_distribution.go) -----------------------
# One node: the e2e's clients in different zones are this node with its zone changed (its
# kind: Node manifest). --manifests has no EndpointSlice controller, so uproxy writes the
# hints it would write from trafficDistribution (uproxy.topology.synthesize_hints).

def zoned(distribution: str, lab: Lab, pods: list[int], zones: dict[int, str],
          nodes: dict[int, str]) -> list[dict[str, Any]]:
    svc = service("td", "10.0.0.90", PORTS, trafficDistribution=distribution)
    ips = [lab.pod_ip(i) for i in pods]
    slice_ = endpoint_slice("td", ips, SLICE_PORTS,
                            node_names={lab.pod_ip(i): nodes[i] for i in pods})
    for ep, i in zip(slice_["endpoints"], pods, strict=True):
        ep["zone"] = zones[i]
    return [svc, slice_]


def this_node(zone: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": zone}}}


def reached(lab: Lab, count: int = 30) -> set[str]:
    result = who(lab, "10.0.0.90", 80, count=count)
    assert sum(result["counts"].values()) == count, result
    return set(result["counts"])


@pytest.mark.parametrize("distribution", ["PreferClose", "PreferSameZone"])
def test_should_route_traffic_to_an_endpoint_in_the_same_zone(
        lab: Lab, proxies: list[NodeProxy], distribution: str) -> None:
    """e2e "should route traffic to an endpoint in the same zone when using PreferClose"
    (and "... PreferSameZone"): servers in zones A and B; clients in A, B, C."""
    for pod in (1, 2):
        lab.start_echo(pod, tcp_ports=(PORT,))
    objs = zoned(distribution, lab, [1, 2], {1: "zone-a", 2: "zone-b"},
                 {1: "node-a", 2: "node-b"})
    node = start(lab, proxies, td=objs, node=[this_node("zone-a")])
    wait_until(lambda: reached(lab) == {"pod1"}, timeout=10, message="zone A: A only")
    for zone, wanted in (("zone-b", {"pod2"}), ("zone-c", {"pod1", "pod2"})):
        node.write("node.yaml", this_node(zone))
        wait_until(lambda w=wanted: reached(lab) == w, timeout=10,
                   message=f"{zone}: {sorted(wanted)}")


def test_should_route_traffic_to_an_endpoint_on_the_same_node_when_using_PreferSameNode_and_fall_back_when_the_endpoint_becomes_unavailable(  # noqa: E501
        lab: Lab, proxies: list[NodeProxy], flavor: Flavor) -> None:
    """e2e (two nodes in one zone, played by this node and node-2): same node only; the
    local server deleted -> the other node's; recreated -> same node again."""
    for pod in (1, 2):
        lab.start_echo(pod, tcp_ports=(PORT,))
    zones = {1: "zone-a", 2: "zone-a"}
    nodes = {1: NODE, 2: "node-2"}
    node = start(lab, proxies, flavor, td=zoned("PreferSameNode", lab, [1, 2], zones, nodes),
                 node=[this_node("zone-a")])
    assert reached(lab) == {"pod1"}
    node.write("td.yaml", *zoned("PreferSameNode", lab, [2], zones, nodes))
    wait_until(lambda: reached(lab) == {"pod2"}, timeout=10, message="falls back")
    node.write("td.yaml", *zoned("PreferSameNode", lab, [1, 2], zones, nodes))
    wait_until(lambda: reached(lab) == {"pod1"}, timeout=10, message="same node again")


def test_should_route_traffic_to_an_endpoint_on_the_same_node_or_fall_back_to_same_zone_when_using_PreferSameNode(  # noqa: E501
        lab: Lab, proxies: list[NodeProxy]) -> None:
    """e2e: no server on this node -> same zone; no server in this zone either -> all."""
    for pod in (1, 2, 3):
        lab.start_echo(pod, tcp_ports=(PORT,))
    zones = {1: "zone-a", 2: "zone-a", 3: "zone-b"}
    nodes = {1: "node-a1", 2: "node-a2", 3: "node-b1"}
    node = start(lab, proxies, td=zoned("PreferSameNode", lab, [1, 2, 3], zones, nodes),
                 node=[this_node("zone-b")])
    assert reached(lab) == {"pod3"}
    node.write("node.yaml", this_node("zone-c"))
    wait_until(lambda: reached(lab, 60) == {"pod1", "pod2", "pod3"}, timeout=10,
               message="zone C: all")


def test_nodeport_addresses_primary(lab: Lab, proxies: list[NodeProxy]) -> None:
    """``--nodeport-addresses primary``: NodePorts (and health-check node ports) listen on
    the node's primary IP only, as its Node's status.addresses says."""
    lab.start_echo(1, tcp_ports=(PORT,))
    me = this_node("zone-a")
    me["status"] = {"addresses": [{"type": "Hostname", "address": NODE},
                                  {"type": "InternalIP", "address": lab.node_ip}]}
    start(lab, proxies, args=("--nodeport-addresses", "primary"),
          lb=[lb_local(), endpoint_slice("lb", lab.pod_ips[:1], SLICE_PORTS,
                                         node_names={lab.pod_ips[0]: NODE})],
          node=[me])
    listening = lab.run("node", ["ss", "-Hltn"]).stdout
    for port in (NODE_PORT, HC_PORT):
        local = {line.split()[3] for line in listening.splitlines()
                 if line.split()[3].endswith(f":{port}")}
        assert local == {f"{lab.node_ip}:{port}"}, listening
    assert who(lab, lab.node_ip, NODE_PORT)["counts"] == {"pod1": 20}
    assert curl(lab, f"http://{lab.node_ip}:{HC_PORT}/healthz")[0] == 200


@pytest.mark.parametrize("client", ["client", "node"])
def test_should_respect_internalTrafficPolicy_Local_Pod_to_Pod(
        lab: Lab, proxies: list[NodeProxy], client: str) -> None:
    """e2e "should respect internalTrafficPolicy=Local Pod to Pod" (client ns) and
    "... Pod (hostNetwork: true) to Pod" (the node itself): a same-node endpoint serves;
    with the only endpoint on another node, ClusterIP traffic is dropped (times out)."""
    lab.start_echo(1, tcp_ports=(PORT,))
    lab.start_echo(2, tcp_ports=(PORT,))
    ips = lab.pod_ips[:2]
    svc = service("itp", "10.0.0.95", PORTS, internalTrafficPolicy="Local")
    both = endpoint_slice("itp", ips, SLICE_PORTS, node_names={ips[0]: NODE, ips[1]: "node-2"})
    node = start(lab, proxies, itp=[svc, both])
    result = lab.probe("tcp", "10.0.0.95", "80", "--count", "20", ns=client)
    assert result["counts"] == {"pod1": 20}, result
    node.write("itp.yaml", svc, endpoint_slice("itp", ips[1:], SLICE_PORTS,
                                               node_names={ips[1]: "node-2"}))
    node.wait_rules(lambda _text: "has no local endpoints" in lab.run(
        "node", ["iptables-save", "-t", "filter"]).stdout)
    result = lab.probe("tcp", "10.0.0.95", "80", "--count", "3", "--timeout", "1", ns=client)
    assert result["counts"] == {} and result["errors"]["timeout"] == 3, result


STEADY_UDP = """\
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 40123))
sock.connect((sys.argv[1], int(sys.argv[2])))
sock.settimeout(0.3)
refused = 0
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        sock.send(b"ping")
        sock.recv(100)
        print(f"answered after {refused} refusals", flush=True)
        break
    except ConnectionRefusedError:
        refused += 1
        time.sleep(0.2)
    except TimeoutError:
        pass
else:
    print("never answered", flush=True)
"""


def test_should_be_able_to_preserve_UDP_traffic_when_initial_unready_endpoints_get_ready(
        lab: Lab, proxies: list[NodeProxy], flavor: Flavor) -> None:
    """Conntrack e2e: one UDP client (fixed source port) sends before the endpoint is
    ready (rejected at once each time, no flow blackholed) and is answered once it is."""
    lab.start_echo(1, udp_ports=(PORT,))
    ports = [{"name": "u", "port": 53, "protocol": "UDP", "targetPort": PORT}]
    slice_ports = [{"name": "u", "port": PORT, "protocol": "UDP"}]
    svc = service("later", "10.0.0.75", ports)
    unready = endpoint_slice("later", lab.pod_ips[:1], slice_ports,
                             conditions={lab.pod_ips[0]: {"ready": False}})
    node = start(lab, proxies, flavor, later=[svc, unready])
    script = lab.workdir / "steady_udp.py"
    script.write_text(STEADY_UDP)
    lab.spawn("client", [sys.executable, str(script), "10.0.0.75", "53"], "steady-udp")
    wait_until(lambda: lab.log("steady-udp") or lab.run(
        "client", ["ss", "-Huan", "sport", "=", ":40123"]).stdout, timeout=10,
        message="the client runs")
    time.sleep(1.0)  # a few refusals first
    assert lab.log("steady-udp") == ""  # still refused, not answered
    node.write("later.yaml", svc, endpoint_slice("later", lab.pod_ips[:1], slice_ports))
    out = wait_until(lambda: lab.log("steady-udp").strip(), timeout=10,
                     message="the client is answered")
    assert out.startswith("answered after") and int(out.split()[2]) >= 2, out
