"""Pure parts of the status server: kubectl formatting, views, and the stream's batching."""

from __future__ import annotations

import json

import pytest

from uproxy.connections import Conn, ConnTable
from uproxy.model import ServicePortName
from uproxy.state import Store
from uproxy.status.client import format_table, human_bytes, human_duration
from uproxy.status.stream import ConnHub, Watcher
from uproxy.status.views import (
    FirstSeen,
    endpoints_column,
    format_timestamp,
    matches,
    parse_timestamp,
)

ECHO = ServicePortName("default", "echo", "tcp")
OTHER = ServicePortName("web", "site", "")


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "<unknown>"), (-5, "<invalid>"), (-0.5, "0s"), (0, "0s"), (9, "9s"), (119, "119s"),
    (123, "2m3s"), (409, "6m49s"), (540, "9m"), (660, "11m"), (179 * 60, "179m"),
    (3 * 3600, "3h"), (3 * 3600 + 120, "3h2m"), (20 * 3600, "20h"), (50 * 3600, "2d2h"),
    (72 * 3600, "3d"), (30 * 86400, "30d"), (800 * 86400, "2y70d"), (9 * 365 * 86400, "9y"),
])
def test_kubectl_ages(seconds: float | None, text: str) -> None:
    assert human_duration(seconds) == text


@pytest.mark.parametrize(("n", "text"), [(0, "0"), (1023, "1023"), (1024, "1.0Ki"),
                                         (3000, "2.9Ki"), (5 * 1024**2, "5.0Mi"),
                                         (3 * 1024**4, "3.0Ti"), (5000 * 1024**4, "5000.0Ti")])
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


def test_table_columns_are_padded_like_kubectl() -> None:
    text = format_table(["NAME", "TYPE", "AGE"], [["kubernetes", "ClusterIP", "1h"],
                                                 ["multi-port", "NodePort", "9s"]])
    assert text == ("NAME         TYPE        AGE\n"
                    "kubernetes   ClusterIP   1h\n"
                    "multi-port   NodePort    9s\n")


def test_endpoints_column() -> None:
    four = ["172.17.0.5:9876", "172.17.0.6:9876", "172.17.0.5:6789", "172.17.0.6:6789"]
    assert endpoints_column(four) == "172.17.0.5:9876,172.17.0.6:9876,172.17.0.5:6789 + 1 more..."
    assert endpoints_column(four[:3]) == ",".join(four[:3])
    assert endpoints_column(four, limit=None) == ",".join(four)
    assert endpoints_column([]) == "<none>"


def test_timestamps_round_trip() -> None:
    assert format_timestamp(None) == "0001-01-01T00:00:00Z"
    assert format_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert parse_timestamp("2026-01-02T03:04:05Z") == parse_timestamp(
        format_timestamp(parse_timestamp("2026-01-02T03:04:05Z")))
    assert parse_timestamp("yesterday") is None and parse_timestamp(None) is None


def test_filter_matches_port_service_or_name() -> None:
    assert all(matches(ECHO, w) for w in ("", "default/echo:tcp", "default/echo", "echo"))
    assert not any(matches(ECHO, w) for w in ("default/echo:alt", "web/echo", "ech"))


def test_first_seen_follows_the_store() -> None:
    store, seen = Store(), FirstSeen()
    svc = {"kind": "Service", "metadata": {"name": "a", "namespace": "default"},
           "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}}
    store.apply("Service", svc)
    seen.observe(store, 100.0)
    seen.observe(store, 200.0)  # unchanged: keeps the first time
    assert seen.get("Service", ("default", "a")) == 100.0
    store.remove("Service", "default", "a")
    seen.observe(store, 300.0)
    store.apply("Service", svc)
    seen.observe(store, 400.0)  # deleted and created again: a new object
    assert seen.get("Service", ("default", "a")) == 400.0


# --- the stream hub, over a real connection table (no relay: rows without bytes) ----------
def events(watcher: Watcher) -> list[tuple[str, dict[str, object]]]:
    out = []
    while not watcher.queue.empty():
        message = watcher.queue.get_nowait()
        assert message is not None
        kind, data = message.split("\n")[:2]
        out.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def test_hub_batches_and_coalesces() -> None:
    conns = ConnTable()
    now = [1000.0]
    hub = ConnHub(conns, snapshot_interval=1.0, clock=lambda: now[0])
    hub.start()
    try:
        watcher = hub.add(service="default/echo", limit=3)
        hub.flush()
        ((kind, snap),) = events(watcher)
        assert kind == "snapshot" and snap["items"] == [] and snap["total"] == 0

        a = conns.open(protocol="TCP", service=ECHO, client=("127.0.0.1", 1001), scope="cluster")
        conns.established(a, ("10.1.0.1", 80), None)
        b = conns.open(protocol="TCP", service=ECHO, client=("127.0.0.1", 1002), scope="cluster")
        conns.close(b)  # opened and closed within one interval: never sent
        conns.open(protocol="TCP", service=OTHER, client=("127.0.0.1", 1003), scope="cluster")
        hub.flush()
        ((kind, batch),) = events(watcher)
        assert kind == "batch"
        assert [r["client"] for r in batch["opened"]] == ["127.0.0.1:1001"]  # filter: echo only
        assert batch["opened"][0]["state"] == "open" and batch["closed"] == []

        hub.flush()
        assert events(watcher) == []  # nothing happened: nothing sent

        # Limit: at most 3 rows; the fourth echo connection is only counted.
        more = [conns.open(protocol="TCP", service=ECHO, client=("127.0.0.1", 2000 + i),
                           scope="cluster") for i in range(3)]
        hub.flush()
        ((_, batch),) = events(watcher)
        assert len(batch["opened"]) == 2 and len(watcher.visible) == 3

        conns.close(a)
        conns.close(more[2])  # not visible to this watcher: not sent
        hub.flush()
        ((_, batch),) = events(watcher)
        assert batch["closed"] == [a.id] and batch["opened"] == []

        now[0] += 1.5  # a snapshot is due: rows, counts of the whole table
        hub.flush()
        ((kind, snap),) = events(watcher)
        assert kind == "snapshot" and snap["total"] == 3 and snap["matched"] == 2
        assert snap["counts"] == {"default/echo:tcp": 2, "web/site:": 1}
        assert [r["id"] for r in snap["items"]] == [more[0].id, more[1].id]
    finally:
        await hub.close()
    assert hub._on_event not in conns.subscribers
    assert hub._on_event not in conns.brief_blind


def test_only_subscribers_that_must_hear_of_every_connection_make_the_table_see_brief_ones(
        ) -> None:
    """The hub never sends a connection that opened and closed between two flushes, so it
    does not make the relays give such connections entries; any other subscriber does."""
    conns = ConnTable()
    assert not conns.sees_brief()
    hub = ConnHub(conns)
    watcher = hub.add()
    assert hub._on_event in conns.subscribers and not conns.sees_brief()

    def other(event: str, conn: Conn) -> None:
        pass

    conns.subscribers.add(other)
    assert conns.sees_brief()
    conns.subscribers.discard(other)
    hub.remove(watcher)
    assert not conns.subscribers and not conns.brief_blind and not conns.sees_brief()


async def test_slow_watcher_gets_a_snapshot_instead_of_a_backlog() -> None:
    conns = ConnTable()
    hub = ConnHub(conns, snapshot_interval=3600, clock=lambda: 1000.0)
    watcher = hub.add(limit=100_000)
    assert watcher.limit == 5000  # bounded
    hub.start()
    try:
        hub.flush()  # the first snapshot
        for i in range(200):  # nobody reads the queue
            conns.open(protocol="TCP", service=ECHO, client=("127.0.0.1", i), scope="cluster")
            hub.flush()
        assert watcher.queue.full() and watcher.dropped > 0
        assert watcher.next_snapshot == 0.0
        while not watcher.queue.empty():
            watcher.queue.get_nowait()
        hub.flush()
        ((kind, snap),) = events(watcher)
        assert kind == "snapshot" and snap["total"] == 200 and len(snap["items"]) == 200
    finally:
        await hub.close()
    assert watcher.queue.get_nowait() is None  # the stream was told to end


async def test_no_watchers_no_work() -> None:
    conns = ConnTable()
    hub = ConnHub(conns)
    hub.start()
    try:
        conns.open(protocol="TCP", service=ECHO, client=("127.0.0.1", 1), scope="cluster")
        assert not hub._opened  # nothing recorded while no one watches
    finally:
        await hub.close()


async def test_ten_thousand_connections_stay_bounded() -> None:
    conns = ConnTable()
    now = [1000.0]
    hub = ConnHub(conns, clock=lambda: now[0])
    hub.start()
    try:
        watcher = hub.add(limit=200)
        names = [ServicePortName("default", f"svc{i}", "http") for i in range(10)]
        for i in range(10_000):
            conns.open(protocol="TCP", service=names[i % 10], client=("127.0.0.1", i),
                       scope="cluster")
        hub.flush()  # a snapshot: 200 rows and the counts of all 10,000
        ((kind, snap),) = events(watcher)
        assert kind == "snapshot" and snap["total"] == 10_000 and len(snap["items"]) == 200
        assert snap["counts"] == {str(n): 1000 for n in names}
        # A burst of 10,000 opens and closes is one batch, with rows only for what is shown.
        for conn in list(conns):
            conns.close(conn)
        for i in range(10_000):
            conns.open(protocol="TCP", service=names[0], client=("127.0.0.1", i),
                       scope="cluster")
        hub.flush()
        ((kind, batch),) = events(watcher)
        assert kind == "batch" and len(batch["closed"]) == 200
        assert len(batch["opened"]) == 200 and len(watcher.visible) == 200  # refilled, no more
        hub.flush()  # nothing new happened: nothing sent
        assert events(watcher) == []
        now[0] += 2
        hub.flush()
        ((kind, snap),) = events(watcher)
        assert len(snap["items"]) == 200 and snap["counts"] == {str(names[0]): 10_000}
    finally:
        await hub.close()
