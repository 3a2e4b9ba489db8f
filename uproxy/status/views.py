"""Pure views: the daemon's state as the JSON documents the status API serves.

Every function here takes plain values (raw Kubernetes dicts, the served
table, the listeners, a clock reading) and returns JSON-ready dicts; nothing
touches a socket, so the views are tested without a server and the server
stays a thin layer of routes. Services and endpoints are shaped after what
``kubectl get svc|endpoints`` shows, plus what only uproxy knows (the local
proxy port of each service port, the endpoint conditions it honours).

Ages come from ``metadata.creationTimestamp`` when the object has one (the API
source always does); manifests on disk usually do not, so the status server
remembers when it first saw each object (:class:`FirstSeen`) and ages count
from there.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from uproxy.connections import EndpointKey, Tally
from uproxy.model import ServicePortName
from uproxy.rules import CHAIN, KEEP_NAT_V4, KEEP_NAT_V6, Redirect, render_rule
from uproxy.state import KINDS, Entry, Key
from uproxy.status.view import StoreView

Json = dict[str, Any]

# kubectl shows at most this many addresses in the ENDPOINTS column.
ENDPOINTS_SHOWN = 3
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def parse_timestamp(text: Any) -> float | None:
    """RFC 3339 (``2026-11-21T08:30:52Z``) -> seconds since the epoch, or None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def format_timestamp(when: float | None) -> str:
    """Seconds since the epoch -> RFC 3339 UTC; None -> Go's zero time, as kube-proxy shows it."""
    if when is None:
        return "0001-01-01T00:00:00Z"
    stamp = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FirstSeen:
    """When each stored object was first seen, for objects without a creationTimestamp.

    :meth:`observe` is cheap when nothing changed (it compares the store's
    generation), so the server calls it before every view and from a slow timer.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[str, Key], float] = {}
        self._generation = -1

    def observe(self, store: StoreView, now: float) -> None:
        if store.generation == self._generation:
            return
        self._generation = store.generation
        current: set[tuple[str, Key]] = set()
        for kind in KINDS:
            current.update((kind, key) for key in store.keys(kind))
        for gone in [k for k in self._seen if k not in current]:
            del self._seen[gone]
        for item in current:
            self._seen.setdefault(item, now)

    def get(self, kind: str, key: Key) -> float | None:
        return self._seen.get((kind, key))


def _created(obj: Mapping[str, Any], kind: str, key: Key, seen: FirstSeen) -> float | None:
    meta = obj.get("metadata")
    stamp = parse_timestamp(meta.get("creationTimestamp")) if isinstance(meta, Mapping) else None
    return stamp if stamp is not None else seen.get(kind, key)


def _age(created: float | None, now: float) -> float | None:
    return None if created is None else round(now - created, 3)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def services(raw: Mapping[Key, Mapping[str, Any]], served: Mapping[ServicePortName, Entry],
             proxy_ports: Mapping[ServicePortName, int], seen: FirstSeen, now: float,
             keys: Iterable[Key] | None = None,
             family_ports: Mapping[ServicePortName, Mapping[str, int]] | None = None) -> Json:
    """Every Service in the store (also those uproxy does not proxy), like ``kubectl get svc``;
    ``keys``: only these (one page), in this order.

    ``family_ports``: the ClusterIP proxy socket of each family (``IPv4``/``IPv6``) per
    service port, shown as ``proxyPorts`` (``proxyPort`` is the first family's)."""
    wanted = list(sorted(raw) if keys is None else keys)
    chosen = set(wanted)
    by_service: dict[Key, dict[tuple[str, str], Entry]] = {}
    for name, entry in served.items():
        if name.service in chosen:
            by_service.setdefault(name.service, {})[(name.port, name.protocol)] = entry
    items = []
    for key in wanted:
        obj = raw[key]
        spec = _mapping(obj.get("spec"))
        svc_type = str(spec.get("type") or "ClusterIP")
        entries = by_service.get(key, {})
        ports = []
        for p in _list(spec.get("ports")):
            p = _mapping(p)
            port_name = str(p.get("name") or "")
            protocol = str(p.get("protocol") or "TCP")
            found = entries.get((port_name, protocol))
            spn = found.port.name if found else None
            ports.append({
                "name": port_name,
                "port": p.get("port"),
                "protocol": protocol,
                "targetPort": p.get("targetPort", p.get("port")),
                "nodePort": p.get("nodePort") if svc_type in ("NodePort", "LoadBalancer") else None,
                "proxied": found is not None,
                "proxyPort": proxy_ports.get(spn) if spn else None,
                "proxyPorts": dict((family_ports or {}).get(spn, {})) if spn else {},
                "endpoints": len(found.endpoints) if found else 0,
            })
        ingress = _list(_mapping(_mapping(obj.get("status")).get("loadBalancer")).get("ingress"))
        selector = spec.get("selector")
        affinity = spec.get("sessionAffinity") or "None"
        items.append({
            "namespace": key[0],
            "name": key[1],
            "type": svc_type,
            "clusterIP": spec.get("clusterIP") or (_list(spec.get("clusterIPs")) or [None])[0],
            "clusterIPs": [str(ip) for ip in _list(spec.get("clusterIPs"))]
            or ([str(spec["clusterIP"])] if spec.get("clusterIP") else []),
            "ipFamilies": [str(f) for f in _list(spec.get("ipFamilies"))],
            "ipFamilyPolicy": spec.get("ipFamilyPolicy"),
            "externalIPs": [str(ip) for ip in _list(spec.get("externalIPs"))],
            "loadBalancerIPs": [str(_mapping(i).get("ip") or _mapping(i).get("hostname") or "")
                                for i in ingress if _mapping(i)],
            "externalName": spec.get("externalName"),
            "selector": dict(selector) if isinstance(selector, Mapping) else None,
            "sessionAffinity": affinity,
            "ports": ports,
            "created": format_timestamp(created)
            if (created := _created(obj, "Service", key, seen)) is not None else None,
            "age": _age(created, now),
        })
    return {"kind": "ServiceList", "items": items}


def traffic(tally: Tally | None, live: tuple[int, int] | None) -> dict[str, int]:
    """One endpoint's counters: the tally plus the bytes of its open connections."""
    out = (tally or Tally()).as_dict()
    if live is not None:
        out["bytesUp"] += live[0]
        out["bytesDown"] += live[1]
    return out


def endpoints(served: Mapping[ServicePortName, Entry],
              raw_slices: Mapping[Key, Mapping[str, Any]],
              raw_endpoints: Mapping[Key, Mapping[str, Any]],
              raw_services: Mapping[Key, Mapping[str, Any]],
              seen: FirstSeen, now: float,
              tallies: Mapping[EndpointKey, Tally] | None = None,
              live: Mapping[EndpointKey, tuple[int, int]] | None = None,
              keys: Iterable[Key] | None = None) -> Json:
    """The endpoints of every proxied service, like ``kubectl get endpoints``.

    ``addresses`` lists the ready endpoints in the order kubectl prints them
    (port by port, then address); ``endpoints`` has every endpoint with its
    conditions and its ``traffic`` (:class:`uproxy.connections.Tally` counters,
    bytes including those of connections still open). The age is the oldest
    endpoint object's (slice or Endpoints). ``keys``: only these services (one page),
    in this order.
    """
    tallies = tallies or {}
    live = live or {}
    grouped: dict[Key, list[Entry]] = {}
    for name, entry in served.items():
        grouped.setdefault(name.service, []).append(entry)
    wanted = list(sorted(grouped) if keys is None else keys)
    chosen = set(wanted)
    created: dict[Key, float] = {}
    for kind, raw in (("EndpointSlice", raw_slices), ("Endpoints", raw_endpoints)):
        for key, obj in raw.items():
            service = key
            if kind == "EndpointSlice":
                label = _mapping(_mapping(obj.get("metadata")).get("labels")).get(
                    SERVICE_NAME_LABEL)
                service = (key[0], str(label or ""))
            if service not in chosen:
                continue
            when = _created(obj, kind, key, seen)
            if when is not None and (service not in created or when < created[service]):
                created[service] = when
    items = []
    for key in wanted:
        if key not in grouped:
            continue
        addresses: list[str] = []
        eps: list[Json] = []
        for entry in grouped[key]:
            for ep in entry.endpoints:
                eps.append({
                    "ip": ep.ip, "port": ep.port, "portName": entry.port.name.port,
                    "protocol": entry.port.protocol, "ready": ep.ready, "serving": ep.serving,
                    "terminating": ep.terminating, "nodeName": ep.node_name, "zone": ep.zone,
                    "service": str(entry.port.name),
                    "traffic": traffic(tallies.get((entry.port.name, ep.address)),
                                       live.get((entry.port.name, ep.address))),
                })
                if ep.ready:
                    addresses.append(str(ep))
        when = created.get(key)
        if when is None and key in raw_services:
            when = _created(raw_services[key], "Service", key, seen)
        items.append({
            "namespace": key[0],
            "name": key[1],
            "addresses": addresses,
            "endpoints": eps,
            "created": format_timestamp(when) if when is not None else None,
            "age": _age(when, now),
        })
    return {"kind": "EndpointsList", "items": items}


def endpoints_column(addresses: list[str], *, limit: int | None = ENDPOINTS_SHOWN) -> str:
    """``a,b,c + 2 more...`` as kubectl prints it; ``<none>`` when empty."""
    if not addresses:
        return "<none>"
    if limit is None or len(addresses) <= limit:
        return ",".join(addresses)
    return ",".join(addresses[:limit]) + f" + {len(addresses) - limit} more..."


def rules(redirects: Iterable[Redirect], listeners: Iterable[tuple[str, str, str, int]]) -> Json:
    """The uproxy lines as ``iptables-save`` shows them, and every socket uproxy listens on.

    ``listeners`` are ``(service, scope, address, port)``.
    """
    ordered = sorted(redirects)
    return {
        "table": "nat",
        "chain": CHAIN,
        # Exactly what iptables-save shows, including the never-matching rule that keeps
        # NAT of open connections alive (see uproxy.rules).
        "lines": [*(render_rule(r) for r in ordered if r.family == 4), KEEP_NAT_V4],
        # the same for IPv6, as ``ip6tables-save`` shows it
        "lines6": [*(render_rule(r) for r in ordered if r.family == 6), KEEP_NAT_V6],
        "redirects": [{
            "service": str(r.name), "kind": r.kind, "address": r.address, "port": r.port,
            "protocol": r.protocol, "toPort": r.to_port,
        } for r in ordered],
        "listeners": [{"service": s, "scope": scope, "address": a, "port": p}
                      for s, scope, a, p in sorted(listeners)],
    }


def matches(service: ServicePortName, wanted: str) -> bool:
    """The connection filter: ``ns/name:port``, ``ns/name`` or a bare ``name``."""
    if not wanted:
        return True
    return wanted in (str(service), f"{service.namespace}/{service.name}", service.name)
