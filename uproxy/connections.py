"""The live connection table: what the status page and ``uproxy get connections`` show.

O(1) per connection: an entry is added when a client is accepted and removed
when its relay is done. Byte counts are not copied here per chunk; each entry
keeps a reference to its relay handle and reads the counters on demand.
Subscribers (the status server's live stream) get ``("open"|"update"|"close",
conn)`` callbacks.

The table also keeps running totals per service port and per endpoint
(:class:`Tally`): opened, open now, failed connects, bytes of closed
connections, UDP flows. They change only at the events the data path already
reports (open, established, close, a failed connect): a dict lookup and a few
integer adds, no locks, nothing per byte. Bytes of connections still open are
read live from their relay handles by :meth:`ConnTable.live_bytes`. Tallies of
endpoints and service ports that are gone are dropped by :meth:`ConnTable.prune`
once nothing of theirs is open.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from uproxy.model import ServicePortName
from uproxy.state import Entry

Subscriber = Callable[[str, "Conn"], None]
Address = tuple[str, int]
EndpointKey = tuple[ServicePortName, Address]


class ByteCounts(Protocol):
    """What a connection reads of its relay's handle (``uproxy.proxy.relay.RelayHandle``)."""

    @property
    def bytes_up(self) -> int: ...
    @property
    def bytes_down(self) -> int: ...
    @property
    def native(self) -> bool: ...


@dataclass(slots=True)
class Tally:
    """Running totals of one service port or one (service port, endpoint).

    ``opened`` counts TCP connections and UDP flows; ``open`` is TCP connections
    open now, ``flows`` UDP flows held now (``flows_opened`` of them ever);
    ``failed`` failed connects (TCP) or refused sends (UDP); bytes are those of
    closed connections (up: client to backend).
    """

    opened: int = 0
    open: int = 0
    failed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    flows: int = 0
    flows_opened: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"opened": self.opened, "open": self.open, "failed": self.failed,
                "bytesUp": self.bytes_up, "bytesDown": self.bytes_down,
                "udpFlows": self.flows, "udpFlowsOpened": self.flows_opened}


@dataclass(slots=True)
class ServiceTally(Tally):
    """A service port's totals, and its endpoints' (by address)."""

    by_endpoint: dict[Address, Tally] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class Conn:
    id: int
    protocol: str
    service: ServicePortName
    client: tuple[str, int]
    scope: str  # cluster | external | nodeport
    started: float = field(default_factory=time.time)
    backend: tuple[str, int] | None = None
    state: str = "connecting"  # connecting | open | closed
    handle: ByteCounts | None = None
    closed_up: int = 0
    closed_down: int = 0
    error: str | None = None
    # Where close() adds this connection's end: no lookups (no hashing) on the way out.
    tally: ServiceTally | None = field(default=None, repr=False)
    endpoint_tally: Tally | None = field(default=None, repr=False)

    @property
    def bytes_up(self) -> int:
        return self.handle.bytes_up if self.handle is not None else self.closed_up

    @property
    def bytes_down(self) -> int:
        return self.handle.bytes_down if self.handle is not None else self.closed_down

    @property
    def native(self) -> bool:
        return bool(self.handle is not None and self.handle.native)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {
            "id": self.id,
            "protocol": self.protocol,
            "service": str(self.service),
            "namespace": self.service.namespace,
            "name": self.service.name,
            "port": self.service.port,
            "client": _hostport(self.client),
            "backend": _hostport(self.backend) if self.backend else None,
            "scope": self.scope,
            "state": self.state,
            "age": round(now - self.started, 3),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "native": self.native,
        }


def _hostport(addr: tuple[str, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConnTable:
    def __init__(self) -> None:
        self._conns: dict[int, Conn] = {}
        self._ids = itertools.count(1)
        self.subscribers: set[Subscriber] = set()
        # those of the subscribers that need not hear of connections that open and close
        # between two of their looks (the status stream: it never sends those)
        self.brief_blind: set[Subscriber] = set()
        self.services: dict[ServicePortName, ServiceTally] = {}

    def sees_brief(self) -> bool:
        """Whether some subscriber must hear of every connection, even one that opens and
        closes within one of the relay's batches: then each gets an entry (and its events);
        else such connections are only counted (:meth:`opened_and_closed`)."""
        return any(sub not in self.brief_blind for sub in self.subscribers)

    @property
    def endpoints(self) -> dict[EndpointKey, Tally]:
        """Every endpoint's tally, by (service port, address): built when asked."""
        return {(name, address): tally for name, service in self.services.items()
                for address, tally in service.by_endpoint.items()}

    def open(self, *, protocol: str, service: ServicePortName, client: tuple[str, int],
             scope: str) -> Conn:
        conn = Conn(next(self._ids), protocol, service, client, scope)
        self._conns[conn.id] = conn
        tally = self.services.get(service)
        if tally is None:
            tally = self.services[service] = ServiceTally()
        if protocol == "UDP":
            tally.flows_opened += 1
            tally.flows += 1
        else:
            tally.opened += 1
            tally.open += 1
        conn.tally = tally
        if self.subscribers:
            self._notify("open", conn)
        return conn

    def established(self, conn: Conn, backend: tuple[str, int], handle: ByteCounts | None) -> None:
        conn.backend = backend
        conn.handle = handle
        conn.state = "open"
        if conn.tally is not None:
            tally = conn.tally.by_endpoint.get(backend)
            if tally is None:
                tally = conn.tally.by_endpoint[backend] = Tally()
            if conn.protocol == "UDP":
                tally.flows_opened += 1
                tally.flows += 1
            else:
                tally.opened += 1
                tally.open += 1
            conn.endpoint_tally = tally
        if self.subscribers:
            self._notify("update", conn)

    def connect_failed(self, service: ServicePortName, endpoint: tuple[str, int]) -> None:
        """A connect to ``endpoint`` failed (TCP), or it refused a datagram (UDP)."""
        tally = self.services.get(service)
        if tally is None:
            tally = self.services[service] = ServiceTally()
        tally.failed += 1
        at = tally.by_endpoint.get(endpoint)
        if at is None:
            at = tally.by_endpoint[endpoint] = Tally()
        at.failed += 1

    def close(self, conn: Conn, *, bytes_up: int = 0, bytes_down: int = 0,
              error: str | None = None) -> None:
        if self._conns.pop(conn.id, None) is None:
            return
        conn.closed_up, conn.closed_down = bytes_up, bytes_down
        conn.handle = None
        tally, at = conn.tally, conn.endpoint_tally  # (unrolled: this runs per connection)
        if tally is not None:
            if conn.protocol == "UDP":
                tally.flows -= 1
                if at is not None:
                    at.flows -= 1
            else:
                tally.open -= 1
                if at is not None:
                    at.open -= 1
            tally.bytes_up += bytes_up
            tally.bytes_down += bytes_down
            if at is not None:
                at.bytes_up += bytes_up
                at.bytes_down += bytes_down
        conn.state = "closed"
        conn.error = error
        if self.subscribers:
            self._notify("close", conn)

    def opened_and_closed(self, service: ServicePortName, backend: tuple[str, int], count: int,
                          *, bytes_up: int = 0, bytes_down: int = 0) -> None:
        """``count`` TCP connections to ``backend`` that opened and closed before anything
        could see them (no subscriber that :meth:`sees_brief`, one batch of the engine's,
        or its hold): the tallies and ids
        :meth:`open`, :meth:`established` and :meth:`close` would have left, with no entry."""
        self._ids = itertools.count(next(self._ids) + count)
        tally = self.services.get(service)
        if tally is None:
            tally = self.services[service] = ServiceTally()
        tally.opened += count
        tally.bytes_up += bytes_up
        tally.bytes_down += bytes_down
        at = tally.by_endpoint.get(backend)
        if at is None:
            at = tally.by_endpoint[backend] = Tally()
        at.opened += count
        at.bytes_up += bytes_up
        at.bytes_down += bytes_down

    def live_bytes(self) -> dict[EndpointKey, tuple[int, int]]:
        """Bytes (up, down) moved so far by the connections open now, per endpoint.

        O(open connections): read on demand (a page refresh, a series sample),
        never on the data path.
        """
        out: dict[EndpointKey, tuple[int, int]] = {}
        for conn in self._conns.values():
            if conn.backend is None or conn.handle is None:
                continue
            key = (conn.service, conn.backend)
            up, down = out.get(key, (0, 0))
            out[key] = (up + conn.handle.bytes_up, down + conn.handle.bytes_down)
        return out

    def prune(self, served: Mapping[ServicePortName, Entry]) -> None:
        """Forget the tallies of service ports and endpoints no longer served, once idle.

        A tally with connections or flows still open is kept whatever ``served`` says.
        """
        for name, service in list(self.services.items()):
            entry = served.get(name)
            wanted = {ep.address for ep in entry.endpoints} if entry is not None else set()
            for address in [a for a, t in service.by_endpoint.items()
                            if not (t.open or t.flows) and a not in wanted]:
                del service.by_endpoint[address]
            if entry is None and not (service.open or service.flows):
                del self.services[name]

    def _notify(self, event: str, conn: Conn) -> None:
        for sub in list(self.subscribers):
            sub(event, conn)

    def __len__(self) -> int:
        return len(self._conns)

    def __iter__(self) -> Iterator[Conn]:
        return iter(list(self._conns.values()))

    def get(self, conn_id: int) -> Conn | None:
        return self._conns.get(conn_id)
