"""Pure: which address and port of a service redirects to which proxy port.

A service port has up to two proxy sockets (*scopes*) per address family:
``cluster`` for its ClusterIPs, and ``external`` for its externalIPs and
LoadBalancer IPs when it has any (NodePorts are plain listening sockets, not
redirects). A socket of one family never sees the other family's traffic, so
each (scope, family) that has an address gets its own socket
(:func:`proxy_sockets`). This module is the one place that maps those
addresses to the sockets' ports: the daemon uses it for the rules it applies,
``uproxy rules`` for the rules it prints (with placeholder port numbers), and
the UDP conntrack cleanup for the frontends whose entries go stale.

Addresses of a family the node does not serve (no IPv6, or no ``ip6tables``)
come back as ``skipped`` so each caller can say so in its own way.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from uproxy.model import ServicePort, ServicePortName
from uproxy.rules import KIND_CLUSTER, KIND_EXTERNAL, KIND_LOADBALANCER, Redirect
from uproxy.state import Entry

SCOPE_CLUSTER = "cluster"
SCOPE_EXTERNAL = "external"
FAMILIES = (4, 6)

ProxyPorts = Mapping[tuple[str, int], int]
"""(scope, family) -> the port of that proxy socket."""


@dataclass(slots=True)
class Redirects:
    rules: list[Redirect] = field(default_factory=list)  # what is applied
    skipped: list[Redirect] = field(default_factory=list)  # a family not served: callers say so


def family_of(address: str) -> int:
    """4 or 6."""
    return 6 if ":" in address else 4


def service_families(port: ServicePort) -> tuple[int, ...]:
    """The families of the service (of its ClusterIPs, as ``spec.ipFamilies``): its
    endpoints and NodePorts are those of these families only."""
    families = {family_of(a) for a in port.cluster_ips}
    return tuple(sorted(families)) or (4,)


def proxy_scopes(port: ServicePort) -> tuple[str, ...]:
    """The proxy scopes a service port needs: ``cluster``, and ``external`` if it has any."""
    return (SCOPE_CLUSTER, SCOPE_EXTERNAL) if port.external_addresses else (SCOPE_CLUSTER,)


def proxy_sockets(port: ServicePort,
                  families: Collection[int] = FAMILIES) -> list[tuple[str, int]]:
    """``(scope, family)`` of each proxy socket the port needs: one per scope and family
    that has an address (of the ``families`` served)."""
    out: list[tuple[str, int]] = []
    for scope, _kind, address in frontends(port):
        key = (scope, family_of(address))
        if key[1] in families and key not in out:
            out.append(key)
    return out


def frontends(port: ServicePort) -> list[tuple[str, str, str]]:
    """``(scope, kind, address)`` for every address of the port that is redirected.

    externalIPs and LoadBalancer IPs count only in the service's own families: as
    kube-proxy's per-family proxiers, an IPv6 externalIP of a single-stack IPv4
    Service is not served (it has no IPv6 endpoints to go to)."""
    families = service_families(port)
    out = [(SCOPE_CLUSTER, KIND_CLUSTER, a) for a in port.cluster_ips]
    out.extend((SCOPE_EXTERNAL, KIND_EXTERNAL, a) for a in port.external_ips
               if family_of(a) in families)
    out.extend((SCOPE_EXTERNAL, KIND_LOADBALANCER, a) for a in port.load_balancer_ips
               if family_of(a) in families)
    return out


def redirects_of(port: ServicePort, proxy_ports: ProxyPorts,
                 into: Redirects | None = None, *,
                 families: Collection[int] = FAMILIES) -> Redirects:
    """The rules of one service port: each address -> the port of its scope's proxy socket
    of the address's family.

    ``proxy_ports`` maps (scope, family) to its socket's port; a socket not there
    (not bound yet, or the port was taken) gets no rules. Addresses of a family
    not in ``families`` are ``skipped`` (with ``to_port`` 0).
    """
    out = Redirects() if into is None else into
    if port.external_ips or port.load_balancer_ips:
        fronts = frontends(port)
    else:  # (frontends' answer for ClusterIPs alone: a start has 10,000 of them)
        fronts = [(SCOPE_CLUSTER, KIND_CLUSTER, a) for a in port.cluster_ips]
    for scope, kind, address in fronts:
        family = family_of(address)
        if family not in families:
            out.skipped.append(Redirect(port.name, kind, address, port.port, port.protocol, 0))
            continue
        to_port = proxy_ports.get((scope, family))
        if to_port is None:
            continue
        out.rules.append(Redirect(port.name, kind, address, port.port, port.protocol, to_port))
    return out


def proxy_ports_needed(table: Mapping[ServicePortName, Entry],
                       families: Collection[int] = FAMILIES) -> int:
    """How many proxy sockets the table needs (``uproxy rules`` checks the port range)."""
    return sum(len(proxy_sockets(e.port, families)) for e in table.values())


def placeholder_redirects(table: Mapping[ServicePortName, Entry], ports: Iterable[int],
                          families: Collection[int] = FAMILIES) -> Redirects:
    """The table's redirects with proxy ports numbered from ``ports``, for ``uproxy rules``.

    Nothing is bound; ``ports`` must hold at least :func:`proxy_ports_needed` numbers.
    """
    out = Redirects()
    numbers = iter(ports)
    for entry in table.values():
        redirects_of(entry.port,
                     {key: next(numbers) for key in proxy_sockets(entry.port, families)},
                     into=out, families=families)
    return out
