"""Topology (uproxy.topology through uproxy.balance.usable_endpoints), table-driven.

The cases mirror kube-proxy's ``pkg/proxy/topology_test.go`` (``TestCategorizeEndpoints``):
zone hints, node hints, the fall-backs to every endpoint (a hint missing on a ready
endpoint, no hint for this node or zone, a node without a zone), unready endpoints not
judged, terminating endpoints ignoring topology, and Local policies ignoring topology.
Then the Traffic Distribution e2e cases (``test/e2e/network/traffic_distribution.go``) as
pure checks of which endpoints each client node may reach, and the hints the
EndpointSlice controller would write (``--manifests`` has no controller).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from uproxy.balance import Balancer, usable_endpoints
from uproxy.model import Endpoint, ServicePort, ServicePortName, parse_endpoint_slice
from uproxy.state import Entry, Store
from uproxy.topology import synthesize_hints, topology_mode

NAME = ServicePortName("default", "svc", "", "TCP")


def ep(last: int, *, zone: str | None = None, node: str | None = None,
       zones: tuple[str, ...] = (), nodes: tuple[str, ...] = (), ready: bool = True,
       serving: bool | None = None, terminating: bool = False) -> Endpoint:
    return Endpoint(f"10.1.2.{last}", 80, ready, ready if serving is None else serving,
                    terminating, node, zone, zones, nodes)


def entry(*endpoints: Endpoint, itp_local: bool = False, etp_local: bool = False) -> Entry:
    port = ServicePort(name=NAME, type="NodePort", cluster_ips=("10.96.0.1",), port=80,
                       protocol="TCP", target_port=80, node_port=30080,
                       internal_local=itp_local, external_local=etp_local)
    return Entry(port, endpoints)


@dataclass
class Case:
    name: str
    endpoints: list[Endpoint]
    zone: str | None = "zone-a"
    node: str = "node-1"
    cluster: set[int] = field(default_factory=set)  # last octets usable via the ClusterIP
    external: set[int] | None = None  # via a NodePort (None: same as cluster)
    itp_local: bool = False
    etp_local: bool = False
    mode: str = ""


CASES = [
    Case("no endpoints", [], cluster=set()),
    Case("zone hints: this zone's endpoints",
         [ep(3, zones=("zone-a",)), ep(4, zones=("zone-b",)), ep(5, zones=("zone-c",)),
          ep(6, zones=("zone-a",))],
         cluster={3, 6}, mode="PreferSameZone"),
    Case("zone hints for another zone than the endpoint's own (topology-mode Auto)",
         [ep(3, zone="zone-b", zones=("zone-a",)), ep(4, zone="zone-a", zones=("zone-b",))],
         cluster={3}, mode="PreferSameZone"),
    Case("an endpoint hinted for several zones",
         [ep(3, zones=("zone-a", "zone-b")), ep(4, zones=("zone-b",))],
         cluster={3}, mode="PreferSameZone"),
    Case("node without a zone: no filtering",
         [ep(3, zones=("zone-a",)), ep(4, zones=("zone-b",))], zone=None, cluster={3, 4}),
    Case("empty zone label: no filtering",
         [ep(3, zones=("zone-a",)), ep(4, zones=("zone-b",))], zone="", cluster={3, 4}),
    Case("node in a zone no endpoint is hinted for: no filtering",
         [ep(3, zones=("zone-a",)), ep(4, zones=("zone-b",))], zone="zone-d", cluster={3, 4}),
    Case("a ready endpoint without hints: fall back to all",
         [ep(3, zones=("zone-a",)), ep(4), ep(5, zones=("zone-c",))], cluster={3, 4, 5}),
    Case("no hints at all", [ep(3, zone="zone-a"), ep(4, zone="zone-b")], cluster={3, 4}),
    Case("unready endpoint without hints is not judged",
         [ep(3, zones=("zone-a",)), ep(4, ready=False), ep(5, zones=("zone-b",))],
         cluster={3}, mode="PreferSameZone"),
    Case("only unready endpoints in this zone: no filtering",
         [ep(3, zones=("zone-a",), ready=False), ep(4, zones=("zone-b",)),
          ep(5, zones=("zone-c",))],
         cluster={4, 5}),
    Case("no ready endpoint: serving-terminating ones, topology ignored",
         [ep(3, zones=("zone-a",), ready=False, serving=True, terminating=True),
          ep(4, zones=("zone-b",), ready=False, serving=True, terminating=True),
          ep(5, zones=("zone-a",), ready=False, serving=False, terminating=True)],
         cluster={3, 4}),
    Case("ready endpoints win over terminating ones in this zone",
         [ep(3, zones=("zone-a",), ready=False, serving=True, terminating=True),
          ep(4, zones=("zone-b",))],
         cluster={4}),
    Case("node hints: this node's endpoints",
         [ep(3, node="node-1", nodes=("node-1",), zones=("zone-a",)),
          ep(4, node="node-2", nodes=("node-2",), zones=("zone-a",)),
          ep(5, node="node-3", nodes=("node-3",), zones=("zone-b",))],
         cluster={3}, mode="PreferSameNode"),
    Case("node hints, none for this node: fall back to the zone hints",
         [ep(4, node="node-2", nodes=("node-2",), zones=("zone-a",)),
          ep(5, node="node-3", nodes=("node-3",), zones=("zone-b",))],
         cluster={4}, mode="PreferSameZone"),
    Case("node hints, none for this node or zone: all",
         [ep(4, node="node-2", nodes=("node-2",), zones=("zone-b",)),
          ep(5, node="node-3", nodes=("node-3",), zones=("zone-c",))],
         cluster={4, 5}),
    Case("node hints missing on one ready endpoint: zone hints decide",
         [ep(3, node="node-1", nodes=("node-1",), zones=("zone-a",)),
          ep(4, node="node-2", zones=("zone-a",)),
          ep(5, node="node-3", zones=("zone-b",))],
         cluster={3, 4}, mode="PreferSameZone"),
    Case("this node's endpoint unready: fall back",
         [ep(3, node="node-1", nodes=("node-1",), zones=("zone-a",), ready=False),
          ep(4, node="node-2", nodes=("node-2",), zones=("zone-a",)),
          ep(5, node="node-3", nodes=("node-3",), zones=("zone-b",))],
         cluster={4}, mode="PreferSameZone"),
    Case("externalTrafficPolicy Local: external traffic ignores topology",
         [ep(3, node="node-1", zones=("zone-b",)), ep(4, node="node-2", zones=("zone-a",))],
         cluster={4}, external={3}, etp_local=True, mode="PreferSameZone"),
    Case("externalTrafficPolicy Local without a local endpoint: nothing external",
         [ep(4, node="node-2", zones=("zone-a",))],
         cluster={4}, external=set(), etp_local=True, mode="PreferSameZone"),
    Case("internalTrafficPolicy Local: ClusterIP traffic ignores topology",
         [ep(3, node="node-1", zones=("zone-b",)), ep(4, node="node-2", zones=("zone-a",))],
         cluster={3}, external={4}, itp_local=True, mode="PreferSameZone"),
    Case("internalTrafficPolicy Local: local serving-terminating when nothing local is ready",
         [ep(3, node="node-1", ready=False, serving=True, terminating=True),
          ep(4, node="node-2")],
         cluster={3}, external={4}, itp_local=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_categorize_endpoints(case: Case) -> None:
    e = entry(*case.endpoints, itp_local=case.itp_local, etp_local=case.etp_local)

    def octets(external: bool) -> set[int]:
        usable = usable_endpoints(e, external=external, node_name=case.node, zone=case.zone)
        return {int(x.ip.rsplit(".", 1)[1]) for x in usable}

    assert octets(False) == case.cluster
    assert octets(True) == (case.cluster if case.external is None else case.external)
    assert topology_mode(case.endpoints, case.node, case.zone) == case.mode


def test_the_balancer_follows_its_zone() -> None:
    e = entry(ep(3, zones=("zone-a",)), ep(4, zones=("zone-b",)))
    balancer = Balancer(node_name="node-1", zone="zone-a")
    assert {balancer.choose(e, f"10.0.0.{i}", 0.0) for i in range(30)} == {e.endpoints[0]}
    balancer.zone = "zone-b"
    assert {balancer.choose(e, f"10.0.0.{i}", 0.0) for i in range(30)} == {e.endpoints[1]}
    balancer.zone = None
    assert {balancer.choose(e, f"10.0.0.{i}", 0.0) for i in range(60)} == set(e.endpoints)


# --- the Traffic Distribution e2e cases, as which endpoints each client's node uses --------

#: server -> (node, zone); the hints are what the controller writes for the distribution
SERVERS = {1: ("node-a1", "zone-a"), 2: ("node-a2", "zone-a"), 3: ("node-b1", "zone-b")}


def servers(distribution: str, present: tuple[int, ...] = (1, 2, 3)) -> Entry:
    plain = tuple(ep(i, node=SERVERS[i][0], zone=SERVERS[i][1]) for i in present)
    return entry(*synthesize_hints(plain, distribution))


def reached(e: Entry, node: str, zone: str) -> set[int]:
    usable = usable_endpoints(e, external=False, node_name=node, zone=zone)
    return {int(x.ip.rsplit(".", 1)[1]) for x in usable}


@pytest.mark.parametrize("distribution", ["PreferClose", "PreferSameZone"])
def test_should_route_traffic_to_an_endpoint_in_the_same_zone(distribution: str) -> None:
    """e2e "should route traffic to an endpoint in the same zone when using PreferClose"
    (and "... PreferSameZone"): clients in zones A, B and C; servers in A and B."""
    e = servers(distribution, (1, 3))
    assert reached(e, "node-a9", "zone-a") == {1}
    assert reached(e, "node-b9", "zone-b") == {3}
    assert reached(e, "node-c1", "zone-c") == {1, 3}


@pytest.mark.parametrize("distribution", ["PreferClose", "PreferSameZone"])
def test_should_route_traffic_correctly_between_pods_on_multiple_nodes(distribution: str) -> None:
    """e2e "should route traffic correctly between pods on multiple nodes when using
    PreferClose" (and "... PreferSameZone"): zone A has two nodes with a server each."""
    e = servers(distribution)
    assert reached(e, "node-a1", "zone-a") == {1, 2}
    assert reached(e, "node-a2", "zone-a") == {1, 2}
    assert reached(e, "node-b2", "zone-b") == {3}  # client and server on different nodes
    assert reached(e, "node-c1", "zone-c") == {1, 2, 3}


def test_should_route_traffic_to_an_endpoint_on_the_same_node_or_fall_back_to_same_zone() -> None:
    """e2e "should route traffic to an endpoint on the same node or fall back to same zone
    when using PreferSameNode"."""
    e = servers("PreferSameNode")
    assert reached(e, "node-a1", "zone-a") == {1}
    assert reached(e, "node-a2", "zone-a") == {2}
    assert reached(e, "node-b2", "zone-b") == {3}  # no server on its node: same zone
    assert reached(e, "node-c1", "zone-c") == {1, 2, 3}


def test_should_route_traffic_to_an_endpoint_on_the_same_node_and_fall_back_when_unavailable(
) -> None:
    """e2e "should route traffic to an endpoint on the same node when using PreferSameNode
    and fall back when the endpoint becomes unavailable" (two nodes in one zone)."""
    both = servers("PreferSameNode", (1, 2))
    assert reached(both, "node-a1", "zone-a") == {1}
    assert reached(both, "node-a2", "zone-a") == {2}
    gone = servers("PreferSameNode", (2,))  # server 1 deleted
    assert reached(gone, "node-a1", "zone-a") == {2}
    assert reached(gone, "node-a2", "zone-a") == {2}
    assert reached(both, "node-a1", "zone-a") == {1}  # recreated: same node again


# --- the hints: parsed from slices, synthesised for --manifests ----------------------------

def slice_with_hints(hints: dict[str, object] | None) -> dict[str, object]:
    endpoint: dict[str, object] = {"addresses": ["10.1.2.3"], "zone": "zone-a", "nodeName": "n1"}
    if hints is not None:
        endpoint["hints"] = hints
    return {"kind": "EndpointSlice",
            "metadata": {"name": "svc-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "svc"}},
            "addressType": "IPv4", "ports": [{"name": "", "port": 80}], "endpoints": [endpoint]}


def test_hints_are_parsed_from_the_slice() -> None:
    parsed = parse_endpoint_slice(slice_with_hints(
        {"forZones": [{"name": "zone-a"}, {"name": "zone-b"}], "forNodes": [{"name": "n1"}]}))
    [endpoint] = parsed.endpoint_sets[0].endpoints
    assert (endpoint.zone_hints, endpoint.node_hints) == (("zone-a", "zone-b"), ("n1",))
    bad = parse_endpoint_slice(slice_with_hints({"forZones": [{}]}))
    assert [str(p) for p in bad.problems] == [
        "EndpointSlice default/svc-1: endpoints[0].hints.forZones[0].name: missing"]


@pytest.mark.parametrize(("distribution", "zones", "nodes"), [
    ("PreferClose", ("zone-a",), ()),
    ("PreferSameZone", ("zone-a",), ()),
    ("PreferSameNode", ("zone-a",), ("n1",)),
    (None, (), ()),
    ("SomethingNew", (), ()),
])
def test_manifests_get_the_controllers_hints(distribution: str | None, zones: tuple[str, ...],
                                             nodes: tuple[str, ...]) -> None:
    svc = {"kind": "Service", "metadata": {"name": "svc", "namespace": "default"},
           "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}
    if distribution:
        svc["spec"]["trafficDistribution"] = distribution  # type: ignore[index]
    for synthesize in (True, False):
        store = Store(synthesize_hints=synthesize)
        store.apply("Service", svc)
        store.apply("EndpointSlice", slice_with_hints(None))
        [endpoint] = store.table()[NAME].endpoints
        expected = (zones, nodes) if synthesize else ((), ())
        assert (endpoint.zone_hints, endpoint.node_hints) == expected
    # the controller's own hints are kept as they are
    store = Store(synthesize_hints=True)
    store.apply("Service", svc)
    store.apply("EndpointSlice", slice_with_hints({"forZones": [{"name": "zone-b"}]}))
    [endpoint] = store.table()[NAME].endpoints
    assert (endpoint.zone_hints, endpoint.node_hints) == (("zone-b",), ())


def test_a_node_manifest_gives_the_zone() -> None:
    store = Store()
    assert store.node_zone("n1") is None
    store.apply("Node", {"kind": "Node", "metadata": {
        "name": "n1", "labels": {"topology.kubernetes.io/zone": "zone-a"}}})
    assert store.node_zone("n1") == "zone-a" and store.node_zone("n2") is None

