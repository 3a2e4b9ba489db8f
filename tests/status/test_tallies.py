"""The connection table's running totals per service port and per endpoint (no sockets needed:
the table is plain bookkeeping fed by the data path's open/established/close events)."""

from __future__ import annotations

from dataclasses import dataclass

from uproxy.connections import ConnTable, Tally
from uproxy.model import Endpoint, ServicePort, ServicePortName
from uproxy.state import Entry

SVC = ServicePortName("default", "echo", "tcp", "TCP")
DNS = ServicePortName("kube-system", "dns", "dns", "UDP")
A, B = ("10.0.0.1", 80), ("10.0.0.2", 80)


@dataclass
class Handle:
    bytes_up: int = 0
    bytes_down: int = 0
    native: bool = False


def test_tcp_connections_counted_per_endpoint_and_service() -> None:
    table = ConnTable()
    conns = [table.open(protocol="TCP", service=SVC, client=("10.1.0.1", 4000 + i),
                        scope="cluster") for i in range(3)]
    assert table.services[SVC].open == 3 and table.services[SVC].opened == 3
    assert table.endpoints == {}  # none established yet
    handles = [Handle(), Handle()]
    table.established(conns[0], A, handles[0])
    table.established(conns[1], A, handles[1])
    table.connect_failed(SVC, B)
    table.established(conns[2], B, None)
    assert table.endpoints[(SVC, A)] == Tally(opened=2, open=2)
    assert table.endpoints[(SVC, B)] == Tally(opened=1, open=1, failed=1)
    assert table.services[SVC].failed == 1

    handles[0].bytes_up, handles[0].bytes_down = 10, 20
    handles[1].bytes_up = 5
    assert table.live_bytes() == {(SVC, A): (15, 20)}  # B's handle is None: nothing live

    table.close(conns[0], bytes_up=10, bytes_down=20)
    table.close(conns[0], bytes_up=10, bytes_down=20)  # a second close changes nothing
    assert table.endpoints[(SVC, A)] == Tally(opened=2, open=1, bytes_up=10, bytes_down=20)
    assert table.services[SVC].as_dict() == Tally(opened=3, open=2, failed=1, bytes_up=10,
                                                  bytes_down=20).as_dict()
    assert table.live_bytes() == {(SVC, A): (5, 0)}


def test_a_connection_that_never_connected_counts_for_the_service_only() -> None:
    table = ConnTable()
    conn = table.open(protocol="TCP", service=SVC, client=("10.1.0.1", 1), scope="cluster")
    table.connect_failed(SVC, A)
    table.close(conn, error="all endpoints failed")
    assert table.services[SVC].as_dict() == Tally(opened=1, open=0, failed=1).as_dict()
    assert table.endpoints == {(SVC, A): Tally(failed=1)}


def test_udp_flows_counted_apart_from_connections() -> None:
    table = ConnTable()
    flow = table.open(protocol="UDP", service=DNS, client=("10.1.0.1", 53000), scope="cluster")
    table.established(flow, A, Handle(3, 4))
    assert table.endpoints[(DNS, A)] == Tally(flows=1, flows_opened=1)
    assert table.services[DNS].as_dict() == Tally(flows=1, flows_opened=1).as_dict()
    table.close(flow, bytes_up=3, bytes_down=4)
    assert table.endpoints[(DNS, A)] == Tally(flows_opened=1, bytes_up=3, bytes_down=4)
    assert table.endpoints[(DNS, A)].as_dict()["udpFlowsOpened"] == 1


def test_prune_forgets_what_is_gone_once_idle() -> None:
    table = ConnTable()
    busy = table.open(protocol="TCP", service=SVC, client=("10.1.0.1", 1), scope="cluster")
    table.established(busy, A, None)
    done = table.open(protocol="TCP", service=SVC, client=("10.1.0.1", 2), scope="cluster")
    table.established(done, B, None)
    table.close(done)
    port = ServicePort(SVC, "ClusterIP", ("10.96.0.1",), 80, "TCP", 80)
    served = {SVC: Entry(port, (Endpoint(*A),))}
    table.prune(served)  # B is no longer an endpoint and has nothing open
    assert set(table.endpoints) == {(SVC, A)}
    table.prune({})  # the service is gone, but A still has an open connection
    assert set(table.endpoints) == {(SVC, A)} and SVC in table.services
    table.close(busy)
    table.prune({})
    assert table.endpoints == {} and table.services == {}


def test_opened_and_closed_adds_what_open_established_and_close_would() -> None:
    """The engine's connections that end within one batch skip the entry, not the counts."""
    name = ServicePortName("ns", "svc", "http")
    backend = ("10.1.0.1", 8080)
    one_by_one, at_once = ConnTable(), ConnTable()
    for up, down in ((3, 10), (0, 7), (5, 0)):
        conn = one_by_one.open(protocol="TCP", service=name, client=("10.0.0.9", 40000),
                               scope="cluster")
        one_by_one.established(conn, backend, None)
        one_by_one.close(conn, bytes_up=up, bytes_down=down, error=None)
    at_once.opened_and_closed(name, backend, 3, bytes_up=8, bytes_down=17)
    assert at_once.services == one_by_one.services
    assert at_once.endpoints == one_by_one.endpoints
    assert len(at_once) == len(one_by_one) == 0
    nxt = [t.open(protocol="TCP", service=name, client=("10.0.0.9", 1), scope="cluster").id
           for t in (one_by_one, at_once)]
    assert nxt == [4, 4]
