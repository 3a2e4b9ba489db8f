"""Dual-stack in the pure core: a Service's endpoints of every family it has, and each
family choosing among its own (kube-proxy runs one proxier per family, each seeing only
the EndpointSlices of its ``addressType``)."""

from __future__ import annotations

import random
from pathlib import Path

from uproxy.balance import Balancer, serving_addresses, usable_endpoints
from uproxy.model import Endpoint, EndpointSet, ServicePort, ServicePortName, SlicePort
from uproxy.model import resolve_endpoints as resolve
from uproxy.proxy.families import ipv6_missing
from uproxy.proxy.listeners import bind_addresses
from uproxy.state import Entry

NAME = ServicePortName("default", "dual", "http")
SLICE_PORTS = (SlicePort("http", 8080, "TCP"),)


def port(*cluster_ips: str, affinity: int | None = None) -> ServicePort:
    return ServicePort(NAME, "ClusterIP", cluster_ips, 80, "TCP", 8080,
                       affinity_timeout=affinity)


def sets() -> list[EndpointSet]:
    return [EndpointSet("default", "dual", "IPv4", SLICE_PORTS,
                        (Endpoint("172.17.0.2", 0),)),
            EndpointSet("default", "dual", "IPv6", SLICE_PORTS,
                        (Endpoint("fd00:17::3", 0), Endpoint("fd00:17::4", 0)))]


def test_endpoints_of_every_family_the_service_has() -> None:
    dual = resolve(port("10.96.1.30", "fd00:96::30"), sets())
    assert [e.ip for e in dual] == ["172.17.0.2", "fd00:17::3", "fd00:17::4"]
    assert all(e.port == 8080 for e in dual)
    # single-stack services see only their own family's slices
    assert [e.ip for e in resolve(port("10.96.1.30"), sets())] == ["172.17.0.2"]
    assert [e.ip for e in resolve(port("fd00:96::30"), sets())] == ["fd00:17::3", "fd00:17::4"]


def test_each_family_chooses_among_its_own_endpoints() -> None:
    entry = Entry(port("10.96.1.30", "fd00:96::30"), resolve(port("10.96.1.30", "fd00:96::30"),
                                                             sets()))
    balancer = Balancer(node_name="node", rng=random.Random(7))
    four = {balancer.choose(entry, "10.99.0.2", 0.0, family=4) for _ in range(20)}
    six = {balancer.choose(entry, "fd00:99::2", 0.0, family=6) for _ in range(40)}
    assert {e.ip for e in four if e} == {"172.17.0.2"}
    assert {e.ip for e in six if e} == {"fd00:17::3", "fd00:17::4"}
    # a family without endpoints has none (kube-proxy REJECTs it), whatever the other has
    v4_only = Entry(entry.port, tuple(e for e in entry.endpoints if ":" not in e.ip))
    assert balancer.choose(v4_only, "fd00:99::2", 0.0, family=6) is None
    assert usable_endpoints(v4_only, external=False, node_name="node", family=6) == ()


def test_graceful_termination_is_decided_per_family() -> None:
    """IPv6 has only a terminating endpoint: it still serves IPv6, although IPv4 has a
    ready one (the fallback is per family, as each family's proxier computes it)."""
    endpoints = (Endpoint("172.17.0.2", 8080),
                 Endpoint("fd00:17::3", 8080, ready=False, serving=True, terminating=True))
    entry = Entry(port("10.96.1.30", "fd00:96::30"), endpoints)
    assert [e.ip for e in usable_endpoints(entry, external=False, node_name="n", family=6)] \
        == ["fd00:17::3"]
    assert serving_addresses([Entry(port("10.96.1.30", "fd00:96::30"), endpoints)],
                             node_name="n", protocol="TCP") == {("172.17.0.2", 8080),
                                                                ("fd00:17::3", 8080)}


def test_affinity_holds_per_client_address_of_either_family() -> None:
    p = port("10.96.1.30", "fd00:96::30", affinity=60)
    entry = Entry(p, resolve(p, sets()))
    balancer = Balancer(node_name="node", rng=random.Random(1))
    picks = {balancer.choose(entry, "fd00:99::2", float(t), family=6) for t in range(10)}
    assert len(picks) == 1 and ":" in next(iter(picks)).ip  # type: ignore[union-attr]


def test_bind_addresses_per_family() -> None:
    assert bind_addresses("0.0.0.0", (4, 6)) == {4: "0.0.0.0", 6: "::"}
    assert bind_addresses("0.0.0.0", (4,)) == {4: "0.0.0.0"}
    assert bind_addresses("10.99.0.1", (4, 6)) == {4: "10.99.0.1"}
    assert bind_addresses("fd00:99::1", (4, 6)) == {6: "fd00:99::1"}


def test_ipv6_missing_says_why(tmp_path: Path) -> None:
    assert ipv6_missing(tmp_path / "absent") == "the kernel has no IPv6 (no /proc/net/if_inet6)"
    empty = tmp_path / "if_inet6"
    empty.write_text("")
    assert ipv6_missing(empty) == "the node has no IPv6 address (IPv6 disabled)"
    empty.write_text("00000000000000000000000000000001 01 80 10 80       lo\n")
    assert ipv6_missing(empty) is None
