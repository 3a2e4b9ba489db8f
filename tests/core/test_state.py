"""The Store (uproxy.state): objects in, the desired table out, generations, diffs."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from uproxy.model import ServicePortName
from uproxy.state import Served, Store, diff_tables


def service(name: str = "multi-port", cluster_ip: str = "10.0.0.180",
            ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": cluster_ip, "ports": ports or [
                {"name": "port1", "port": 6789}, {"name": "port2", "port": 9876}]}}


def endpoint_slice(name: str, ips: list[str], service_name: str = "multi-port",
                   ready: bool = True) -> dict[str, Any]:
    return {"kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "ports": [{"name": "port1", "port": 6789}, {"name": "port2", "port": 9876}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip in ips]}


def endpoints(ips: list[str], name: str = "multi-port") -> dict[str, Any]:
    return {"kind": "Endpoints", "metadata": {"name": name, "namespace": "default"},
            "subsets": [{"addresses": [{"ip": ip} for ip in ips],
                         "ports": [{"name": "port2", "port": 9876},
                                   {"name": "port1", "port": 6789}]}]}


PORT1 = ServicePortName("default", "multi-port", "port1", "TCP")
PORT2 = ServicePortName("default", "multi-port", "port2", "TCP")


def ips(store: Store, name: ServicePortName = PORT1) -> list[str]:
    return [str(e) for e in store.table()[name].endpoints]


def test_apply_builds_the_table() -> None:
    store = Store()
    assert store.apply("Service", service(), "svc.yaml") == []
    assert store.apply("EndpointSlice", endpoint_slice("mp-1", ["172.17.0.5", "172.17.0.6"])) == []
    table = store.table()
    assert set(table) == {PORT1, PORT2}
    assert ips(store) == ["172.17.0.5:6789", "172.17.0.6:6789"]
    assert ips(store, PORT2) == ["172.17.0.5:9876", "172.17.0.6:9876"]
    assert table[PORT1].port.cluster_ips == ("10.0.0.180",)


def test_service_without_endpoints_has_an_empty_entry() -> None:
    store = Store()
    store.apply("Service", service())
    assert store.table()[PORT1].endpoints == ()


def test_generation_bumps_only_on_real_changes() -> None:
    store = Store()
    g0 = store.generation
    store.apply("Service", service())
    g1 = store.generation
    assert g1 > g0
    store.apply("Service", copy.deepcopy(service()))  # equal content
    assert store.generation == g1
    store.apply("Service", service(cluster_ip="10.0.0.181"))
    g2 = store.generation
    assert g2 > g1
    assert store.remove("Service", "default", "nothing-here") is False
    assert store.generation == g2
    assert store.remove("Service", "default", "multi-port") is True
    assert store.generation > g2
    assert store.table() == {}


def test_apply_reports_problems_and_unknown_kinds() -> None:
    store = Store()
    bad = service(ports=[{"name": "a", "port": 0}, {"name": "b", "port": 80}])
    (problem,) = store.apply("Service", bad, "bad.yaml")
    assert problem.origin == "bad.yaml" and problem.field == "spec.ports[0].port"
    assert [n.port for n in store.table()] == ["b"]
    (nameless,) = store.apply("Service", {"kind": "Service", "metadata": {}}, "x.yaml")
    assert nameless.field == "metadata.name"
    g = store.generation
    assert store.apply("Deployment", {"metadata": {"name": "d"}}) == []
    assert store.generation == g


def test_endpoint_slices_win_over_endpoints() -> None:
    store = Store()
    store.apply("Service", service())
    store.apply("Endpoints", endpoints(["172.17.0.5", "172.17.0.6"]))
    assert ips(store) == ["172.17.0.5:6789", "172.17.0.6:6789"]
    store.apply("EndpointSlice", endpoint_slice("mp-1", ["172.17.0.9"]))
    assert ips(store) == ["172.17.0.9:6789"]
    store.remove("EndpointSlice", "default", "mp-1")
    assert ips(store) == ["172.17.0.5:6789", "172.17.0.6:6789"]


def test_several_slices_are_merged() -> None:
    store = Store()
    store.apply("Service", service())
    store.apply("EndpointSlice", endpoint_slice("mp-1", ["172.17.0.5"]))
    store.apply("EndpointSlice", endpoint_slice("mp-2", ["172.17.0.6"]))
    store.apply("EndpointSlice", endpoint_slice("other", ["172.17.0.7"], service_name="other"))
    assert ips(store) == ["172.17.0.5:6789", "172.17.0.6:6789"]


def test_table_is_updated_incrementally() -> None:
    store = Store()
    store.apply("Service", service())
    store.apply("Service", service("other"))
    first = store.table()
    assert store.take_changed() == {("default", "multi-port"), ("default", "other")}
    store.apply("Service", service())  # unchanged: nothing recomputed
    assert store.take_changed() == set()
    before = {n: e for n, e in first.items() if n.name == "other"}
    store.apply("EndpointSlice", endpoint_slice("mp-1", ["172.17.0.5"]))
    # Only the service the slice belongs to is recomputed; the table is the same object.
    assert store.take_changed() == {("default", "multi-port")}
    assert store.table() is first
    assert ips(store) == ["172.17.0.5:6789"]
    assert all(first[n] is e for n, e in before.items())
    # A slice moving to another service touches both.
    store.apply("EndpointSlice", endpoint_slice("mp-1", ["172.17.0.5"], service_name="other"))
    assert store.take_changed() == {("default", "multi-port"), ("default", "other")}
    assert ips(store) == []
    store.remove("Service", "default", "other")
    assert store.take_changed() == {("default", "other")}
    assert {n.name for n in store.table()} == {"multi-port"}


def test_replace_removes_what_the_snapshot_lacks() -> None:
    store = Store()
    store.apply("Service", service())
    store.apply("Service", service("gone", "10.0.0.2", [{"port": 80}]))
    store.apply("EndpointSlice", endpoint_slice("mp-1", ["172.17.0.5"]))
    g = store.generation
    problems = store.replace("Service", [(service(), "a.yaml")])
    assert problems == []
    assert store.keys("Service") == {("default", "multi-port")}
    assert store.generation > g
    # Other kinds are untouched.
    assert store.keys("EndpointSlice") == {("default", "mp-1")}
    g = store.generation
    store.replace("Service", [(service(), "a.yaml")])
    assert store.generation == g
    store.replace("EndpointSlice", [])
    assert store.keys("EndpointSlice") == set()
    assert ips(store) == []


def test_replace_reports_problems_with_their_origin() -> None:
    store = Store()
    bad = service("bad", "10.0.0.9", [{"port": 70000}])
    (problem,) = store.replace("Service", [(service(), "a.yaml"), (bad, "b.yaml")])
    assert str(problem).startswith("b.yaml: Service default/bad: spec.ports[0].port")


def test_diff_tables_added_removed_changed() -> None:
    store = Store()
    store.apply("Service", service())
    store.apply("Service", service("old", "10.0.0.3", [{"port": 80}]))
    before = dict(store.table())
    assert not diff_tables(before, before)
    store.remove("Service", "default", "old")
    store.apply("Service", service("new", "10.0.0.4", [{"port": 81}]))
    store.apply("EndpointSlice", endpoint_slice("mp-1", ["172.17.0.5"]))
    after = store.table()
    diff = diff_tables(before, after)
    assert diff
    assert [str(e.port.name) for e in diff.added] == ["default/new:"]
    assert [str(e.port.name) for e in diff.removed] == ["default/old:"]
    assert sorted(str(new.port.name) for _, new in diff.changed) == [
        "default/multi-port:port1", "default/multi-port:port2"]
    for old, new in diff.changed:
        assert old.endpoints == () and len(new.endpoints) == 1


def test_trigger_times_and_raw() -> None:
    store = Store()
    sl = endpoint_slice("mp-1", ["172.17.0.5"])
    sl["metadata"]["annotations"] = {
        "endpoints.kubernetes.io/last-change-trigger-time": "2026-11-21T08:00:00Z"}
    store.apply("EndpointSlice", sl)
    assert store.trigger_times() == ["2026-11-21T08:00:00Z"]
    assert store.raw("EndpointSlice") == {("default", "mp-1"): sl}


# --- properties -------------------------------------------------------------------------------

SERVICE_NAMES = st.sampled_from(["multi-port", "hostnames", "simpleservice"])
OCTETS = st.integers(2, 9)


@st.composite
def objects(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    kind = draw(st.sampled_from(["Service", "EndpointSlice", "Endpoints"]))
    svc = draw(SERVICE_NAMES)
    if kind == "Service":
        return kind, service(svc, f"10.0.0.{draw(OCTETS)}")
    addresses = draw(st.lists(OCTETS.map(lambda o: f"172.17.0.{o}"), max_size=3, unique=True))
    if kind == "Endpoints":
        return kind, endpoints(addresses, name=svc)
    name = f"{svc}-{draw(st.sampled_from('abc'))}"
    return kind, endpoint_slice(name, addresses, service_name=svc, ready=draw(st.booleans()))


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(objects(), max_size=12), st.randoms(use_true_random=False))
def test_table_does_not_depend_on_arrival_order(objs: list[tuple[str, dict[str, Any]]],
                                                rnd: Any) -> None:
    # The last version of each object wins, whatever order different objects arrive in.
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, obj in objs:
        last[(kind, obj["metadata"]["name"])] = obj
    items = list(last.items())
    one, two = Store(), Store()
    for (kind, _), obj in items:
        one.apply(kind, obj)
    rnd.shuffle(items)
    for (kind, _), obj in items:
        two.apply(kind, obj)
    assert one.table() == two.table()


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(objects(), max_size=10), st.lists(objects(), max_size=10))
def test_replace_equals_a_fresh_store(before: list[tuple[str, dict[str, Any]]],
                                      snapshot: list[tuple[str, dict[str, Any]]]) -> None:
    by_kind: dict[str, dict[str, dict[str, Any]]] = {
        "Service": {}, "EndpointSlice": {}, "Endpoints": {}}
    for kind, obj in snapshot:
        by_kind[kind][obj["metadata"]["name"]] = obj
    old, fresh = Store(), Store()
    for kind, obj in before:
        old.apply(kind, obj)
    for kind, objs in by_kind.items():
        old.replace(kind, [(o, "snap") for o in objs.values()])
        fresh.replace(kind, [(o, "snap") for o in objs.values()])
    assert old.table() == fresh.table()
    for kind in by_kind:
        assert old.keys(kind) == fresh.keys(kind)
    g = old.generation
    for kind, objs in by_kind.items():
        old.replace(kind, [(o, "snap") for o in objs.values()])
    assert old.generation == g


# --- Served: the daemon's per-service diff ---------------------------------------------------

def test_served_diffs_only_the_services_that_changed() -> None:
    store, served = Store(), Served()
    store.apply("Service", service())
    store.apply("Service", service("old", "10.0.0.3", [{"port": 80}]))
    first = served.update(store, store.take_changed())
    assert sorted(str(e.port.name) for e in first.added) == [
        "default/multi-port:port1", "default/multi-port:port2", "default/old:"]
    assert not first.removed and not first.changed
    assert served.table == store.table()
    assert not served.update(store, store.take_changed())  # nothing changed, nothing to do

    store.remove("Service", "default", "old")
    store.apply("Service", service("new", "10.0.0.4", [{"port": 81}]))
    store.apply("EndpointSlice", endpoint_slice("mp-1", ["172.17.0.5"]))
    diff = served.update(store, store.take_changed())
    assert [str(e.port.name) for e in diff.added] == ["default/new:"]
    assert [str(e.port.name) for e in diff.removed] == ["default/old:"]
    assert sorted(str(new.port.name) for _, new in diff.changed) == [
        "default/multi-port:port1", "default/multi-port:port2"]
    assert served.table == store.table()


def test_served_follows_a_port_renamed_within_a_service() -> None:
    store, served = Store(), Served()
    store.apply("Service", service())
    served.update(store, store.take_changed())
    store.apply("Service", service(ports=[{"name": "port1", "port": 6789},
                                          {"name": "port3", "port": 9999}]))
    diff = served.update(store, store.take_changed())
    assert [e.port.name.port for e in diff.added] == ["port3"]
    assert [e.port.name.port for e in diff.removed] == ["port2"]
    assert diff.changed == []  # port1 is the same entry
    assert set(served.table) == {PORT1, ServicePortName("default", "multi-port", "port3", "TCP")}


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(st.lists(objects(), max_size=4), max_size=5))
def test_served_updates_equal_the_whole_table_diff(rounds: list[list[tuple[str, Any]]]) -> None:
    """Diffing only the changed services gives the whole-table diff, and the same table."""
    store, served = Store(), Served()
    for objs in rounds:
        before = dict(served.table)
        for kind, obj in objs:
            store.apply(kind, obj)
        diff = served.update(store, store.take_changed())
        whole = diff_tables(before, store.table())
        assert served.table == store.table()
        assert sorted(e.port.name for e in diff.added) == sorted(e.port.name for e in whole.added)
        assert sorted(e.port.name for e in diff.removed) == sorted(
            e.port.name for e in whole.removed)
        assert {new.port.name: (old, new) for old, new in diff.changed} == {
            new.port.name: (old, new) for old, new in whole.changed}
