"""A dual-stack Service as the status page, the JSON API and ``uproxy get`` show it: both
ClusterIPs (kubectl's ``CLUSTER-IPS``), the endpoints of both families, a proxy port per
family, and the rules of both families."""

from __future__ import annotations

from typing import Any

from uproxy.model import ServicePortName
from uproxy.rules import KEEP_NAT_V4, KEEP_NAT_V6, KIND_CLUSTER, Redirect
from uproxy.state import Store
from uproxy.status import views
from uproxy.status.client import endpoints_table, services_table

NAME = ServicePortName("default", "dual", "http")


def dual_store() -> Store:
    store = Store()
    store.apply("Service", {
        "kind": "Service", "metadata": {"name": "dual", "namespace": "default"},
        "spec": {"clusterIP": "10.96.1.30", "clusterIPs": ["10.96.1.30", "fd00:96::30"],
                 "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    for family, ips in (("IPv4", ["172.17.0.2"]), ("IPv6", ["fd00:17::3", "fd00:17::4"])):
        store.apply("EndpointSlice", {
            "kind": "EndpointSlice", "addressType": family,
            "metadata": {"name": f"dual-{family.lower()}", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "dual"}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]})
    return store


def test_services_show_both_families_and_a_proxy_port_per_family() -> None:
    store = dual_store()
    data: dict[str, Any] = views.services(
        store.raw("Service"), store.table(), {NAME: 40001}, views.FirstSeen(), 0.0,
        family_ports={NAME: {"IPv4": 40001, "IPv6": 40002}})
    [svc] = data["items"]
    assert svc["clusterIP"] == "10.96.1.30"
    assert svc["clusterIPs"] == ["10.96.1.30", "fd00:96::30"]
    assert (svc["ipFamilies"], svc["ipFamilyPolicy"]) == (["IPv4", "IPv6"], "PreferDualStack")
    [port] = svc["ports"]
    assert port["proxyPorts"] == {"IPv4": 40001, "IPv6": 40002} and port["endpoints"] == 3
    wide = services_table(data, wide=True).splitlines()
    assert wide[0].split()[-3:] == ["SELECTOR", "PROXY-PORT(S)", "CLUSTER-IPS"]
    assert wide[1].split()[-2:] == ["80->40001,40002/TCP", "10.96.1.30,fd00:96::30"]


def test_endpoints_of_both_families() -> None:
    store = dual_store()
    data: dict[str, Any] = views.endpoints(store.table(), store.raw("EndpointSlice"), {},
                                           store.raw("Service"), views.FirstSeen(), 0.0)
    [item] = data["items"]
    assert item["addresses"] == ["172.17.0.2:8080", "[fd00:17::3]:8080", "[fd00:17::4]:8080"]
    table = endpoints_table(data, wide=True).splitlines()
    assert table[1].split()[2] == "172.17.0.2:8080,[fd00:17::3]:8080,[fd00:17::4]:8080"


def test_rules_view_has_the_lines_of_both_families() -> None:
    redirects = [Redirect(NAME, KIND_CLUSTER, "10.96.1.30", 80, "TCP", 40001),
                 Redirect(NAME, KIND_CLUSTER, "fd00:96::30", 80, "TCP", 40002)]
    data = views.rules(redirects, [("default/dual:http", "cluster", "0.0.0.0", 40001),
                                   ("default/dual:http", "cluster", "::", 40002)])
    assert data["lines"][-1] == KEEP_NAT_V4 and data["lines6"][-1] == KEEP_NAT_V6
    assert ["-d 10.96.1.30/32" in ln for ln in data["lines"]] == [True, False]
    assert ["-d fd00:96::30/128" in ln for ln in data["lines6"]] == [True, False]
    assert [listener["address"] for listener in data["listeners"]] == ["0.0.0.0", "::"]
