"""Which address and port redirects to which proxy port (uproxy.redirects): the one derivation
the daemon's rules, ``uproxy rules`` and the UDP conntrack cleanup share."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uproxy.model import ServicePort, ServicePortName
from uproxy.redirects import (
    SCOPE_CLUSTER,
    SCOPE_EXTERNAL,
    frontends,
    placeholder_redirects,
    proxy_ports_needed,
    proxy_scopes,
    redirects_of,
)
from uproxy.rules import KIND_CLUSTER, KIND_EXTERNAL, KIND_LOADBALANCER, Redirect
from uproxy.state import Entry

WEB = ServicePortName("default", "web", "http", "TCP")
DNS = ServicePortName("kube-system", "dns", "dns", "UDP")


def port(name: ServicePortName = WEB, *, cluster: tuple[str, ...] = ("10.96.0.10",),
         external: tuple[str, ...] = (), lb: tuple[str, ...] = (), number: int = 80,
         node_port: int | None = None) -> ServicePort:
    return ServicePort(name, "ClusterIP", cluster, number, name.protocol, 8080,
                       node_port=node_port, external_ips=external, load_balancer_ips=lb)


def test_cluster_only_port_has_one_scope_and_its_rules() -> None:
    p = port()
    assert proxy_scopes(p) == (SCOPE_CLUSTER,)
    out = redirects_of(p, {SCOPE_CLUSTER: 40000})
    assert out.rules == [Redirect(WEB, KIND_CLUSTER, "10.96.0.10", 80, "TCP", 40000)]
    assert out.skipped == []


def test_external_and_loadbalancer_ips_share_the_external_socket() -> None:
    p = port(external=("192.0.2.1",), lb=("198.51.100.7",))
    assert proxy_scopes(p) == (SCOPE_CLUSTER, SCOPE_EXTERNAL)
    assert frontends(p) == [(SCOPE_CLUSTER, KIND_CLUSTER, "10.96.0.10"),
                            (SCOPE_EXTERNAL, KIND_EXTERNAL, "192.0.2.1"),
                            (SCOPE_EXTERNAL, KIND_LOADBALANCER, "198.51.100.7")]
    out = redirects_of(p, {SCOPE_CLUSTER: 40000, SCOPE_EXTERNAL: 40001})
    assert [(r.kind, r.address, r.to_port) for r in out.rules] == [
        (KIND_CLUSTER, "10.96.0.10", 40000),
        (KIND_EXTERNAL, "192.0.2.1", 40001),
        (KIND_LOADBALANCER, "198.51.100.7", 40001)]


def test_a_scope_without_a_socket_gets_no_rules() -> None:
    """A proxy port that could not be bound: its addresses are not redirected (yet)."""
    p = port(external=("192.0.2.1",))
    assert [r.kind for r in redirects_of(p, {SCOPE_EXTERNAL: 40001}).rules] == [KIND_EXTERNAL]
    assert [r.kind for r in redirects_of(p, {SCOPE_CLUSTER: 40000}).rules] == [KIND_CLUSTER]
    assert not redirects_of(p, {}).rules


def test_ipv6_addresses_are_skipped_not_dropped_silently() -> None:
    p = port(DNS, cluster=("10.96.0.53", "fd00::53"), lb=("2001:db8::1",), number=53)
    out = redirects_of(p, {SCOPE_CLUSTER: 40000, SCOPE_EXTERNAL: 40001})
    assert [r.address for r in out.rules] == ["10.96.0.53"]
    assert [(r.kind, r.address, r.to_port) for r in out.skipped] == [
        (KIND_CLUSTER, "fd00::53", 40000), (KIND_LOADBALANCER, "2001:db8::1", 40001)]
    assert all(r.protocol == "UDP" and r.port == 53 for r in out.rules + out.skipped)


def test_node_ports_are_listeners_not_redirects() -> None:
    p = port(node_port=30080)
    assert proxy_scopes(p) == (SCOPE_CLUSTER,)
    assert [r.address for r in redirects_of(p, {SCOPE_CLUSTER: 40000}).rules] == ["10.96.0.10"]


def test_placeholder_ports_are_numbered_in_table_order() -> None:
    other = ServicePortName("default", "lb", "", "TCP")
    table = {WEB: Entry(port(), ()),
             other: Entry(port(other, cluster=("10.96.0.11",), lb=("198.51.100.7",)), ()),
             DNS: Entry(port(DNS, cluster=("10.96.0.53", "fd00::53"), number=53), ())}
    assert proxy_ports_needed(table) == 4
    out = placeholder_redirects(table, range(40000, 40004))
    assert [(r.address, r.to_port) for r in out.rules] == [
        ("10.96.0.10", 40000), ("10.96.0.11", 40001), ("198.51.100.7", 40002),
        ("10.96.0.53", 40003)]
    assert [(r.address, r.to_port) for r in out.skipped] == [("fd00::53", 40003)]
    with pytest.raises(StopIteration):
        placeholder_redirects(table, range(40000, 40003))


ADDRESSES = st.sampled_from(["10.0.0.1", "10.0.0.2", "192.0.2.9", "fd00::1", "2001:db8::2"])


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(ADDRESSES, max_size=3, unique=True), st.lists(ADDRESSES, max_size=3, unique=True),
       st.lists(ADDRESSES, max_size=3, unique=True))
def test_every_address_is_redirected_or_skipped_exactly_once(
        cluster: list[str], external: list[str], lb: list[str]) -> None:
    p = port(cluster=tuple(cluster), external=tuple(external), lb=tuple(lb))
    ports = dict(zip(proxy_scopes(p), (40000, 40001), strict=False))
    out = redirects_of(p, ports)
    assert len(out.rules) + len(out.skipped) == len(cluster) + len(external) + len(lb)
    assert all(r.family == 4 for r in out.rules) and all(r.family == 6 for r in out.skipped)
    for r in out.rules + out.skipped:
        assert r.to_port == (40000 if r.kind == KIND_CLUSTER else 40001)
