"""The filter table (uproxy.filter_rules): refusal, Local policies, source ranges, ipMode.

Pure: entries in, restore lines out; the kernel side runs in
tests/lab/test_kube_semantics_lab.py (real iptables in the lab).
"""

from __future__ import annotations

from typing import Any

import pytest

from uproxy.filter_rules import FIREWALL, filter_rules_of, render_filter, render_filter_cleanup
from uproxy.model import Endpoint, ServicePort, ServicePortName, parse_service
from uproxy.rules import hook_lines, uproxy_chains
from uproxy.state import Entry

NAME = ServicePortName("default", "svc", "p", "UDP")
LOCAL = Endpoint("172.17.0.2", 53, node_name="node")
REMOTE = Endpoint("172.17.0.3", 53, node_name="node-2")
TERMINATING_LOCAL = Endpoint("172.17.0.2", 53, ready=False, serving=True, terminating=True,
                             node_name="node")


def entry(*endpoints: Endpoint, protocol: str = "UDP", **port: Any) -> Entry:
    base: dict[str, Any] = {"name": ServicePortName("default", "svc", "p", protocol),
                            "type": "LoadBalancer", "cluster_ips": ("10.0.0.10",), "port": 53,
                            "protocol": protocol, "target_port": 53}
    return Entry(ServicePort(**{**base, **port}), endpoints)


def rules(e: Entry, **kw: Any) -> list[str]:
    return filter_rules_of(e, node_name="node", **kw)


def test_udp_without_endpoints_is_rejected_everywhere() -> None:
    e = entry(node_port=30053, external_ips=("192.0.2.1",), load_balancer_ips=("198.51.100.1",),
              cluster_ips=("10.0.0.10", "fd00::10"))
    c = '-m comment --comment "default/svc:p has no endpoints" -j REJECT'
    assert rules(e) == [
        f"-A {FIREWALL} -p udp -m conntrack --ctorigdst 10.0.0.10/32 --ctorigdstport 53 {c}",
        f"-A {FIREWALL} -p udp -m conntrack --ctorigdst 192.0.2.1/32 --ctorigdstport 53 {c}",
        f"-A {FIREWALL} -p udp -m conntrack --ctorigdst 198.51.100.1/32 --ctorigdstport 53 {c}",
        f"-A {FIREWALL} -p udp -m addrtype --dst-type LOCAL -m udp --dport 30053 {c}",
    ]
    assert rules(e, family=6) == [
        f"-A {FIREWALL} -p udp -m conntrack --ctorigdst fd00::10/128 --ctorigdstport 53 {c}",
        f"-A {FIREWALL} -p udp -m addrtype --dst-type LOCAL -m udp --dport 30053 {c}"]


def test_each_family_is_refused_on_its_own() -> None:
    """A dual-stack Service whose IPv6 slice is empty refuses IPv6 only (kube-proxy runs one
    proxier per family); a single-stack Service gets no rules in the other family."""
    dual = entry(LOCAL, cluster_ips=("10.0.0.10", "fd00::10"))
    c = '-m comment --comment "default/svc:p has no endpoints" -j REJECT'
    assert rules(dual) == []
    assert rules(dual, family=6) == [
        f"-A {FIREWALL} -p udp -m conntrack --ctorigdst fd00::10/128 --ctorigdstport 53 {c}"]
    assert rules(entry(node_port=30053), family=6) == []


def test_tcp_without_endpoints_gets_the_proxys_rst_instead() -> None:
    assert rules(entry(protocol="TCP", node_port=30053)) == []


@pytest.mark.parametrize("endpoints", [(LOCAL,), (REMOTE,), (TERMINATING_LOCAL,),
                                       (Endpoint("172.17.0.4", 53, ready=False, serving=True,
                                                 terminating=True),)])
def test_a_usable_endpoint_anywhere_means_no_rejection(endpoints: tuple[Endpoint, ...]) -> None:
    assert rules(entry(*endpoints, node_port=30053)) == []


def test_unready_endpoints_only_are_no_endpoints() -> None:
    starting = Endpoint("172.17.0.4", 53, ready=False, serving=False)
    assert len(rules(entry(starting))) == 1


def test_external_policy_local_without_a_local_endpoint_drops_external_traffic() -> None:
    e = entry(REMOTE, external_local=True, node_port=30053, external_ips=("192.0.2.1",),
              load_balancer_ips=("198.51.100.1",), source_ranges=("10.99.0.0/24",))
    c = '-m comment --comment "default/svc:p has no local endpoints" -j DROP'
    assert rules(e) == [
        f"-A {FIREWALL} -p udp -m conntrack --ctorigdst 192.0.2.1/32 --ctorigdstport 53 {c}",
        f"-A {FIREWALL} -p udp -m conntrack --ctorigdst 198.51.100.1/32 --ctorigdstport 53 {c}",
        f"-A {FIREWALL} -p udp -m addrtype --dst-type LOCAL -m udp --dport 30053 {c}",
    ]
    assert rules(entry(LOCAL, REMOTE, external_local=True, node_port=30053)) == []
    # local serving-terminating still serves (kube-proxy's local fallback)
    assert rules(entry(TERMINATING_LOCAL, REMOTE, external_local=True, node_port=30053)) == []


def test_internal_policy_local_without_a_local_endpoint_drops_cluster_traffic() -> None:
    e = entry(REMOTE, internal_local=True, node_port=30053)
    assert rules(e) == [
        f"-A {FIREWALL} -p udp -m conntrack --ctorigdst 10.0.0.10/32 --ctorigdstport 53 "
        '-m comment --comment "default/svc:p has no local endpoints" -j DROP']


def test_source_ranges_guard_the_load_balancer_ips_only() -> None:
    e = entry(REMOTE, node_port=30053, external_ips=("192.0.2.1",),
              load_balancer_ips=("198.51.100.1",), source_ranges=("10.99.0.2/32", "fd00::/64"))
    to = "-p udp -m conntrack --ctorigdst 198.51.100.1/32 --ctorigdstport 53"
    ok = '-m comment --comment "default/svc:p loadbalancer IP source ranges" -j RETURN'
    refused = ('-m comment --comment "default/svc:p traffic not accepted by '
               'loadBalancerSourceRanges" -j DROP')
    assert rules(e) == [f"-A {FIREWALL} -s 10.99.0.2/32 {to} {ok}",
                        f"-A {FIREWALL} {to} {refused}"]
    # the node's primary IP in a range: every local source is allowed too
    assert rules(entry(REMOTE, load_balancer_ips=("198.51.100.1",),
                       source_ranges=("10.99.0.0/24",)), node_ips=("10.99.0.1",)) == [
        f"-A {FIREWALL} -s 10.99.0.0/24 {to} {ok}",
        f"-A {FIREWALL} -m addrtype --src-type LOCAL {to} {ok}",
        f"-A {FIREWALL} {to} {refused}"]


def svc(**spec: Any) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": "lb", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.0.0.20",
                     "ports": [{"port": 80, "nodePort": 30080}], **spec},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "198.51.100.1"}, {"ip": "198.51.100.2", "ipMode": "VIP"},
                {"ip": "198.51.100.3", "ipMode": "Proxy"}, {"hostname": "lb.example"}]}}}


def test_parsing_ip_mode_and_source_ranges() -> None:
    [port] = parse_service(svc(loadBalancerSourceRanges=[" 10.0.0.0/8 ", "192.0.2.7"])).ports
    assert port.load_balancer_ips == ("198.51.100.1", "198.51.100.2")  # Proxy: not captured
    assert port.source_ranges == ("10.0.0.0/8", "192.0.2.7/32")
    [port] = parse_service(svc(loadBalancerSourceRanges=["10.0.0.0/8", "0.0.0.0/0"])).ports
    assert port.source_ranges == ()  # a zero CIDR allows everyone
    bad = parse_service(svc(loadBalancerSourceRanges=["nope"]))
    assert [p.field for p in bad.problems] == ["spec.loadBalancerSourceRanges[0]"]


def test_health_check_node_port_only_for_load_balancer_local() -> None:
    def hc(**spec: Any) -> int | None:
        return parse_service(svc(healthCheckNodePort=32000, **spec)).ports[0] \
            .health_check_node_port

    assert hc(externalTrafficPolicy="Local") == 32000
    assert hc(externalTrafficPolicy="Cluster") is None
    assert hc(externalTrafficPolicy="Local", type="NodePort") is None


def test_render_and_cleanup_text() -> None:
    text = render_filter(["-A UPROXY-FIREWALL -j RETURN"], stale_chains=["UPROXY-OLD", "X"],
                         hooks=True)
    assert text.splitlines() == [
        "*filter", ":UPROXY-FIREWALL - [0:0]", ":UPROXY-OLD - [0:0]",
        "-A UPROXY-FIREWALL -j RETURN", "-X UPROXY-OLD",
        '-I INPUT 1 -m conntrack --ctstate NEW -m comment --comment "uproxy firewall" '
        "-j UPROXY-FIREWALL",
        '-I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment "uproxy firewall" '
        "-j UPROXY-FIREWALL",
        "COMMIT"]
    assert render_filter_cleanup(["UPROXY-FIREWALL", "KUBE-X"]) == (
        "*filter\n:UPROXY-FIREWALL - [0:0]\n-X UPROXY-FIREWALL\nCOMMIT\n")
    assert render_filter_cleanup([]) == ""
    saved = text.replace("-I INPUT 1", "-A INPUT").replace("-I OUTPUT 1", "-A OUTPUT")
    assert uproxy_chains(saved) == {"UPROXY-FIREWALL", "UPROXY-OLD"}
    assert len(hook_lines(saved)) == 2
