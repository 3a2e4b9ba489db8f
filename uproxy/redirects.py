"""Pure: which address and port of a service redirects to which proxy port.

A service port has up to two proxy sockets (*scopes*): ``cluster`` for its
ClusterIPs, and ``external`` for its externalIPs and LoadBalancer IPs when it
has any (NodePorts are plain listening sockets, not redirects). This module is
the one place that maps those addresses to the sockets' ports: the daemon uses
it for the rules it applies, ``uproxy rules`` for the rules it prints (with
placeholder port numbers), and the UDP conntrack cleanup for the frontends
whose entries go stale.

uproxy serves IPv4 only: IPv6 addresses come back as ``skipped`` so each
caller says so in its own way (the daemon logs once, ``uproxy rules`` prints a
comment).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from uproxy.model import ServicePort, ServicePortName
from uproxy.rules import KIND_CLUSTER, KIND_EXTERNAL, KIND_LOADBALANCER, Redirect
from uproxy.state import Entry

SCOPE_CLUSTER = "cluster"
SCOPE_EXTERNAL = "external"


@dataclass(slots=True)
class Redirects:
    rules: list[Redirect] = field(default_factory=list)  # IPv4: what is applied
    skipped: list[Redirect] = field(default_factory=list)  # IPv6: not served, callers say so


def proxy_scopes(port: ServicePort) -> tuple[str, ...]:
    """The proxy sockets a service port needs: ``cluster``, and ``external`` if it has any."""
    return (SCOPE_CLUSTER, SCOPE_EXTERNAL) if port.external_addresses else (SCOPE_CLUSTER,)


def frontends(port: ServicePort) -> list[tuple[str, str, str]]:
    """``(scope, kind, address)`` for every address of the port that is redirected."""
    out = [(SCOPE_CLUSTER, KIND_CLUSTER, a) for a in port.cluster_ips]
    out.extend((SCOPE_EXTERNAL, KIND_EXTERNAL, a) for a in port.external_ips)
    out.extend((SCOPE_EXTERNAL, KIND_LOADBALANCER, a) for a in port.load_balancer_ips)
    return out


def redirects_of(port: ServicePort, proxy_ports: Mapping[str, int],
                 into: Redirects | None = None) -> Redirects:
    """The rules of one service port: each address -> the port of its scope's proxy socket.

    ``proxy_ports`` maps a scope to its socket's port; a scope without a socket
    (not bound yet, or the port was taken) gets no rules.
    """
    out = Redirects() if into is None else into
    for scope, kind, address in frontends(port):
        to_port = proxy_ports.get(scope)
        if to_port is None:
            continue
        redirect = Redirect(port.name, kind, address, port.port, port.protocol, to_port)
        (out.skipped if redirect.family == 6 else out.rules).append(redirect)
    return out


def proxy_ports_needed(table: Mapping[ServicePortName, Entry]) -> int:
    """How many proxy sockets the table needs (``uproxy rules`` checks the port range)."""
    return sum(len(proxy_scopes(e.port)) for e in table.values())


def placeholder_redirects(table: Mapping[ServicePortName, Entry],
                          ports: Iterable[int]) -> Redirects:
    """The table's redirects with proxy ports numbered from ``ports``, for ``uproxy rules``.

    Nothing is bound; ``ports`` must hold at least :func:`proxy_ports_needed` numbers.
    """
    out = Redirects()
    numbers = iter(ports)
    for entry in table.values():
        redirects_of(entry.port, {scope: next(numbers) for scope in proxy_scopes(entry.port)},
                     into=out)
    return out
