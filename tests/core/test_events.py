"""The event log (uproxy.events): bounded, coalescing, built from table diffs and log records."""

from __future__ import annotations

import logging

from uproxy.events import BULK, RULES_REPAIRED, EventLog
from uproxy.model import Endpoint, ServicePort, ServicePortName
from uproxy.state import Entry, TableDiff

NAME = ServicePortName("default", "echo", "http", "TCP")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def entry(*eps: Endpoint, name: ServicePortName = NAME, port: int = 80) -> Entry:
    return Entry(ServicePort(name, "ClusterIP", ("10.96.0.1",), port, name.protocol, 8080), eps)


A, B = Endpoint("10.0.0.1", 8080), Endpoint("10.0.0.2", 8080)


def test_bounded_and_ordered_with_since_and_limit() -> None:
    log = EventLog(capacity=3, clock=Clock())
    for i in range(5):
        log.add("Test", f"obj{i}", "msg")
    assert len(log) == 3
    assert [e.object for e in log.items()] == ["obj2", "obj3", "obj4"]
    assert [e.object for e in log.items(since=4)] == ["obj4"]
    assert [e.object for e in log.items(limit=2)] == ["obj3", "obj4"]
    assert log.last_seq == 5 and [e.seq for e in log.items()] == [3, 4, 5]
    assert [e.time for e in log.items()] == [1003.0, 1004.0, 1005.0]


def test_the_same_event_again_is_counted() -> None:
    log = EventLog(clock=Clock())
    log.add("Warning", "Service a/b:c", "port in use", "warning")
    log.add("Other", "x", "y")
    again = log.add("Warning", "Service a/b:c", "port in use", "warning")
    assert len(log) == 2 and again.count == 2
    assert [e.kind for e in log.items()] == ["Other", "Warning"]  # moved to the end
    d = again.as_dict()
    assert d["firstTime"] == 1001.0 and d["time"] == 1003.0 and d["seq"] == 3
    assert log.items(since=2) == [again]


def test_table_diff_events() -> None:
    log = EventLog(clock=Clock())
    other = ServicePortName("default", "dns", "dns", "UDP")
    log.table_changed(TableDiff(added=[entry(A, B)], removed=[entry(name=other)]))
    ready_b = Endpoint("10.0.0.2", 8080, ready=False, serving=True, terminating=True)
    c = Endpoint("10.0.0.3", 8080)
    log.table_changed(TableDiff(changed=[(entry(A, B), entry(ready_b, c, port=81))]))
    got = [(e.kind, e.object, e.message) for e in log.items()]
    assert got == [
        ("ServiceAdded", "Service default/echo:http", "2 endpoints: 10.0.0.1:8080,10.0.0.2:8080"),
        ("ServiceRemoved", "Service default/dns:dns", "no longer proxied"),
        ("ServiceChanged", "Service default/echo:http", "service spec changed"),
        ("EndpointChanged", "Endpoint 10.0.0.2:8080 of default/echo:http",
         "ready,serving -> serving,terminating"),
        ("EndpointAdded", "Endpoint 10.0.0.3:8080 of default/echo:http", "ready,serving"),
        ("EndpointRemoved", "Endpoint 10.0.0.1:8080 of default/echo:http", "removed"),
    ]


def test_a_big_diff_is_one_event() -> None:
    log = EventLog()
    names = [ServicePortName("ns", f"s{i}", "p", "TCP") for i in range(BULK + 1)]
    log.table_changed(TableDiff(added=[entry(A, name=n) for n in names]))
    (event,) = log.items()
    assert event.kind == "ServicesChanged" and event.message.startswith(f"+{BULK + 1} -0 ~0")


def test_sync_events_only_when_something_changed_or_slow() -> None:
    log = EventLog()
    log.synced(TableDiff(), 0.01, 5)
    assert len(log) == 0
    log.synced(TableDiff(added=[entry(A)]), 0.0042, 5)
    log.synced(TableDiff(), 2.5, 5)
    assert [(e.kind, e.message, e.level) for e in log.items()] == [
        ("Synced", "+1 -0 ~0 in 4.2 ms", "info"), ("Synced", "+0 -0 ~0 in 2500.0 ms", "warning")]


def test_warnings_and_errors_logged_become_events() -> None:
    log = EventLog()
    logger = logging.getLogger("uproxy.test-events")
    logger.addHandler(log.handler)
    try:
        logger.info("not an event")
        logger.warning("Service %s/%s: port %s: cannot listen on %s: %s", "web", "site", "443",
                       "0.0.0.0:30080", "Address already in use")
        logger.error("applying rules: %s", "iptables-restore: exit 4")
        logger.warning("re-inserted %d uproxy hooks someone removed", 2, extra=RULES_REPAIRED)
        log.takeover("uproxy pid 42", "took over 3 listeners")
    finally:
        logger.removeHandler(log.handler)
    got = [(e.kind, e.object, e.level) for e in log.items()]
    assert got == [("Warning", "Service web/site", "warning"),
                   ("Error", "uproxy.test-events", "error"),
                   ("RulesRepaired", "iptables nat hooks", "warning"),
                   ("Takeover", "uproxy pid 42", "info")]
    assert "Address already in use" in log.items()[0].message
