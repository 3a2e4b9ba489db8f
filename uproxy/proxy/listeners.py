"""The listener set: which sockets each service port listens on, opened and closed by sync.

Each service port has a proxy socket per scope and address family
(:func:`uproxy.redirects.proxy_sockets`: ``cluster``, and ``external`` when it
has externalIPs or LoadBalancer IPs; a family when the scope has an address of
it) on ``--bind-address`` (``0.0.0.0`` means ``::`` too for IPv6) at a port from
the allocator, which the iptables redirects point at; and, for a NodePort, one
socket on the nodePort itself per address in ``--nodeport-addresses`` of the
service's families (a single-stack IPv4 Service's NodePort is not served on the
node's IPv6 addresses, as kube-proxy does it). :meth:`ListenerSet.ensure` makes the open sockets
match that; the protocol proxy that serves a socket is passed in. A port that
cannot be bound (taken by another process) is reported once and remembered in
:attr:`ListenerSet.bind_failures`, so the next full sync tries it again.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from uproxy.model import ServicePort, ServicePortName, quick_init
from uproxy.proxy.node_addresses import nodeport_addresses
from uproxy.proxy.ports import PortAllocator, bind
from uproxy.redirects import (
    FAMILIES,
    SCOPE_CLUSTER,
    family_of,
    proxy_sockets,
    service_families,
)

log = logging.getLogger("uproxy")

SOCK_KIND = {"TCP": socket.SOCK_STREAM, "UDP": socket.SOCK_DGRAM}
SCOPE_NODEPORT = "nodeport"


class Listener(Protocol):
    sock: socket.socket

    @property
    def port(self) -> int: ...
    def close(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def release(self) -> None: ...


class Listening(Protocol):
    """What serves a socket: the TCP or UDP proxy."""

    def listen(self, sock: socket.socket, name: ServicePortName, scope: str) -> Listener: ...


@quick_init
@dataclass(frozen=True, slots=True)
class ListenerKey:
    name: ServicePortName
    scope: str  # cluster | external | nodeport
    address: str
    port: int  # the requested port: 0 for proxy sockets, the nodePort for NodePorts
    family: int = 4


def bind_addresses(bind_address: str, families: tuple[int, ...]) -> dict[int, str]:
    """Family -> the address proxy sockets bind to: the unspecified address means both
    families; a specific one only its own."""
    if bind_address in ("0.0.0.0", "::"):
        return {f: ("::" if f == 6 else "0.0.0.0") for f in families}
    family = family_of(bind_address)
    return {family: bind_address} if family in families else {}


class ListenerSet:
    def __init__(self, allocator: PortAllocator, bind_address: str,
                 nodeport_cidrs: tuple[str, ...], families: tuple[int, ...] = FAMILIES) -> None:
        self.allocator = allocator
        self.bind_address = bind_address
        self.bind_addresses = bind_addresses(bind_address, families)
        self.families = tuple(self.bind_addresses)  # the families proxy sockets are opened for
        self.nodeport_cidrs = nodeport_cidrs
        self.node_ips: tuple[str, ...] = ()  # the Node's primary IPs (set by the daemon)
        self.listeners: dict[ListenerKey, Listener] = {}
        self.bind_failures: set[ServicePortName] = set()  # some wanted socket is not open
        self._by_name: dict[ServicePortName, set[ListenerKey]] = {}
        self._warned: set[ListenerKey] = set()
        self.adopted: dict[ListenerKey, socket.socket] = {}  # from a takeover, not claimed yet

    def ensure(self, port: ServicePort, proxy: Listening) -> None:
        """Open the sockets ``port`` needs that are not open; close those it no longer needs."""
        if (port.name not in self._by_name and not self.adopted and not port.node_port
                and not port.external_ips and not port.load_balancer_ips):
            self._open_cluster(port, proxy)
            return
        wanted = {ListenerKey(port.name, scope, self.bind_addresses[family], 0, family)
                  for scope, family in proxy_sockets(port, self.families)}
        if port.node_port:
            families = [f for f in service_families(port) if f in self.families]
            for address in nodeport_addresses(self.nodeport_cidrs, self.node_ips, families):
                wanted.add(ListenerKey(port.name, SCOPE_NODEPORT, address, port.node_port,
                                       family_of(address)))
        existing = self._by_name.setdefault(port.name, set())
        for key in existing - wanted:
            self.listeners.pop(key).close()
            existing.discard(key)
        for key in sorted(wanted - existing, key=lambda k: (k.scope, k.family, k.address)):
            try:
                if key in self.adopted:  # a takeover brought it (the rules point at its port)
                    sock = self.adopted.pop(key)
                elif key.scope == SCOPE_NODEPORT:
                    sock = bind(SOCK_KIND[port.protocol], key.address, key.port)
                else:
                    sock = self.allocator.open(SOCK_KIND[port.protocol], key.address)
            except OSError as exc:
                self._bind_failed(key, exc)
                continue
            self._warned.discard(key)
            self.listeners[key] = proxy.listen(sock, port.name, key.scope)
            existing.add(key)
        if wanted <= existing:
            self.bind_failures.discard(port.name)
        else:
            self.bind_failures.add(port.name)

    def ensure_many(self, ports: Sequence[tuple[ServicePort, Listening]]) -> None:
        """:meth:`ensure` of each port with its proxy; the new ClusterIP-only ones (a
        start's 10,000) have their sockets opened together (:meth:`PortAllocator.open_ahead`: C
        calls in a worker thread, each chunk opened while the one before is given to its
        proxy), the others one by one as :meth:`ensure` does."""
        batch: list[tuple[ServicePort, Listening, ListenerKey]] = []
        for port, proxy in ports:
            if (port.name in self._by_name or self.adopted or port.node_port
                    or port.external_ips or port.load_balancer_ips):
                self.ensure(port, proxy)
                continue
            name = port.name
            self._by_name[name] = set()
            self.bind_failures.discard(name)
            for family in sorted({6 if ":" in ip else 4 for ip in port.cluster_ips}):
                address = self.bind_addresses.get(family)
                if address is not None:  # (a family not served: proxy_sockets leaves it out)
                    batch.append((port, proxy,
                                  ListenerKey(name, SCOPE_CLUSTER, address, 0, family)))
        for protocol, kind in SOCK_KIND.items():
            mine = [item for item in batch if item[0].protocol == protocol]
            if not mine:
                continue
            opened = self.allocator.open_ahead(kind, [key.address for _, _, key in mine])
            with contextlib.closing(opened):  # (an error: the sockets not handed out close)
                for (_, proxy, key), sock in zip(mine, opened, strict=True):
                    if isinstance(sock, OSError):
                        self._bind_failed(key, sock)
                        self.bind_failures.add(key.name)
                        continue
                    self._warned.discard(key)
                    self.listeners[key] = proxy.listen(sock, key.name, SCOPE_CLUSTER)
                    self._by_name[key.name].add(key)

    def _open_cluster(self, port: ServicePort, proxy: Listening) -> None:
        """:meth:`ensure` of a new service port with ClusterIPs only (a start opens 10,000):
        the same sockets in the same order (by family), without the general case's sets."""
        name = port.name
        existing: set[ListenerKey] = set()
        self._by_name[name] = existing
        kind = SOCK_KIND[port.protocol]
        failed = False
        for family in sorted({6 if ":" in ip else 4 for ip in port.cluster_ips}):
            address = self.bind_addresses.get(family)
            if address is None:  # (a family not served: proxy_sockets leaves it out)
                continue
            key = ListenerKey(name, SCOPE_CLUSTER, address, 0, family)
            try:
                sock = self.allocator.open(kind, address)
            except OSError as exc:
                self._bind_failed(key, exc)
                failed = True
                continue
            self._warned.discard(key)
            self.listeners[key] = proxy.listen(sock, name, SCOPE_CLUSTER)
            existing.add(key)
        if failed:
            self.bind_failures.add(name)
        else:
            self.bind_failures.discard(name)

    def _bind_failed(self, key: ListenerKey, exc: OSError) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        name = key.name
        what = f"nodePort {key.port}" if key.scope == SCOPE_NODEPORT else "a proxy port"
        reason = "already in use by another process" if exc.errno == 98 else (
            exc.strerror or str(exc))
        log.warning("Service %s/%s: port %s: cannot listen on %s %s: %s", name.namespace,
                    name.name, name.port or "(unnamed)", what, key.address, reason)

    def adopt(self, key: ListenerKey, sock: socket.socket) -> None:
        """A socket that came over in a takeover: the next ``ensure`` of its key uses it."""
        self.adopted[key] = sock
        if key.scope != SCOPE_NODEPORT:
            self.allocator.avoid.add(sock.getsockname()[1])

    def close_unclaimed(self) -> int:
        """Close the adopted sockets no service wanted (after the first sync)."""
        count = len(self.adopted)
        for sock in self.adopted.values():
            self.allocator.avoid.discard(sock.getsockname()[1])
            sock.close()
        self.adopted.clear()
        return count

    def close(self, name: ServicePortName) -> None:
        """Close every socket of one service port (it is gone)."""
        self.bind_failures.discard(name)
        for key in self._by_name.pop(name, set()):
            self.listeners.pop(key).close()

    def close_all(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
        self._by_name.clear()

    def proxy_ports(self, name: ServicePortName) -> dict[tuple[str, int], int]:
        """(scope, family) -> port of the service port's open proxy sockets (what its
        redirects point at)."""
        out: dict[tuple[str, int], int] = {}
        for key in self._by_name.get(name, ()):
            if key.scope != SCOPE_NODEPORT and key.address == self.bind_addresses.get(key.family):
                out[(key.scope, key.family)] = self.listeners[key].port
        return out
