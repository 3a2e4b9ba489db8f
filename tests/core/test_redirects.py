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
    proxy_sockets,
    redirects_of,
    service_families,
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


C4, E4, C6, E6 = (SCOPE_CLUSTER, 4), (SCOPE_EXTERNAL, 4), (SCOPE_CLUSTER, 6), (SCOPE_EXTERNAL, 6)


def test_cluster_only_port_has_one_scope_and_its_rules() -> None:
    p = port()
    assert proxy_scopes(p) == (SCOPE_CLUSTER,)
    out = redirects_of(p, {C4: 40000})
    assert out.rules == [Redirect(WEB, KIND_CLUSTER, "10.96.0.10", 80, "TCP", 40000)]
    assert out.skipped == []


def test_external_and_loadbalancer_ips_share_the_external_socket() -> None:
    p = port(external=("192.0.2.1",), lb=("198.51.100.7",))
    assert proxy_scopes(p) == (SCOPE_CLUSTER, SCOPE_EXTERNAL)
    assert frontends(p) == [(SCOPE_CLUSTER, KIND_CLUSTER, "10.96.0.10"),
                            (SCOPE_EXTERNAL, KIND_EXTERNAL, "192.0.2.1"),
                            (SCOPE_EXTERNAL, KIND_LOADBALANCER, "198.51.100.7")]
    out = redirects_of(p, {C4: 40000, E4: 40001})
    assert [(r.kind, r.address, r.to_port) for r in out.rules] == [
        (KIND_CLUSTER, "10.96.0.10", 40000),
        (KIND_EXTERNAL, "192.0.2.1", 40001),
        (KIND_LOADBALANCER, "198.51.100.7", 40001)]


def test_a_scope_without_a_socket_gets_no_rules() -> None:
    """A proxy port that could not be bound: its addresses are not redirected (yet)."""
    p = port(external=("192.0.2.1",))
    assert [r.kind for r in redirects_of(p, {E4: 40001}).rules] == [KIND_EXTERNAL]
    assert [r.kind for r in redirects_of(p, {C4: 40000}).rules] == [KIND_CLUSTER]
    assert not redirects_of(p, {}).rules


def test_each_family_has_its_own_socket_and_rules() -> None:
    p = port(DNS, cluster=("10.96.0.53", "fd00::53"), lb=("2001:db8::1",), number=53)
    assert proxy_sockets(p) == [C4, C6, E6]
    assert service_families(p) == (4, 6)
    out = redirects_of(p, {C4: 40000, C6: 40001, E6: 40002})
    assert [(r.kind, r.address, r.to_port) for r in out.rules] == [
        (KIND_CLUSTER, "10.96.0.53", 40000), (KIND_CLUSTER, "fd00::53", 40001),
        (KIND_LOADBALANCER, "2001:db8::1", 40002)]
    assert out.skipped == []
    assert all(r.protocol == "UDP" and r.port == 53 for r in out.rules)


def test_a_family_the_node_does_not_serve_is_skipped_not_dropped_silently() -> None:
    p = port(DNS, cluster=("10.96.0.53", "fd00::53"), lb=("2001:db8::1",), number=53)
    assert proxy_sockets(p, families=(4,)) == [C4]
    out = redirects_of(p, {C4: 40000}, families=(4,))
    assert [r.address for r in out.rules] == ["10.96.0.53"]
    assert [(r.kind, r.address) for r in out.skipped] == [
        (KIND_CLUSTER, "fd00::53"), (KIND_LOADBALANCER, "2001:db8::1")]


def test_external_addresses_of_another_family_are_not_served() -> None:
    """kube-proxy's IPv6 proxier ignores a single-stack IPv4 Service (and so its IPv6
    externalIPs); uproxy does not redirect them either."""
    p = port(external=("192.0.2.1", "2001:db8::7"), lb=("2001:db8::8",))
    assert [a for _, _, a in frontends(p)] == ["10.96.0.10", "192.0.2.1"]
    assert proxy_sockets(p) == [C4, E4]


def test_single_stack_ipv6_service_has_only_ipv6_sockets() -> None:
    p = port(cluster=("fd00:96::30",), external=("2001:db8::7",))
    assert proxy_sockets(p) == [C6, E6] and service_families(p) == (6,)


def test_node_ports_are_listeners_not_redirects() -> None:
    p = port(node_port=30080)
    assert proxy_scopes(p) == (SCOPE_CLUSTER,)
    assert [r.address for r in redirects_of(p, {C4: 40000}).rules] == ["10.96.0.10"]


def test_placeholder_ports_are_numbered_in_table_order() -> None:
    other = ServicePortName("default", "lb", "", "TCP")
    table = {WEB: Entry(port(), ()),
             other: Entry(port(other, cluster=("10.96.0.11",), lb=("198.51.100.7",)), ()),
             DNS: Entry(port(DNS, cluster=("10.96.0.53", "fd00::53"), number=53), ())}
    assert proxy_ports_needed(table) == 5
    assert proxy_ports_needed(table, families=(4,)) == 4
    out = placeholder_redirects(table, range(40000, 40005))
    assert [(r.address, r.to_port) for r in out.rules] == [
        ("10.96.0.10", 40000), ("10.96.0.11", 40001), ("198.51.100.7", 40002),
        ("10.96.0.53", 40003), ("fd00::53", 40004)]
    assert out.skipped == []
    with pytest.raises(StopIteration):
        placeholder_redirects(table, range(40000, 40004))


ADDRESSES = st.sampled_from(["10.0.0.1", "10.0.0.2", "192.0.2.9", "fd00::1", "2001:db8::2"])


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(ADDRESSES, max_size=3, unique=True), st.lists(ADDRESSES, max_size=3, unique=True),
       st.lists(ADDRESSES, max_size=3, unique=True), st.booleans())
def test_every_address_is_redirected_or_skipped_exactly_once(
        cluster: list[str], external: list[str], lb: list[str], v6: bool) -> None:
    p = port(cluster=tuple(cluster), external=tuple(external), lb=tuple(lb))
    families = (4, 6) if v6 else (4,)
    sockets = proxy_sockets(p, families)
    ports = {key: 40000 + i for i, key in enumerate(sockets)}
    out = redirects_of(p, ports, families=families)
    own = service_families(p)  # an external address of another family is not served
    expected = cluster + [a for a in external + lb if (6 if ":" in a else 4) in own]
    assert sorted(r.address for r in out.rules + out.skipped) == sorted(expected)
    assert all(r.family in families for r in out.rules)
    assert all(r.family not in families for r in out.skipped)
    for r in out.rules:  # each to the socket of its own scope and family
        scope = SCOPE_CLUSTER if r.kind == KIND_CLUSTER else SCOPE_EXTERNAL
        assert r.to_port == ports[(scope, r.family)]
