"""Pure topology: which ready endpoints a node prefers, as kube-proxy decides it.

kube-proxy (``pkg/proxy/topology.go``, ``CategorizeEndpoints``) never reads a Service's
``trafficDistribution``: it reads the EndpointSlice *hints* that the EndpointSlice
controller writes from it (``hints.forZones``, and ``hints.forNodes`` for
``PreferSameNode``). uproxy does the same, with one extension for clusters without that
controller (``--manifests``): :func:`synthesize_hints` writes the hints the controller
would have written, only when no endpoint of the service port carries any hint.

The rule, for the cluster-wide endpoint set (ClusterIP traffic under
``internalTrafficPolicy: Cluster``, external traffic under ``externalTrafficPolicy:
Cluster``; a ``Local`` policy ignores topology):

* only *ready* endpoints are judged;
* ``PreferSameNode`` mode: every ready endpoint has node hints and some ready endpoint is
  hinted for this node -> the ready endpoints hinted for this node;
* otherwise ``PreferSameZone`` mode: every ready endpoint has zone hints and some ready
  endpoint is hinted for this node's zone -> the ready endpoints hinted for this zone (a
  node without a zone never matches);
* otherwise all ready endpoints: a hint missing on any ready endpoint, or no hint for this
  node or zone, falls back to everything;
* no ready endpoint at all: the serving-and-terminating ones, topology ignored (the
  caller's graceful-termination fallback, :func:`uproxy.balance.usable_endpoints`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from uproxy.model import Endpoint

PREFER_SAME_NODE = "PreferSameNode"
PREFER_SAME_ZONE = "PreferSameZone"
PREFER_CLOSE = "PreferClose"  # the older name of PreferSameZone
TRAFFIC_DISTRIBUTIONS = (PREFER_CLOSE, PREFER_SAME_ZONE, PREFER_SAME_NODE)


def topology_mode(endpoints: Sequence[Endpoint], node_name: str, zone: str | None) -> str:
    """``PreferSameNode``, ``PreferSameZone`` or ``""`` (no topology), from the hints of
    the ready endpoints (kube-proxy's ``topologyModeFromHints``)."""
    ready = [e for e in endpoints if e.ready]
    if not ready:
        return ""
    if all(e.node_hints for e in ready) and any(node_name in e.node_hints for e in ready):
        return PREFER_SAME_NODE
    if zone and all(e.zone_hints for e in ready) and any(zone in e.zone_hints for e in ready):
        return PREFER_SAME_ZONE
    return ""


def ready_by_topology(endpoints: Sequence[Endpoint], node_name: str,
                      zone: str | None) -> tuple[Endpoint, ...]:
    """The ready endpoints this node may use, in their order (see the module's rule)."""
    ready = tuple(e for e in endpoints if e.ready)
    if not ready or not (ready[0].node_hints or ready[0].zone_hints):
        return ready  # the common case (no hints), per connection: nothing more to look at
    mode = topology_mode(ready, node_name, zone)
    if mode == PREFER_SAME_NODE:
        return tuple(e for e in ready if node_name in e.node_hints)
    if mode == PREFER_SAME_ZONE:
        return tuple(e for e in ready if zone in e.zone_hints)
    return ready


def synthesize_hints(endpoints: tuple[Endpoint, ...],
                     traffic_distribution: str | None) -> tuple[Endpoint, ...]:
    """The hints the EndpointSlice controller would write for ``trafficDistribution``.

    ``PreferClose``/``PreferSameZone``: each endpoint with a zone is hinted for its own
    zone; ``PreferSameNode``: also for its own node. Endpoints that already carry hints
    (the controller ran) are returned unchanged, as are all of them for any other value.
    """
    if traffic_distribution not in TRAFFIC_DISTRIBUTIONS:
        return endpoints
    if any(e.zone_hints or e.node_hints for e in endpoints):
        return endpoints
    same_node = traffic_distribution == PREFER_SAME_NODE
    out = []
    for e in endpoints:
        zones = (e.zone,) if e.zone else ()
        nodes = (e.node_name,) if same_node and e.node_name else ()
        out.append(replace(e, zone_hints=zones, node_hints=nodes) if zones or nodes else e)
    return tuple(out)
