"""Backend choice (uproxy.balance): conditions, Local policies, spread, ClientIP affinity."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from uproxy.balance import (
    FAILED_AVOID_SECONDS,
    Balancer,
    flow_endpoints,
    serving_addresses,
    usable_endpoints,
)
from uproxy.model import Endpoint, ServicePort, ServicePortName
from uproxy.state import Entry

NAME = ServicePortName("default", "hostnames", "", "TCP")
A = Endpoint("10.244.1.7", 9376, node_name="node-1")
B = Endpoint("10.244.2.3", 9376, node_name="node-2")
C = Endpoint("10.244.3.6", 9376, node_name="node-3")


def entry(*endpoints: Endpoint, affinity: int | None = None, internal_local: bool = False,
          external_local: bool = False) -> Entry:
    port = ServicePort(name=NAME, type="NodePort", cluster_ips=("10.0.1.175",), port=80,
                       protocol="TCP", target_port=9376, node_port=30080,
                       affinity_timeout=affinity, internal_local=internal_local,
                       external_local=external_local)
    return Entry(port, tuple(endpoints))


def not_ready(e: Endpoint, *, serving: bool, terminating: bool) -> Endpoint:
    return replace(e, ready=False, serving=serving, terminating=terminating)


# --- usable_endpoints -------------------------------------------------------------------------


def test_ready_endpoints_are_used_first() -> None:
    term = not_ready(C, serving=True, terminating=True)
    e = entry(A, B, term)
    assert usable_endpoints(e, external=False, node_name="node-1") == (A, B)


def test_fallback_to_serving_terminating_when_none_ready() -> None:
    term = not_ready(A, serving=True, terminating=True)
    not_serving = not_ready(B, serving=False, terminating=True)
    starting = not_ready(C, serving=False, terminating=False)
    e = entry(term, not_serving, starting)
    assert usable_endpoints(e, external=False, node_name="node-1") == (term,)


def test_nothing_usable() -> None:
    e = entry(not_ready(A, serving=False, terminating=False),
              not_ready(B, serving=False, terminating=True))
    assert usable_endpoints(e, external=False, node_name="node-1") == ()
    assert Balancer(node_name="node-1").choose(e, "10.1.1.1", 0.0) is None
    assert usable_endpoints(entry(), external=False, node_name="node-1") == ()


def test_internal_local_applies_to_cluster_traffic_only() -> None:
    e = entry(A, B, C, internal_local=True)
    assert usable_endpoints(e, external=False, node_name="node-2") == (B,)
    assert usable_endpoints(e, external=True, node_name="node-2") == (A, B, C)
    assert usable_endpoints(e, external=False, node_name="elsewhere") == ()


def test_external_local_applies_to_external_traffic_only() -> None:
    e = entry(A, B, C, external_local=True)
    assert usable_endpoints(e, external=True, node_name="node-3") == (C,)
    assert usable_endpoints(e, external=False, node_name="node-3") == (A, B, C)
    bal = Balancer(node_name="node-3", rng=random.Random(1))
    assert {bal.choose(e, f"10.9.0.{i}", 0.0, external=True) for i in range(50)} == {C}


def test_local_fallback_to_terminating_on_this_node() -> None:
    term_local = not_ready(A, serving=True, terminating=True)
    e = entry(term_local, B, internal_local=True)
    assert usable_endpoints(e, external=False, node_name="node-1") == (term_local,)


# Every combination of conditions for one endpoint X, with and without a ready peer: X is
# usable iff it is ready, or it is serving and terminating and no ready endpoint is left.
# (ready, serving, terminating) -> usable beside a ready peer, usable alone
CONDITIONS = [
    ((True, True, False), True, True),  # ready
    ((True, True, True), True, True),  # ready and terminating (not what k8s sends): ready wins
    ((False, True, True), False, True),  # terminating but serving: only as the fallback
    ((False, False, True), False, False),  # terminating, not serving
    ((False, True, False), False, False),  # serving, not ready, not terminating: never
    ((False, False, False), False, False),  # starting
]


@pytest.mark.parametrize(("conditions", "beside_ready", "alone"), CONDITIONS,
                         ids=["ready", "ready-terminating", "serving-terminating",
                              "terminating", "serving-only", "starting"])
def test_conditions_table(conditions: tuple[bool, bool, bool], beside_ready: bool,
                          alone: bool) -> None:
    ready, serving, terminating = conditions
    x = replace(C, ready=ready, serving=serving, terminating=terminating)
    with_peer = usable_endpoints(entry(A, x), external=False, node_name="node-1")
    assert (x in with_peer) is beside_ready and A in with_peer
    assert (x in usable_endpoints(entry(x), external=False, node_name="node-1")) is alone
    # existing flows (and the addresses conntrack clean-up keeps) stay while x serves
    keeps = ready or serving
    assert (x in flow_endpoints(entry(A, x), external=False, node_name="node-1")) is keeps
    udp = replace(entry(A, x), port=replace(entry().port, protocol="UDP"))
    assert (x.address in serving_addresses([udp], node_name="node-1")) is keeps


def test_local_policy_decides_which_ready_endpoints_count() -> None:
    """A ready endpoint on another node does not count under a Local policy: a terminating
    endpoint on this node is then the fallback for that scope only."""
    term_here = not_ready(A, serving=True, terminating=True)  # node-1
    e = entry(term_here, B, internal_local=True)  # B ready on node-2
    assert usable_endpoints(e, external=False, node_name="node-1") == (term_here,)
    assert usable_endpoints(e, external=True, node_name="node-1") == (B,)
    e = entry(term_here, B, external_local=True)
    assert usable_endpoints(e, external=False, node_name="node-1") == (B,)
    assert usable_endpoints(e, external=True, node_name="node-1") == (term_here,)
    both = entry(term_here, B, internal_local=True, external_local=True)
    assert usable_endpoints(both, external=True, node_name="node-2") == (B,)
    assert usable_endpoints(both, external=True, node_name="node-3") == ()


def udp_entry(*endpoints: Endpoint, node_port: int | None = None,
              internal_local: bool = False) -> Entry:
    port = ServicePort(name=replace(NAME, protocol="UDP"), type="ClusterIP",
                       cluster_ips=("10.0.0.10",), port=53, protocol="UDP", target_port=53,
                       node_port=node_port, internal_local=internal_local)
    return Entry(port, tuple(endpoints))


def test_serving_addresses_over_every_scope_a_port_has() -> None:
    # ClusterIP only, internal Local: only this node's endpoint may ever be sent to
    assert serving_addresses([udp_entry(A, B, internal_local=True)],
                             node_name="node-1") == {A.address}
    # with a NodePort the external scope (no Local policy) reaches B too
    assert serving_addresses([udp_entry(A, B, node_port=30053, internal_local=True)],
                             node_name="node-1") == {A.address, B.address}
    # one endpoint in two services: serving while either may use it
    term_c = not_ready(C, serving=True, terminating=True)
    assert serving_addresses([udp_entry(A, term_c), udp_entry(term_c)],
                             node_name="node-1") == {A.address, C.address}
    # other protocols are not looked at
    assert serving_addresses([entry(A)], node_name="node-1") == set()
    assert serving_addresses([entry(A)], node_name="node-1", protocol="TCP") == {A.address}


# --- random spread ----------------------------------------------------------------------------


def test_random_spread_passes_a_chi_square_test() -> None:
    bal = Balancer(node_name="node-1", rng=random.Random(20261121))
    e = entry(A, B, C)
    n = 3000
    counts = Counter(bal.choose(e, "10.9.9.9", float(i)) for i in range(n))
    assert set(counts) == {A, B, C}
    expected = n / 3
    chi2 = sum((counts[x] - expected) ** 2 / expected for x in (A, B, C))
    assert chi2 < 13.816, (chi2, counts)  # p = 0.001, df = 2


def test_chi_square_statistic_catches_a_biased_choice() -> None:
    # The same statistic rejects a 50/30/20 split: the test above can fail.
    counts = {"a": 1500, "b": 900, "c": 600}
    chi2 = sum((c - 1000) ** 2 / 1000 for c in counts.values())
    assert chi2 > 13.816


# --- ClientIP affinity ------------------------------------------------------------------------


def test_affinity_sticks_for_one_client() -> None:
    bal = Balancer(node_name="n", rng=random.Random(3))
    e = entry(A, B, C, affinity=60)
    first = bal.choose(e, "10.1.1.1", 100.0)
    assert first is not None
    assert {bal.choose(e, "10.1.1.1", 100.0 + i) for i in range(50)} == {first}
    assert bal.affinity_count() == 1


def test_affinity_spreads_across_clients() -> None:
    bal = Balancer(node_name="n", rng=random.Random(4))
    e = entry(A, B, C, affinity=60)
    chosen = {bal.choose(e, f"10.1.{i // 250}.{i % 250}", 0.0) for i in range(300)}
    assert chosen == {A, B, C}
    assert bal.affinity_count() == 300


def test_affinity_expires_after_the_timeout_unused() -> None:
    e = entry(A, B, C, affinity=10)
    changed = 0
    for seed in range(40):
        bal = Balancer(node_name="n", rng=random.Random(seed))
        first = bal.choose(e, "10.1.1.1", 0.0)
        # Used within the timeout: refreshed, so it survives well past 10 s in total.
        assert bal.choose(e, "10.1.1.1", 9.0) == first
        assert bal.choose(e, "10.1.1.1", 18.0) == first
        # Unused for longer than the timeout: a fresh random choice.
        later = bal.choose(e, "10.1.1.1", 18.0 + 10.5)
        changed += later != first
    # With 3 endpoints a fresh choice differs 2/3 of the time; pinning would give 0.
    assert changed >= 10


def test_affinity_dropped_when_its_endpoint_goes_away() -> None:
    bal = Balancer(node_name="n", rng=random.Random(5))
    e = entry(A, B, C, affinity=60)
    first = bal.choose(e, "10.1.1.1", 0.0)
    assert first is not None
    rest = tuple(x for x in (A, B, C) if x != first)
    shrunk = entry(*rest, affinity=60)
    moved = bal.choose(shrunk, "10.1.1.1", 1.0)
    assert moved in rest
    # The new pin holds even when the old endpoint comes back.
    assert bal.choose(e, "10.1.1.1", 2.0) == moved


def test_prune_forgets_stale_pins() -> None:
    bal = Balancer(node_name="n", rng=random.Random(6))
    e = entry(A, B, C, affinity=10)
    bal.choose(e, "10.1.1.1", 0.0)
    bal.choose(e, "10.1.1.2", 8.0)
    bal.prune({NAME: e}, 15.0)
    assert bal.affinity_count() == 1
    bal.prune({}, 15.0)
    assert bal.affinity_count() == 0


def test_no_affinity_no_pins() -> None:
    bal = Balancer(node_name="n", rng=random.Random(7))
    e = entry(A, B, C)
    assert len({bal.choose(e, "10.1.1.1", 0.0) for _ in range(60)}) == 3
    assert bal.affinity_count() == 0


# --- failures and exclusion -------------------------------------------------------------------


def test_connect_failed_avoids_the_endpoint_for_a_while() -> None:
    bal = Balancer(node_name="n", rng=random.Random(8))
    e = entry(A, B, C)
    bal.connect_failed(A, now=100.0)
    during = {bal.choose(e, "10.1.1.1", 100.0 + i * FAILED_AVOID_SECONDS / 100) for i in range(100)}
    assert A not in during and during == {B, C}
    after = {bal.choose(e, "10.1.1.1", 100.0 + FAILED_AVOID_SECONDS + 0.1) for _ in range(100)}
    assert A in after


def test_failed_endpoint_used_when_nothing_else() -> None:
    bal = Balancer(node_name="n", rng=random.Random(9))
    bal.connect_failed(A, now=0.0)
    assert bal.choose(entry(A), "10.1.1.1", 1.0) == A


def test_connect_succeeded_clears_the_avoidance() -> None:
    bal = Balancer(node_name="n", rng=random.Random(10))
    e = entry(A, B)
    bal.connect_failed(A, now=0.0)
    bal.connect_succeeded(A)
    assert A in {bal.choose(e, "10.1.1.1", 1.0) for _ in range(60)}


def test_connect_failed_drops_the_affinity_pin() -> None:
    bal = Balancer(node_name="n", rng=random.Random(11))
    e = entry(A, B, C, affinity=60)
    first = bal.choose(e, "10.1.1.1", 0.0)
    assert first is not None
    bal.connect_failed(first, 1.0, e, "10.1.1.1")
    assert bal.affinity_count() == 0
    assert bal.choose(e, "10.1.1.1", 2.0) != first


def test_exclude() -> None:
    bal = Balancer(node_name="n", rng=random.Random(12))
    e = entry(A, B, C)
    assert {bal.choose(e, "10.1.1.1", 0.0, exclude=(A, B)) for _ in range(30)} == {C}
    assert bal.choose(e, "10.1.1.1", 0.0, exclude=(A, B, C)) is None
    pinned = entry(A, B, C, affinity=60)
    first = bal.choose(pinned, "10.2.2.2", 0.0)
    assert first is not None
    assert bal.choose(pinned, "10.2.2.2", 1.0, exclude=(first,)) != first
