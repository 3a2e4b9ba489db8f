"""Pure backend choice: conditions, traffic policies, random spread, ClientIP affinity.

kube-proxy's rules in one place, with time and randomness passed in so the
tests can drive them:

* :func:`usable_endpoints` is THE rule "which endpoints may serve" new
  traffic, for every protocol: which endpoint a new TCP connection or UDP flow
  may pick. Usable endpoints are the ready ones; when none is ready, the
  serving and terminating ones (graceful termination); when none of those,
  nothing;
* :func:`flow_endpoints` is the rule for traffic already flowing (UDP flows,
  and conntrack clean-up through :func:`serving_addresses`): a flow stays on
  its endpoint while that endpoint still serves (ready, or serving while it
  terminates) and the traffic policy still allows it, as kube-proxy keeps the
  conntrack entries of every serving endpoint (``pkg/proxy/conntrack/
  cleanup.go``): a client in the middle of a UDP exchange with a pod that
  starts terminating keeps talking to it, and only new clients go elsewhere.
  (kube-proxy ignores the traffic policy there too; uproxy closes flows that
  a ``Local`` policy change excludes, so they move to a local endpoint.)
* a ``Local`` traffic policy keeps only endpoints on this node (internal policy
  for ClusterIP traffic, external policy for NodePort/externalIP/LB traffic);
* otherwise topology hints narrow the ready endpoints to this node's or zone's, with
  kube-proxy's fall-back to all of them (:mod:`uproxy.topology`); a ``Local`` policy
  ignores topology, as kube-proxy's does;
* the choice is uniform at random (what ``statistic --mode random`` rules do),
  except with ``sessionAffinity: ClientIP``, where a client keeps its endpoint
  until the timeout passes unused or the endpoint goes away;
* an endpoint that just failed to connect is avoided for a while, unless
  nothing else is left.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping

from uproxy.model import Endpoint, ServicePortName
from uproxy.state import Entry
from uproxy.topology import ready_by_topology

FAILED_AVOID_SECONDS = 5.0


def usable_endpoints(entry: Entry, *, external: bool, node_name: str,
                     zone: str | None = None, family: int | None = None) -> tuple[Endpoint, ...]:
    """The endpoints traffic of ``entry`` may go to now, in the entry's order.

    ``external``: the traffic came through a NodePort, externalIP or LoadBalancer IP
    (the external traffic policy applies), else through the ClusterIP (internal policy).
    ``zone``: this node's zone, for zone hints (None: none match).
    ``family`` (4 or 6): the traffic's address family; each family chooses among its
    own endpoints only, as kube-proxy's per-family proxiers do (None: every family).
    """
    port = entry.port
    local = port.external_local if external else port.internal_local
    candidates = entry.endpoints
    if family is not None:
        v6 = family == 6
        candidates = tuple(e for e in candidates if (":" in e.ip) == v6)
    if local:
        candidates = tuple(e for e in candidates if e.node_name == node_name)
        ready = tuple(e for e in candidates if e.ready)
    else:
        ready = ready_by_topology(candidates, node_name, zone)
    if ready:
        return ready
    return tuple(e for e in candidates if e.serving and e.terminating)


def flow_endpoints(entry: Entry, *, external: bool, node_name: str) -> tuple[Endpoint, ...]:
    """The endpoints an existing flow of ``entry`` may stay on: serving (ready, or serving
    while terminating) and allowed by the traffic policy of its scope."""
    port = entry.port
    local = port.external_local if external else port.internal_local
    return tuple(e for e in entry.endpoints
                 if (e.ready or e.serving) and (not local or e.node_name == node_name))


def serving_addresses(entries: Iterable[Entry], *, node_name: str,
                      protocol: str = "UDP") -> set[tuple[str, int]]:
    """Endpoint addresses some flow of these service ports (of ``protocol``) may still go
    to: :func:`flow_endpoints` over every scope each port is reachable in (cluster
    always; external when it has externalIPs, LoadBalancer IPs or a NodePort)."""
    out: set[tuple[str, int]] = set()
    for entry in entries:
        port = entry.port
        if port.protocol != protocol:
            continue
        out.update(e.address for e in flow_endpoints(entry, external=False,
                                                     node_name=node_name))
        if port.external_addresses or port.node_port:
            out.update(e.address for e in flow_endpoints(entry, external=True,
                                                         node_name=node_name))
    return out


class Balancer:
    """Chooses an endpoint per connection (TCP) or per flow (UDP)."""

    def __init__(self, *, node_name: str, zone: str | None = None,
                 rng: random.Random | None = None) -> None:
        self.node_name = node_name
        self.zone = zone  # this node's zone (topology hints); the daemon keeps it current
        self._rng = rng or random.Random()
        self._affinity: dict[tuple[ServicePortName, str], tuple[Endpoint, float]] = {}
        self._failed: dict[tuple[str, int], float] = {}
        # Pins another uproxy handed over (a takeover): endpoint address and last use,
        # taken up at the key's next choice if that endpoint is still usable.
        self._imported: dict[tuple[ServicePortName, str], tuple[tuple[str, int], float]] = {}

    def choose(
        self,
        entry: Entry,
        client_ip: str,
        now: float,
        *,
        external: bool = False,
        exclude: Collection[Endpoint] = (),
        family: int | None = None,
    ) -> Endpoint | None:
        usable = usable_endpoints(entry, external=external, node_name=self.node_name,
                                  zone=self.zone, family=family)
        if exclude:
            usable = tuple(e for e in usable if e not in exclude)
        if not usable:
            return None
        timeout = entry.port.affinity_timeout
        key = (entry.port.name, client_ip)
        if timeout is not None:
            pinned = self._affinity.get(key)
            if pinned is None and self._imported:
                pinned = self._take_imported(key, usable)
            if pinned is not None:
                endpoint, last = pinned
                if now - last <= timeout and endpoint in usable:
                    self._affinity[key] = (endpoint, now)
                    return endpoint
                del self._affinity[key]
        healthy = tuple(e for e in usable if self._failed.get(e.address, 0.0) <= now)
        endpoint = self._rng.choice(healthy or usable)
        if timeout is not None:
            self._affinity[key] = (endpoint, now)
        return endpoint

    def _take_imported(self, key: tuple[ServicePortName, str],
                       usable: tuple[Endpoint, ...]) -> tuple[Endpoint, float] | None:
        imported = self._imported.pop(key, None)
        if imported is None:
            return None
        address, last = imported
        for endpoint in usable:
            if endpoint.address == address:
                self._affinity[key] = (endpoint, last)
                return endpoint, last
        return None

    def export_affinity(self, now: float) -> list[tuple[ServicePortName, str, tuple[str, int],
                                                        float]]:
        """Every ClientIP pin as (service port, client IP, endpoint address, seconds idle)."""
        pins = [(name, client, endpoint.address, now - last)
                for (name, client), (endpoint, last) in self._affinity.items()]
        pins += [(name, client, address, now - last)
                 for (name, client), (address, last) in self._imported.items()]
        return pins

    def import_affinity(self, pins: Iterable[tuple[ServicePortName, str, tuple[str, int], float]],
                        now: float) -> None:
        """Pins exported by the uproxy this one took over from (clocks differ: idle times)."""
        for name, client, address, idle in pins:
            self._imported[(name, client)] = (address, now - idle)

    def connect_failed(self, endpoint: Endpoint, now: float, entry: Entry | None = None,
                       client_ip: str | None = None) -> None:
        """Avoid ``endpoint`` for a while; drop an affinity pin to it."""
        self._failed[endpoint.address] = now + FAILED_AVOID_SECONDS
        if entry is not None and client_ip is not None:
            pinned = self._affinity.get((entry.port.name, client_ip))
            if pinned is not None and pinned[0] == endpoint:
                del self._affinity[(entry.port.name, client_ip)]

    def avoided_until(self, address: tuple[str, int]) -> float:
        """Until when (the ``now`` clock) new traffic avoids ``address``; 0.0 when not."""
        return self._failed.get(address, 0.0)

    def avoiding(self) -> bool:
        """Whether some endpoint is avoided (or was, until the next :meth:`prune`)."""
        return bool(self._failed)

    def connect_succeeded(self, endpoint: Endpoint) -> None:
        self._failed.pop(endpoint.address, None)

    def prune(self, table: Mapping[ServicePortName, Entry], now: float) -> None:
        """Forget pins whose service port or endpoint is gone, or whose timeout passed."""
        for key, (endpoint, last) in list(self._affinity.items()):
            entry = table.get(key[0])
            timeout = entry.port.affinity_timeout if entry else None
            if entry is None or timeout is None or now - last > timeout or (
                endpoint not in entry.endpoints
            ):
                del self._affinity[key]
        for key, (_, last) in list(self._imported.items()):
            entry = table.get(key[0])
            timeout = entry.port.affinity_timeout if entry else None
            if timeout is None or now - last > timeout:
                del self._imported[key]
        for address, until in list(self._failed.items()):
            if until <= now:
                del self._failed[address]

    def affinity_count(self) -> int:
        return len(self._affinity) + len(self._imported)
