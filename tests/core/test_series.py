"""The traffic rings (uproxy.series): bounded, wrapping, rates from counters."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uproxy.series import FIELDS, Counters, Ring, Series, increase


def test_ring_keeps_the_last_capacity_values_oldest_first() -> None:
    ring = Ring(3)
    assert ring.values() == [] and ring.last() is None and len(ring) == 0
    for v in (1, 2):
        ring.append(v)
    assert ring.values() == [1, 2]
    for v in (3, 4, 5):
        ring.append(v)
    assert ring.values() == [3, 4, 5] and len(ring) == 3 and ring.last() == 5
    for v in range(6, 1000):  # wraps many times
        ring.append(v)
    assert ring.values() == [997, 998, 999]
    with pytest.raises(ValueError):
        Ring(0)


def test_ring_memory_is_fixed() -> None:
    ring = Ring(900)
    size = sys.getsizeof(ring._data)
    for v in range(10_000):
        ring.append(v)
    assert sys.getsizeof(ring._data) == size and size <= 900 * 8 + 100


def test_increase_follows_prometheus_reset_rule() -> None:
    assert increase(10, 15) == 5
    assert increase(10, 10) == 0
    assert increase(10, 3) == 3  # reset: counted from zero


def test_rates_and_gauges_per_service_port() -> None:
    s = Series(capacity=5)
    s.sample(100.0, {"ns/a:http": Counters(opened=10, bytes_up=1000, bytes_down=50, open=2)})
    s.sample(101.0, {"ns/a:http": Counters(opened=13, bytes_up=1600, bytes_down=50, open=4)})
    s.sample(103.0, {"ns/a:http": Counters(opened=17, bytes_up=1600, bytes_down=250, open=1,
                                           flows=2)})
    doc = s.as_dict()
    (a,) = doc["items"]
    assert doc["times"] == [100.0, 101.0, 103.0]
    # The first sample is the baseline: no rate yet.
    assert a["connections"] == [0, 3, 2]  # per second: +3 in 1 s, +4 in 2 s
    assert a["bytesUp"] == [0, 600, 0]
    assert a["bytesDown"] == [0, 0, 100]
    assert a["open"] == [2, 4, 1] and a["udpFlows"] == [0, 0, 2]
    assert doc["total"]["connections"] == [0, 3, 2]
    assert set(FIELDS) <= set(a)


def test_wrap_around_keeps_times_and_values_aligned() -> None:
    s = Series(capacity=4)
    for i in range(10):
        s.sample(float(i), {"ns/a:p": Counters(opened=i * 2)})
    doc = s.as_dict()
    assert doc["times"] == [6.0, 7.0, 8.0, 9.0]
    assert doc["items"][0]["connections"] == [2, 2, 2, 2]


def test_a_port_that_comes_later_is_lined_up_and_counts_from_zero() -> None:
    s = Series(capacity=10)
    s.sample(0.0, {})
    s.sample(1.0, {})
    s.sample(2.0, {"ns/b:p": Counters(opened=5, open=5)})  # five new connections
    (b,) = s.as_dict()["items"]
    assert b["connections"] == [0, 0, 5] and b["open"] == [0, 0, 5]
    assert s.as_dict()["total"]["connections"] == [0, 0, 5]


def test_a_counter_reset_is_not_a_negative_rate() -> None:
    s = Series(capacity=10)
    s.sample(0.0, {"ns/a:p": Counters(opened=100)})
    s.sample(1.0, {})  # pruned: gone from the readings
    s.sample(2.0, {"ns/a:p": Counters(opened=3)})  # back, counting from zero again
    (a,) = s.as_dict()["items"]
    assert a["connections"] == [0, 0, 3]
    assert s.as_dict()["total"]["connections"] == [0, 0, 3]


def test_bounded_keys_total_counts_all_and_idle_ports_give_way() -> None:
    s = Series(capacity=3, max_keys=2)
    readings = {f"ns/s{i}:p": Counters() for i in range(5)}
    s.sample(0.0, readings)
    readings = {f"ns/s{i}:p": Counters(opened=1) for i in range(5)}
    s.sample(1.0, readings)
    doc = s.as_dict()
    assert len(doc["items"]) == 2 and doc["untracked"] == 3
    assert doc["total"]["connections"] == [0, 5]  # every port, tracked or not
    for t in (2.0, 3.0, 4.0):  # nothing happens for a whole window: places are given up
        s.sample(t, readings)
    assert s.keys() == []
    s.sample(5.0, {"ns/new:p": Counters(opened=4)})
    assert s.keys() == ["ns/new:p"]
    assert s.as_dict()["items"][0]["connections"] == [0, 0, 4]


def test_filter_by_service() -> None:
    s = Series(capacity=3)
    s.sample(0.0, {"ns/a:http": Counters(), "ns/b:dns": Counters(), "other/a:x": Counters()})
    assert [i["service"] for i in s.as_dict("ns/a")["items"]] == ["ns/a:http"]
    assert [i["service"] for i in s.as_dict("a")["items"]] == ["ns/a:http", "other/a:x"]
    assert [i["service"] for i in s.as_dict("ns/b:dns")["items"]] == ["ns/b:dns"]


@given(steps=st.lists(st.tuples(st.integers(0, 1000), st.booleans(),
                                st.floats(0.5, 2.0)), max_size=60),
       capacity=st.integers(1, 20))
def test_rates_add_up_to_the_counter_increases(steps: list[tuple[int, bool, float]],
                                               capacity: int) -> None:
    """Whatever the counters do (grow, reset to zero), the rates are never negative, the
    rings never hold more than capacity, and rate x interval over the kept window adds up
    to the counter's increase in that window (a reset counts from zero)."""
    s = Series(capacity=capacity)
    now, counter = 0.0, 0
    s.sample(now, {"ns/a:p": Counters(opened=counter)})
    increases = [0]
    intervals = [1.0]
    for add, reset, dt in steps:
        # A reset shows only when the counter comes back lower; to the same or a higher
        # value it reads as growth (as for Prometheus).
        before, counter = counter, (add if reset else counter + add)
        now += dt
        s.sample(now, {"ns/a:p": Counters(opened=counter)})
        increases.append(counter - before if counter >= before else counter)
        intervals.append(dt)
    items = s.as_dict()["items"]
    if not items:  # idle for a whole window: the port gave its place up
        assert not any(increases[-capacity:])
        return
    (a,) = items
    kept = len(a["connections"])
    assert kept == min(capacity, len(steps) + 1) == len(s.as_dict()["times"])
    assert all(v >= 0 for v in a["connections"])
    for rate, dt, inc in zip(a["connections"], intervals[-kept:], increases[-kept:],
                             strict=True):
        assert rate * dt == pytest.approx(inc, abs=0.01)


def test_a_port_back_after_giving_its_place_up_does_not_spike() -> None:
    s = Series(capacity=2)
    s.sample(0.0, {"ns/a:p": Counters(opened=100)})
    s.sample(1.0, {"ns/a:p": Counters(opened=100)})
    assert s.keys() == []  # idle for a whole window
    s.sample(2.0, {"ns/a:p": Counters(opened=103)})
    (a,) = s.as_dict()["items"]
    assert a["connections"] == [0, 3]  # its increase, not its whole count
