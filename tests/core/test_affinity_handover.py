"""ClientIP affinity across a takeover (uproxy.balance export/import): pins keep their endpoint."""

from __future__ import annotations

import random

from tests.core.test_balance import A, B, C, entry
from uproxy.balance import Balancer


def test_an_affine_client_keeps_its_endpoint_in_the_new_process() -> None:
    e = entry(A, B, C, affinity=60)
    old = Balancer(node_name="n", rng=random.Random(1))
    chosen = {f"10.1.0.{i}": old.choose(e, f"10.1.0.{i}", 100.0) for i in range(30)}
    pins = old.export_affinity(110.0)
    assert len(pins) == 30 and all(idle == 10.0 for *_, idle in pins)
    new = Balancer(node_name="n", rng=random.Random(2))  # another rng: only the pins decide
    new.import_affinity(pins, 5000.0)  # another clock: idle times travel, not stamps
    assert new.affinity_count() == 30
    for client, endpoint in chosen.items():
        assert new.choose(e, client, 5001.0) == endpoint
    # ... and the pins live on there (exported again in a second takeover).
    assert {p[:3] for p in new.export_affinity(5002.0)} == {p[:3] for p in pins}


def test_an_imported_pin_to_a_gone_endpoint_or_past_its_timeout_is_dropped() -> None:
    e = entry(A, B, C, affinity=60)
    old = Balancer(node_name="n")
    old.choose(e, "10.1.0.1", 0.0)
    pin = old.export_affinity(0.0)[0]
    gone = (pin[0], pin[1], ("10.9.9.9", 80), 0.0)
    new = Balancer(node_name="n")
    new.import_affinity([gone], 0.0)
    assert new.choose(e, "10.1.0.1", 1.0) in (A, B, C)
    new = Balancer(node_name="n")
    new.import_affinity([(pin[0], "10.1.0.2", pin[2], 59.0)], 0.0)
    new.prune({e.port.name: e}, 2.0)  # 61 s idle
    assert new.affinity_count() == 0
