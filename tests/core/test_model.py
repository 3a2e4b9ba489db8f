"""Parsing Kubernetes objects into ServicePorts and Endpoints (uproxy.model).

The manifests mirror the tutorial output in /work/shared/seeds: the two-port
service ``default/multi-port`` (10.0.0.180, port1 6789 / port2 9876) over pods
172.17.0.5 and 172.17.0.6, and ``namingthings/simpleservice`` (unnamed port 80
-> 9876).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uproxy.balance import Balancer
from uproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    Endpoint,
    EndpointSet,
    Parsed,
    ServicePortName,
    parse_endpoint_slice,
    parse_endpoints,
    parse_service,
    quick_init,
    resolve_endpoints,
)
from uproxy.state import Store


def service(name: str = "multi-port", *, namespace: str = "default",
            cluster_ip: str | None = "10.0.0.180", ports: list[Any] | None = None,
            **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"ports": ports if ports is not None else [
        {"name": "port1", "port": 6789, "targetPort": 6789, "protocol": "TCP"},
        {"name": "port2", "port": 9876, "targetPort": 9876, "protocol": "TCP"},
    ]}
    if cluster_ip is not None:
        body["clusterIP"] = cluster_ip
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def endpoint_slice(name: str, service_name: str = "multi-port", *, namespace: str = "default",
                   address_type: str = "IPv4", ports: list[Any] | None = None,
                   endpoints: list[Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": address_type,
        "ports": ports if ports is not None else [
            {"name": "port1", "port": 6789, "protocol": "TCP"},
            {"name": "port2", "port": 9876, "protocol": "TCP"},
        ],
        "endpoints": endpoints if endpoints is not None else [
            {"addresses": ["172.17.0.5"], "conditions": {"ready": True}, "nodeName": "127.0.0.1"},
            {"addresses": ["172.17.0.6"], "conditions": {"ready": True}, "nodeName": "127.0.0.1"},
        ],
    }


def by_port(parsed_ports: Any) -> dict[str, Any]:
    return {p.name.port: p for p in parsed_ports}


# --- Services ---------------------------------------------------------------------------------


def test_multi_port_service_from_the_seed() -> None:
    parsed = parse_service(service(), origin="svc.yaml")
    assert parsed.problems == [] and parsed.skipped == []
    ports = by_port(parsed.ports)
    assert set(ports) == {"port1", "port2"}
    p1 = ports["port1"]
    assert p1.name == ServicePortName("default", "multi-port", "port1", "TCP")
    assert str(p1.name) == "default/multi-port:port1"
    assert p1.type == "ClusterIP"
    assert p1.cluster_ips == ("10.0.0.180",)
    assert (p1.port, p1.protocol, p1.target_port) == (6789, "TCP", 6789)
    assert ports["port2"].port == 9876
    assert p1.node_port is None and p1.affinity_timeout is None
    assert not p1.internal_local and not p1.external_local
    assert p1.external_addresses == ()


def test_unnamed_single_port_defaults() -> None:
    svc = service("simpleservice", namespace="namingthings", cluster_ip="172.30.40.155",
                  ports=[{"port": 80, "targetPort": 9876}])
    (port,) = parse_service(svc).ports
    assert str(port.name) == "namingthings/simpleservice:"
    assert (port.protocol, port.port, port.target_port) == ("TCP", 80, 9876)


def test_target_port_defaults_to_port_and_may_be_named() -> None:
    svc = service(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 81, "targetPort": "http"},
                         {"name": "c", "port": 82, "targetPort": "8082"}])
    ports = by_port(parse_service(svc).ports)
    assert ports["a"].target_port == 80
    assert ports["b"].target_port == "http"
    assert ports["c"].target_port == 8082


def test_dual_stack_cluster_ips_take_precedence() -> None:
    svc = service(clusterIPs=["10.0.0.180", "fd00::b4"])
    (first, *_) = parse_service(svc).ports
    assert first.cluster_ips == ("10.0.0.180", "fd00::b4")


def test_nodeport_external_ips_and_load_balancer_ingress() -> None:
    svc = service("k8s-nginx-node", cluster_ip="10.99.157.45", type="LoadBalancer",
                  ports=[{"port": 80, "nodePort": 32293, "protocol": "UDP"}],
                  externalIPs=["192.0.2.10"], externalTrafficPolicy="Local",
                  internalTrafficPolicy="Local")
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"},
                                                  {"hostname": "lb.example"}]}}
    parsed = parse_service(svc)
    assert parsed.problems == []
    (port,) = parsed.ports
    assert port.type == "LoadBalancer"
    assert port.node_port == 32293 and port.protocol == "UDP"
    assert port.external_ips == ("192.0.2.10",)
    assert port.load_balancer_ips == ("198.51.100.7",)
    assert port.external_addresses == ("192.0.2.10", "198.51.100.7")
    assert port.external_local and port.internal_local


def test_node_port_ignored_for_cluster_ip_services() -> None:
    (port,) = parse_service(service(ports=[{"port": 80, "nodePort": 30000}])).ports
    assert port.node_port is None


def test_session_affinity_default_and_explicit_timeout() -> None:
    (default,) = parse_service(service(ports=[{"port": 80}], sessionAffinity="ClientIP")).ports
    assert default.affinity_timeout == DEFAULT_AFFINITY_TIMEOUT == 10800
    explicit = service(ports=[{"port": 80}], sessionAffinity="ClientIP",
                       sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    assert parse_service(explicit).ports[0].affinity_timeout == 60
    none = service(ports=[{"port": 80}], sessionAffinity="None")
    assert parse_service(none).ports[0].affinity_timeout is None


@pytest.mark.parametrize("timeout", [0, 86401, "60", True])
def test_bad_affinity_timeout_is_a_problem(timeout: Any) -> None:
    svc = service(ports=[{"port": 80}], sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}})
    parsed = parse_service(svc, origin="a.yaml")
    assert parsed.ports == []
    (problem,) = parsed.problems
    assert problem.field == "spec.sessionAffinityConfig.clientIP.timeoutSeconds"


def test_headless_and_external_name_are_skipped_not_problems() -> None:
    headless = parse_service(service(cluster_ip="None"))
    assert headless.ports == [] and headless.problems == []
    assert len(headless.skipped) == 1 and "headless" in headless.skipped[0]
    ext = parse_service(service(cluster_ip=None, type="ExternalName", externalName="db.example"))
    assert ext.ports == [] and ext.problems == []
    assert len(ext.skipped) == 1 and "ExternalName" in ext.skipped[0]


def test_sctp_is_reported_and_skipped_other_ports_kept() -> None:
    svc = service(ports=[{"name": "s", "port": 7777, "protocol": "SCTP"},
                         {"name": "t", "port": 80}])
    parsed = parse_service(svc, origin="svc.yaml")
    assert [p.name.port for p in parsed.ports] == ["t"]
    (problem,) = parsed.problems
    assert problem.field == "spec.ports[0].protocol"
    assert "SCTP" in problem.message and "not supported" in problem.message


@pytest.mark.parametrize(
    ("bad_port", "field", "words"),
    [
        ({"name": "bad", "port": 0}, "spec.ports[1].port", "outside 1-65535"),
        ({"name": "bad", "port": 65536}, "spec.ports[1].port", "outside 1-65535"),
        ({"name": "bad", "port": "http"}, "spec.ports[1].port", "not a port number"),
        ({"name": "bad", "port": 81, "targetPort": 70000}, "spec.ports[1].targetPort",
         "outside 1-65535"),
        ({"name": "bad", "port": 81, "protocol": "ICMP"}, "spec.ports[1].protocol",
         "unknown protocol"),
        ({"name": "port1", "port": 81}, "spec.ports[1].name", "duplicate port name"),
        ({"port": 81}, "spec.ports[1].name", "required"),
        ({"name": "bad", "port": 80}, "spec.ports[1].port", "duplicate TCP port 80"),
        ({"name": "bad", "port": 81, "nodePort": 99999}, "spec.ports[1].nodePort", "outside"),
    ],
)
def test_bad_port_is_one_problem_and_the_other_ports_survive(
        bad_port: dict[str, Any], field: str, words: str) -> None:
    svc = service("web", type="NodePort", ports=[
        {"name": "port1", "port": 80}, bad_port, {"name": "port3", "port": 443}])
    parsed = parse_service(svc, origin="/etc/uproxy/web.yaml")
    assert sorted(p.name.port for p in parsed.ports) == ["port1", "port3"]
    (problem,) = parsed.problems
    assert (problem.origin, problem.obj, problem.field) == (
        "/etc/uproxy/web.yaml", "Service default/web", field)
    assert words in problem.message
    line = str(problem)
    assert "\n" not in line
    assert line.startswith(f"/etc/uproxy/web.yaml: Service default/web: {field}: ")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"clusterIP": None}, "spec.clusterIP"),
        ({"clusterIP": "10.0.0.300"}, "spec.clusterIP"),
        ({"clusterIPs": ["10.0.0.1", "bogus"]}, "spec.clusterIPs"),
        ({"externalIPs": ["1.2.3"]}, "spec.externalIPs[0]"),
        ({"ports": []}, "spec.ports"),
        ({"sessionAffinity": "Cookie"}, "spec.sessionAffinity"),
        ({"type": "Nodeport"}, "spec.type"),
        ({"clusterIP": True}, "spec.clusterIP"),
        ({"clusterIP": 167772161}, "spec.clusterIP"),
    ],
)
def test_service_level_problems_name_the_field(change: dict[str, Any], field: str) -> None:
    svc = service()
    svc["spec"].update(change)
    if change.get("clusterIP", "") is None:
        del svc["spec"]["clusterIP"]
    parsed = parse_service(svc, origin="x.yaml")
    assert parsed.ports == []
    (problem,) = parsed.problems
    assert problem.field == field
    assert str(problem).startswith(f"x.yaml: Service default/multi-port: {field}: ")


def test_bad_load_balancer_ip_is_a_problem() -> None:
    svc = service()
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "not-an-ip"}]}}
    (problem,) = parse_service(svc).problems
    assert problem.field == "status.loadBalancer.ingress[0].ip"
    assert "not an IP address" in problem.message


def test_missing_metadata_and_spec() -> None:
    (p,) = parse_service({"kind": "Service", "metadata": {"namespace": "x"}}, "f").problems
    assert p.field == "metadata.name" and p.obj == "Service x/?"
    (p,) = parse_service({"kind": "Service", "metadata": {"name": "a"}}, "f").problems
    assert p.field == "spec"
    assert str(p) == "f: Service default/a: spec: missing"


def test_problem_without_origin_has_no_empty_parts() -> None:
    (p,) = parse_service({"kind": "Service", "metadata": {"name": "a"}}).problems
    assert str(p) == "Service default/a: spec: missing"


# --- EndpointSlices ---------------------------------------------------------------------------


def test_slice_from_the_seed() -> None:
    parsed = parse_endpoint_slice(endpoint_slice("multi-port-abcde"), "s.yaml")
    assert parsed.problems == []
    (eps,) = parsed.endpoint_sets
    assert (eps.namespace, eps.service, eps.address_type) == ("default", "multi-port", "IPv4")
    assert {(p.name, p.port, p.protocol) for p in eps.ports} == {
        ("port1", 6789, "TCP"), ("port2", 9876, "TCP")}
    assert [e.ip for e in eps.endpoints] == ["172.17.0.5", "172.17.0.6"]
    assert all(e.ready and e.serving and not e.terminating for e in eps.endpoints)
    assert eps.endpoints[0].node_name == "127.0.0.1"


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        (None, (True, True, False)),
        ({}, (True, True, False)),
        ({"ready": None}, (True, True, False)),
        ({"ready": False}, (False, False, False)),
        ({"ready": False, "serving": None}, (False, False, False)),
        ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
        ({"ready": True, "serving": False}, (True, False, False)),
        ({"terminating": None}, (True, True, False)),
    ],
)
def test_slice_conditions_follow_api_defaults(conditions: Any,
                                              expected: tuple[bool, bool, bool]) -> None:
    ep: dict[str, Any] = {"addresses": ["172.17.0.5"]}
    if conditions is not None:
        ep["conditions"] = conditions
    (eps,) = parse_endpoint_slice(endpoint_slice("s", endpoints=[ep])).endpoint_sets
    (e,) = eps.endpoints
    assert (e.ready, e.serving, e.terminating) == expected


def test_fqdn_slice_is_skipped() -> None:
    parsed = parse_endpoint_slice(endpoint_slice(
        "f", address_type="FQDN", endpoints=[{"addresses": ["db.example.com"]}]))
    assert parsed.endpoint_sets == [] and parsed.problems == []
    assert len(parsed.skipped) == 1


def test_ipv6_slice_is_kept_apart_and_family_checked() -> None:
    parsed = parse_endpoint_slice(endpoint_slice(
        "v6", address_type="IPv6", endpoints=[{"addresses": ["fd00::5"]},
                                              {"addresses": ["172.17.0.5"]}]), "s.yaml")
    (eps,) = parsed.endpoint_sets
    assert eps.address_type == "IPv6"
    assert [e.ip for e in eps.endpoints] == ["fd00::5"]
    (problem,) = parsed.problems
    assert problem.field == "endpoints[1].addresses[0]"
    assert "not IPv6" in problem.message


def test_slice_without_service_label_or_with_bad_address() -> None:
    obj = endpoint_slice("s")
    del obj["metadata"]["labels"]
    (p,) = parse_endpoint_slice(obj, "s.yaml").problems
    assert p.field == "metadata.labels[kubernetes.io/service-name]"
    bad = endpoint_slice("s", endpoints=[{"addresses": ["300.1.1.1"]},
                                         {"addresses": ["172.17.0.6"]}])
    parsed = parse_endpoint_slice(bad)
    assert [e.ip for e in parsed.endpoint_sets[0].endpoints] == ["172.17.0.6"]
    assert [p.field for p in parsed.problems] == ["endpoints[0].addresses[0]"]


# --- v1 Endpoints -----------------------------------------------------------------------------


def test_v1_endpoints_with_not_ready_addresses() -> None:
    obj = {"apiVersion": "v1", "kind": "Endpoints",
           "metadata": {"name": "multi-port", "namespace": "default"},
           "subsets": [{"addresses": [{"ip": "172.17.0.5", "nodeName": "n1"}],
                        "notReadyAddresses": [{"ip": "172.17.0.6"}, {"ip": "fd00::6"}],
                        "ports": [{"name": "port2", "port": 9876, "protocol": "TCP"},
                                  {"name": "port1", "port": 6789, "protocol": "TCP"}]}]}
    parsed = parse_endpoints(obj, "ep.yaml")
    assert parsed.problems == []
    sets = {s.address_type: s for s in parsed.endpoint_sets}
    assert set(sets) == {"IPv4", "IPv6"}
    v4 = sets["IPv4"]
    assert v4.service == "multi-port"
    assert [(e.ip, e.ready, e.serving, e.node_name) for e in v4.endpoints] == [
        ("172.17.0.5", True, True, "n1"), ("172.17.0.6", False, False, None)]
    assert [e.ip for e in sets["IPv6"].endpoints] == ["fd00::6"]


def test_v1_endpoints_bad_ip_names_the_field() -> None:
    obj = {"kind": "Endpoints", "metadata": {"name": "x"},
           "subsets": [{"addresses": [{"ip": "nope"}], "ports": [{"port": 80}]}]}
    (p,) = parse_endpoints(obj, "ep.yaml").problems
    assert str(p) == "ep.yaml: Endpoints default/x: subsets[0].addresses[0].ip: " \
                     "'nope' is not an IP address"


# --- resolve_endpoints ------------------------------------------------------------------------


def _ports(svc: dict[str, Any]) -> dict[str, Any]:
    return by_port(parse_service(svc).ports)


def test_resolve_uses_the_slice_port_per_name() -> None:
    ports = _ports(service())
    (eps,) = parse_endpoint_slice(endpoint_slice("s")).endpoint_sets
    assert [str(e) for e in resolve_endpoints(ports["port1"], [eps])] == [
        "172.17.0.5:6789", "172.17.0.6:6789"]
    assert [str(e) for e in resolve_endpoints(ports["port2"], [eps])] == [
        "172.17.0.5:9876", "172.17.0.6:9876"]


def test_resolve_target_port_per_slice() -> None:
    # A rolling update changed the container port: two slices, same port name, different numbers.
    svc = service(ports=[{"name": "http", "port": 80, "targetPort": "web"}])
    (port,) = parse_service(svc).ports
    old = endpoint_slice("a", ports=[{"name": "http", "port": 8080}],
                         endpoints=[{"addresses": ["172.17.0.5"]}])
    new = endpoint_slice("b", ports=[{"name": "http", "port": 9090}],
                         endpoints=[{"addresses": ["172.17.0.6"]}])
    sets = [parse_endpoint_slice(o).endpoint_sets[0] for o in (old, new)]
    assert [e.address for e in resolve_endpoints(port, sets)] == [
        ("172.17.0.5", 8080), ("172.17.0.6", 9090)]


def test_resolve_matches_protocol() -> None:
    svc = service("dns", ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                                {"name": "dns-tcp", "port": 53, "protocol": "TCP"}])
    ports = _ports(svc)
    (eps,) = parse_endpoint_slice(endpoint_slice(
        "d", "dns", ports=[{"name": "dns", "port": 5353, "protocol": "TCP"},
                           {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}])).endpoint_sets
    assert resolve_endpoints(ports["dns"], [eps]) == ()
    assert {e.port for e in resolve_endpoints(ports["dns-tcp"], [eps])} == {5354}


def test_resolve_ignores_the_other_family() -> None:
    (port,) = parse_service(service(ports=[{"port": 80}])).ports
    v6 = EndpointSet("default", "multi-port", "IPv6", parse_endpoint_slice(endpoint_slice(
        "s", ports=[{"port": 80}])).endpoint_sets[0].ports, (Endpoint("fd00::1", 0),))
    assert resolve_endpoints(port, [v6]) == ()


def test_resolve_duplicates_across_slices_ready_wins() -> None:
    (port,) = parse_service(service(ports=[{"name": "p", "port": 80}])).ports
    sp = [{"name": "p", "port": 8080}]
    not_ready = endpoint_slice("a", ports=sp, endpoints=[
        {"addresses": ["172.17.0.5"], "conditions": {"ready": False}}])
    ready = endpoint_slice("b", ports=sp, endpoints=[
        {"addresses": ["172.17.0.5"], "conditions": {"ready": True}},
        {"addresses": ["172.17.0.6"]}])
    for order in ((not_ready, ready), (ready, not_ready)):
        sets = [parse_endpoint_slice(o).endpoint_sets[0] for o in order]
        resolved = resolve_endpoints(port, sets)
        assert [(e.ip, e.ready) for e in resolved] == [("172.17.0.5", True),
                                                       ("172.17.0.6", True)]


def test_v1_endpoints_non_list_addresses_is_a_problem() -> None:
    obj = {"kind": "Endpoints", "metadata": {"name": "x"}, "subsets": [{"addresses": 5}]}
    (p,) = parse_endpoints(obj, "ep.yaml").problems
    assert p.field == "subsets[0].addresses"


def test_non_string_node_name_is_a_problem() -> None:
    parsed = parse_endpoint_slice(endpoint_slice("s", endpoints=[
        {"addresses": ["172.17.0.5"], "nodeName": ["n1"]},
        {"addresses": ["172.17.0.6"], "nodeName": "n2", "zone": "z"}]))
    assert [p.field for p in parsed.problems] == ["endpoints[0].nodeName"]
    (e,) = parsed.endpoint_sets[0].endpoints
    assert (e.ip, e.node_name, e.zone) == ("172.17.0.6", "n2", "z")
    hash(e)


# --- robustness: any damage to a valid object gives Problems, never an exception ----------------


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _damaged(obj: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    target: Any = out
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return out


def _full_service() -> dict[str, Any]:
    svc = service(type="LoadBalancer", externalIPs=["192.0.2.1"], sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 5}},
                  ports=[{"name": "a", "port": 80, "targetPort": "http", "nodePort": 30080,
                          "protocol": "TCP"}, {"name": "b", "port": 81}])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
    return svc


def _full_endpoints() -> dict[str, Any]:
    return {"kind": "Endpoints", "metadata": {"name": "multi-port", "namespace": "default"},
            "subsets": [{"addresses": [{"ip": "172.17.0.5", "nodeName": "n"}],
                         "notReadyAddresses": [{"ip": "172.17.0.6"}],
                         "ports": [{"name": "port1", "port": 6789, "protocol": "TCP"}]}]}


def _full_slice() -> dict[str, Any]:
    sl = endpoint_slice("s")
    sl["endpoints"][0].update(zone="z", conditions={"ready": True, "serving": True,
                                                     "terminating": False})
    sl["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": "t"}
    return sl


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2, 70000), st.floats(allow_nan=True),
                 st.text(max_size=4), st.sampled_from(["None", "FQDN", "IPv6", "::1", "SCTP"]),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                      st.integers(), max_size=2))
CASES: list[tuple[Callable[[Any, str], Parsed], dict[str, Any]]] = [
    (parse_service, _full_service()), (parse_endpoint_slice, _full_slice()),
    (parse_endpoints, _full_endpoints())]


@settings(max_examples=400, deadline=None, database=None)
@given(st.sampled_from(range(len(CASES))), st.data(), JUNK)
def test_damaged_objects_never_raise(case: int, data: st.DataObject, junk: Any) -> None:
    parse, good = CASES[case]
    path = data.draw(st.sampled_from(_paths(good)))
    parsed = parse(_damaged(good, path, junk), "damaged.yaml")
    for problem in parsed.problems:
        assert problem.origin == "damaged.yaml"
        assert "\n" not in str(problem)
    for port in parsed.ports:
        hash(port)
    for eps in parsed.endpoint_sets:
        hash(eps)


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(range(len(CASES))), st.data(), JUNK)
def test_damaged_objects_flow_through_store_and_balancer(case: int, data: st.DataObject,
                                                         junk: Any) -> None:
    kinds = ["Service", "EndpointSlice", "Endpoints"]
    path = data.draw(st.sampled_from(_paths(CASES[case][1])))
    store = Store()
    for i, (_, good) in enumerate(CASES):
        store.apply(kinds[i], _damaged(good, path, junk) if i == case else good, "f.yaml")
    balancer = Balancer(node_name="n", rng=random.Random(0))
    for entry in store.table().values():
        for external in (False, True):
            chosen = balancer.choose(entry, "10.9.9.9", 0.0, external=external)
            assert chosen is None or chosen in entry.endpoints
    store.trigger_times()


def test_service_port_name_hashes_once_and_behaves_as_the_plain_dataclass() -> None:
    """Its hash is computed at construction (every table is keyed by it): the same value,
    equality, order and text as before, and a pickled copy is hashed again."""
    import dataclasses
    import pickle

    a = ServicePortName("ns", "svc", "http")
    assert hash(a) == hash(("ns", "svc", "http", "TCP"))
    assert a == ServicePortName("ns", "svc", "http", "TCP") and a != ServicePortName(
        "ns", "svc", "http", "UDP")
    assert sorted([ServicePortName("ns", "svc", "z"), a]) == [a, ServicePortName("ns", "svc", "z")]
    assert repr(a) == "ServicePortName(namespace='ns', name='svc', port='http', protocol='TCP')"
    assert str(a) == "ns/svc:http"
    moved = dataclasses.replace(a, port="dns")
    assert hash(moved) == hash(("ns", "svc", "dns", "TCP"))
    copy = pickle.loads(pickle.dumps(a))
    assert copy == a and hash(copy) == hash(a) and {a: 1}[copy] == 1


def test_quick_init_keeps_the_dataclass_init_s_meaning() -> None:
    """The values the start-up makes by the ten thousand: the same parameters, defaults,
    ``__post_init__`` (ServicePortName's hash), still frozen, ``replace`` still works."""
    name = ServicePortName("ns", "svc", "http")
    assert (name.protocol, hash(name)) == ("TCP", hash(("ns", "svc", "http", "TCP")))
    assert name == ServicePortName(namespace="ns", name="svc", port="http", protocol="TCP")
    ep = Endpoint("10.0.0.1", 80, node_name="n1")
    assert (ep.ready, ep.serving, ep.terminating, ep.zone, ep.zone_hints) == (
        True, True, False, None, ())
    assert dataclasses.replace(ep, port=81) == Endpoint("10.0.0.1", 81, node_name="n1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ep.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Endpoint("10.0.0.1")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Endpoint("10.0.0.1", 80, bogus=1)  # type: ignore[call-arg]

    @dataclasses.dataclass(frozen=True, slots=True)
    class WithFactory:
        items: list[int] = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="not a plain slot field"):
        quick_init(WithFactory)


# The fast paths for the common shapes (issue 16's start-up) must give exactly what the
# reference parsers give, for good input and bad: whatever the fast path does not accept
# it leaves to the reference, whose Problem lines name the field.
_ODD = [None, "", 0, 1, True, False, 80, "80", "http", 70000, -1, "TCP", "UDP", "SCTP", "tcp",
        "10.0.0.9", "fd00::9", "None", "::ffff:10.0.0.9", "10.0.0.300", [], {}, ["10.0.0.9"],
        ["fd00::9"], ["None"], [1], ["10.0.0.9", "fd00::9"], {"a": 1}, "Local", "Cluster",
        "ClientIP", "PreferClose", "NodePort", "LoadBalancer", "ExternalName", 30080,
        [{"ip": "10.0.0.9"}], ["1.2.3.0/24"], ["0.0.0.0/0"], {"ready": False},
        {"serving": False, "terminating": True}, {"forZones": [{"name": "a"}]}]
_SERVICE_FIELDS = [
    ("metadata", "name"), ("metadata", "namespace"), ("metadata", "labels"),
    ("metadata", "labels", "service.kubernetes.io/headless"),
    ("metadata", "labels", "service.kubernetes.io/service-proxy-name"), ("spec",),
    ("spec", "type"), ("spec", "clusterIP"), ("spec", "clusterIPs"), ("spec", "externalIPs"),
    ("spec", "sessionAffinity"), ("spec", "internalTrafficPolicy"),
    ("spec", "externalTrafficPolicy"), ("spec", "trafficDistribution"),
    ("spec", "loadBalancerSourceRanges"), ("spec", "healthCheckNodePort"), ("spec", "ports"),
    ("spec", "ports", 0), ("spec", "ports", 0, "name"), ("spec", "ports", 0, "port"),
    ("spec", "ports", 0, "protocol"), ("spec", "ports", 0, "targetPort"),
    ("spec", "ports", 0, "nodePort"), ("spec", "ports", 1, "name"), ("spec", "ports", 1, "port"),
    ("spec", "ports", 1, "protocol"), ("status", "loadBalancer", "ingress"),
]
_SLICE_FIELDS = [
    ("metadata", "name"), ("metadata", "namespace"), ("metadata", "labels"),
    ("metadata", "labels", "kubernetes.io/service-name"), ("metadata", "annotations"),
    ("metadata", "annotations", "endpoints.kubernetes.io/last-change-trigger-time"),
    ("addressType",), ("ports",), ("ports", 0), ("ports", 0, "name"), ("ports", 0, "port"),
    ("ports", 0, "protocol"), ("endpoints",), ("endpoints", 0), ("endpoints", 0, "addresses"),
    ("endpoints", 0, "addresses", 0), ("endpoints", 0, "conditions"),
    ("endpoints", 0, "conditions", "ready"), ("endpoints", 0, "conditions", "serving"),
    ("endpoints", 0, "nodeName"), ("endpoints", 0, "zone"), ("endpoints", 0, "hints"),
    ("endpoints", 1, "addresses", 0),
]


def _two_port_service() -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": "s", "namespace": "n", "labels": {"a": "b"}},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.0.0.1",
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
                     "ports": [{"name": "a", "port": 80, "targetPort": "web", "nodePort": 30001},
                               {"name": "b", "port": 53, "protocol": "UDP", "targetPort": 5353}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}}


def _two_endpoint_slice() -> dict[str, Any]:
    return {"kind": "EndpointSlice",
            "metadata": {"name": "s-1", "namespace": "n",
                         "labels": {"kubernetes.io/service-name": "s"},
                         "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "t"}},
            "addressType": "IPv4", "ports": [{"name": "a", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.1.1"], "conditions": {"ready": True},
                           "nodeName": "node", "zone": "z"},
                          {"addresses": ["10.0.1.2"]}]}


def _set_path(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for step in path[:-1]:
        try:
            obj = obj[step]
        except (KeyError, IndexError, TypeError):
            return
    with contextlib.suppress(IndexError, TypeError):
        obj[path[-1]] = value


_MUTATIONS = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(_ODD)), max_size=3)


@settings(max_examples=600, deadline=None)
@given(changes=_MUTATIONS)
def test_fast_service_parse_is_the_reference(changes: list[tuple[int, Any]]) -> None:
    from uproxy.model import _parse_service
    obj = _two_port_service()
    for which, value in changes:
        _set_path(obj, _SERVICE_FIELDS[which % len(_SERVICE_FIELDS)], copy.deepcopy(value))
    assert parse_service(obj, "f.yaml") == _parse_service(obj, "f.yaml")


@settings(max_examples=600, deadline=None)
@given(changes=_MUTATIONS)
def test_fast_slice_parse_is_the_reference(changes: list[tuple[int, Any]]) -> None:
    from uproxy.model import _parse_endpoint_slice
    obj = _two_endpoint_slice()
    for which, value in changes:
        _set_path(obj, _SLICE_FIELDS[which % len(_SLICE_FIELDS)], copy.deepcopy(value))
    assert parse_endpoint_slice(obj, "f.yaml") == _parse_endpoint_slice(obj, "f.yaml")


def test_fast_parse_takes_the_common_shapes() -> None:
    """The common shapes do take the fast path (else the test above compares the
    reference with itself)."""
    from uproxy.model import _service_fast, _slice_fast
    service = _two_port_service()
    assert _service_fast(service) is not None
    assert _slice_fast(_two_endpoint_slice()) is not None
    del service["status"], service["metadata"]["labels"]
    service["spec"].update(type=None, clusterIPs=["fd00::1", "10.0.0.1"], ports=[{"port": 80}])
    assert _service_fast(service) is not None
    assert _service_fast({**service, "spec": {**service["spec"], "clusterIP": "None",
                                             "clusterIPs": None}}) is None
