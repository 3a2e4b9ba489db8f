"""What the status server may read of the daemon: a read-only view, as Protocols.

The status and health apps show the daemon's state; they never change it and
never import it (an import-linter contract says so). :class:`DaemonView` lists
exactly what they read, so the daemon can change its insides freely as long
as it still offers these, and a test can hand the apps any object that does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Protocol

from uproxy.connections import ConnTable
from uproxy.metrics import Metrics
from uproxy.model import Obj, ServicePortName
from uproxy.rules import Redirect
from uproxy.settings import Settings
from uproxy.state import Entry, Key


class StoreView(Protocol):
    """The parsed objects, as the status pages list them."""

    @property
    def generation(self) -> int: ...
    def keys(self, kind: str) -> set[Key]: ...
    def raw(self, kind: str) -> dict[Key, Obj]: ...


class ListenerView(Protocol):
    """Which socket a listener is (:class:`uproxy.proxy.listeners.ListenerKey`)."""

    @property
    def name(self) -> ServicePortName: ...
    @property
    def scope(self) -> str: ...
    @property
    def address(self) -> str: ...


class Named(Protocol):
    @property
    def name(self) -> str: ...


class DaemonView(Protocol):
    @property
    def settings(self) -> Settings: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def relay(self) -> Named: ...
    @property
    def source(self) -> Named: ...
    @property
    def store(self) -> StoreView: ...
    @property
    def served(self) -> Mapping[ServicePortName, Entry]: ...
    @property
    def redirects(self) -> Iterable[Redirect]: ...
    @property
    def conns(self) -> ConnTable: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def started(self) -> float: ...
    @property
    def last_sync(self) -> float | None: ...
    @property
    def ready(self) -> bool: ...
    @property
    def source_synced(self) -> bool: ...
    @property
    def rules_applied(self) -> bool: ...
    @property
    def node_terminating(self) -> bool: ...
    def healthy(self, now: float | None = None) -> bool: ...
    def listener_ports(self) -> Iterable[tuple[ListenerView, int]]: ...
