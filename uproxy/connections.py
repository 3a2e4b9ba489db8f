"""The live connection table: what the status page and ``uproxy get connections`` show.

O(1) per connection: an entry is added when a client is accepted and removed
when its relay is done. Byte counts are not copied here per chunk; each entry
keeps a reference to its relay handle and reads the counters on demand.
Subscribers (the status server's live stream) get ``("open"|"update"|"close",
conn)`` callbacks.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from uproxy.model import ServicePortName

Subscriber = Callable[[str, "Conn"], None]


class ByteCounts(Protocol):
    """What a connection reads of its relay's handle (``uproxy.proxy.relay.RelayHandle``)."""

    @property
    def bytes_up(self) -> int: ...
    @property
    def bytes_down(self) -> int: ...
    @property
    def native(self) -> bool: ...


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

    def open(self, *, protocol: str, service: ServicePortName, client: tuple[str, int],
             scope: str) -> Conn:
        conn = Conn(next(self._ids), protocol, service, client, scope)
        self._conns[conn.id] = conn
        self._notify("open", conn)
        return conn

    def established(self, conn: Conn, backend: tuple[str, int], handle: ByteCounts | None) -> None:
        conn.backend = backend
        conn.handle = handle
        conn.state = "open"
        self._notify("update", conn)

    def close(self, conn: Conn, *, bytes_up: int = 0, bytes_down: int = 0,
              error: str | None = None) -> None:
        if self._conns.pop(conn.id, None) is None:
            return
        conn.closed_up, conn.closed_down = bytes_up, bytes_down
        conn.handle = None
        conn.state = "closed"
        conn.error = error
        self._notify("close", conn)

    def _notify(self, event: str, conn: Conn) -> None:
        for sub in list(self.subscribers):
            sub(event, conn)

    def __len__(self) -> int:
        return len(self._conns)

    def __iter__(self) -> Iterator[Conn]:
        return iter(list(self._conns.values()))

    def get(self, conn_id: int) -> Conn | None:
        return self._conns.get(conn_id)
