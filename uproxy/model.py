"""Pure data: what a Service port and its endpoints are, built from Kubernetes objects.

This module only turns plain ``dict`` objects (as YAML, JSON or the API give
them) into frozen values, and reports what it cannot use as :class:`Problem`
values naming the origin, the object and the field. It does no I/O and keeps
no state, so both sources (files and the API) and the tests share it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import types
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard, TypeVar

DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, as the API server defaults it
PROXIED_PROTOCOLS = ("TCP", "UDP")
KNOWN_PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
#: A Service carrying this label belongs to the proxy it names (kube-proxy ignores it).
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
#: A Service carrying this label (any value) is not proxied, whatever its clusterIP.
HEADLESS_LABEL = "service.kubernetes.io/headless"

Obj = Mapping[str, Any]


_T = TypeVar("_T")


def quick_init(cls: type[_T]) -> type[_T]:
    """Give a frozen, slotted dataclass an ``__init__`` that fills the slots through their
    descriptors, with the same parameters, defaults and ``__post_init__`` call.

    The generated one calls ``object.__setattr__`` per field (frozen), ~2.5x slower; a
    start with 10,000 Services makes ~100,000 of these values (issue 16's start-up).
    Only plain defaults: a field with a default factory or keyword-only is refused.
    """
    env: dict[str, Any] = {}
    params, body = [], []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        slot = cls.__dict__.get(f.name)
        if (not isinstance(slot, types.MemberDescriptorType) or f.kw_only is True
                or f.default_factory is not dataclasses.MISSING):
            raise TypeError(f"quick_init: {cls.__name__}.{f.name} is not a plain slot field")
        env[f"_set_{f.name}"] = slot.__set__
        if f.default is not dataclasses.MISSING:
            env[f"_default_{f.name}"] = f.default
        if not f.init:
            body.append(f"_set_{f.name}(self, _default_{f.name})")
            continue
        params.append(f.name if f.default is dataclasses.MISSING
                      else f"{f.name}=_default_{f.name}")
        body.append(f"_set_{f.name}(self, {f.name})")
    if hasattr(cls, "__post_init__"):
        body.append("self.__post_init__()")
    source = f"def __init__(self, {', '.join(params)}):\n" + "".join(
        f"    {line}\n" for line in body)
    exec(source, env)  # (as dataclasses itself makes __init__)
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


@dataclass(frozen=True, slots=True)
class Problem:
    """Something in the input uproxy cannot use: one line naming file, object and field."""

    origin: str
    obj: str
    field: str
    message: str

    def __str__(self) -> str:
        parts = [p for p in (self.origin, self.obj, self.field) if p]
        return ": ".join([*parts, self.message])


@quick_init
@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """``namespace/name:port`` — the key of everything (kube-proxy's ServicePortName)."""

    namespace: str
    name: str
    port: str
    protocol: str = "TCP"
    # The hash, computed once: the key of every table is hashed at each lookup, and the
    # generated __hash__ builds a tuple in Python each time (~3x the cost of a lookup).
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash",
                           hash((self.namespace, self.name, self.port, self.protocol)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[ServicePortName], tuple[str, str, str, str]]:
        # (built again where it is unpickled: another process hashes strings differently)
        return (ServicePortName, (self.namespace, self.name, self.port, self.protocol))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port}"

    @property
    def service(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@quick_init
@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of one Service, with everything the proxy needs to serve it."""

    name: ServicePortName
    type: str
    cluster_ips: tuple[str, ...]
    port: int
    protocol: str
    target_port: int | str
    node_port: int | None = None
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    affinity_timeout: int | None = None  # seconds; None = no session affinity
    internal_local: bool = False  # internalTrafficPolicy: Local
    external_local: bool = False  # externalTrafficPolicy: Local
    traffic_distribution: str | None = None  # spec.trafficDistribution (see uproxy.topology)
    #: spec.healthCheckNodePort of a LoadBalancer with externalTrafficPolicy Local, else None
    health_check_node_port: int | None = None
    #: spec.loadBalancerSourceRanges, normalised; () = every source (also for 0.0.0.0/0)
    source_ranges: tuple[str, ...] = ()

    @property
    def external_addresses(self) -> tuple[str, ...]:
        return self.external_ips + self.load_balancer_ips


@quick_init
@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One backend address for one service port, with its EndpointSlice conditions."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: tuple[str, ...] = ()  # hints.forZones[].name
    node_hints: tuple[str, ...] = ()  # hints.forNodes[].name

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"


@quick_init
@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int
    protocol: str


@quick_init
@dataclass(frozen=True, slots=True)
class EndpointSet:
    """Endpoints of one service from one object (a slice, or a v1 Endpoints subset)."""

    namespace: str
    service: str
    address_type: str  # IPv4 | IPv6
    ports: tuple[SlicePort, ...]
    endpoints: tuple[Endpoint, ...]
    trigger_time: str | None = None


@dataclass(slots=True)
class Parsed:
    """What parsing one object gave: the values and the problems, never an exception."""

    ports: list[ServicePort] = field(default_factory=list)
    endpoint_sets: list[EndpointSet] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # debug-level notes (headless, ...)
    proxy_name: str | None = None  # a Service's service-proxy-name label (None: absent)
    node_zone: str | None = None  # a Node's topology.kubernetes.io/zone label
    node_ips: tuple[str, ...] = ()  # a Node's primary IPs, one per family (node_host_ips)


def is_mapping(value: object) -> TypeGuard[Mapping[str, Any]]:
    """``isinstance(value, Mapping)``, with the plain dict that JSON and YAML give first:
    the ABC check costs 130 ns, this 20 ns, and a list of 10,000 services makes 260,000."""
    return type(value) is dict or isinstance(value, Mapping)


def object_ref(obj: Obj) -> str:
    """``Kind namespace/name`` for messages, tolerant of anything."""
    kind = obj.get("kind") if is_mapping(obj) else None
    meta = obj.get("metadata") if is_mapping(obj) else None
    name = ns = None
    if is_mapping(meta):
        name = meta.get("name")
        ns = meta.get("namespace") or "default"
    return f"{kind or 'object'} {ns or 'default'}/{name or '?'}"


class _Bad(Exception):
    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(message)
        self.field_path = field_path
        self.message = message


def _meta(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata")
    if not is_mapping(meta):
        raise _Bad("metadata", "missing")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise _Bad("metadata.name", "missing")
    ns = meta.get("namespace") or "default"
    if not isinstance(ns, str):
        raise _Bad("metadata.namespace", "must be a string")
    return ns, name


def _port_number(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        else:
            raise _Bad(where, f"{value!r} is not a port number")
    number = int(value)
    if not 1 <= number <= 65535:
        raise _Bad(where, f"{number} is outside 1-65535")
    return number


def _protocol(value: Any, where: str) -> str:
    proto = "TCP" if value is None else value
    if proto not in KNOWN_PROTOCOLS:
        raise _Bad(where, f"unknown protocol {proto!r} (TCP, UDP or SCTP)")
    return str(proto)


def _ip(value: Any, where: str) -> str:
    """A canonical IP string. inet_pton, not ``ipaddress``: 10x faster at 10,000 services."""
    if isinstance(value, str):  # not ints: 1 would become 0.0.0.1
        family = socket.AF_INET6 if ":" in value else socket.AF_INET
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, value))
        except (OSError, ValueError):
            pass
    raise _Bad(where, f"{value!r} is not an IP address")


def _optional_str(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _Bad(where, "must be a string")
    return value


def _ip_list(values: Any, where: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if not isinstance(values, list):
        raise _Bad(where, "must be a list")
    return tuple(_ip(v, f"{where}[{i}]") for i, v in enumerate(values))


def parse_service(obj: Obj, origin: str = "") -> Parsed:
    """A v1 Service -> its proxied ports; bad ports are skipped with a Problem each."""
    if type(obj) is dict:
        fast = _service_fast(obj)
        if fast is not None:
            return fast
    return _parse_service(obj, origin)


def _service_fast(obj: dict[str, Any]) -> Parsed | None:
    """:func:`_parse_service` for the common shapes (plain dicts, well-formed, TCP/UDP
    ports), or None for anything else, which the full parser then handles with its
    messages. Same values (tests/core/test_model.py compares both); a start with 10,000
    Services parses them ~2x faster (issue 16's start-up)."""
    meta = obj.get("metadata")
    spec = obj.get("spec")
    if type(meta) is not dict or type(spec) is not dict:
        return None
    name = meta.get("name")
    ns = meta.get("namespace") or "default"
    if type(name) is not str or not name or type(ns) is not str:
        return None
    proxy_name = None
    labels = meta.get("labels")
    if labels:
        if type(labels) is not dict or HEADLESS_LABEL in labels:
            return None
        value = labels.get(PROXY_NAME_LABEL)
        proxy_name = None if value is None else str(value)
    svc_type = spec.get("type") or "ClusterIP"
    if svc_type != "ClusterIP" and svc_type != "NodePort" and svc_type != "LoadBalancer":
        return None
    ips = spec.get("clusterIPs")
    if ips is None:
        one = spec.get("clusterIP")
        if type(one) is not str or not one:
            return None
        ips = (one,)
    elif type(ips) is not list or not ips:
        return None
    try:
        cluster_ips = tuple(_canonical_ip(ip) for ip in ips)  # ("None": ValueError)
        external_ips = _ip_list(spec.get("externalIPs"), "spec.externalIPs")
        lb_ips = _lb_ips(obj) if obj.get("status") else ()
        affinity = (None if spec.get("sessionAffinity") in (None, "None")
                    else _affinity(spec))
        ranges = spec.get("loadBalancerSourceRanges")
        source_ranges = () if ranges is None else _source_ranges(ranges)
    except (_Bad, OSError, ValueError, TypeError):
        return None
    internal_local = spec.get("internalTrafficPolicy") == "Local"
    external_local = spec.get("externalTrafficPolicy") == "Local"
    traffic_distribution = spec.get("trafficDistribution")
    if traffic_distribution is not None and type(traffic_distribution) is not str:
        return None
    hc_port = None
    if svc_type == "LoadBalancer" and external_local and spec.get("healthCheckNodePort"):
        hc_port = spec["healthCheckNodePort"]
        if type(hc_port) is not int or not 1 <= hc_port <= 65535:
            return None
    ports = spec.get("ports")
    if type(ports) is not list or not ports:
        return None
    several = len(ports) > 1
    node_ports = svc_type != "ClusterIP"
    out = Parsed(proxy_name=proxy_name)
    seen_names: set[str] = set()
    seen_ports: set[tuple[int, str]] = set()
    for p in ports:
        if type(p) is not dict:
            return None
        port_name = p.get("name") or ""
        number = p.get("port")
        proto = p.get("protocol")
        if proto is None:
            proto = "TCP"
        target = p.get("targetPort", number)
        if (type(port_name) is not str or (several and not port_name)
                or port_name in seen_names or type(number) is not int
                or not 1 <= number <= 65535 or (proto != "TCP" and proto != "UDP")
                or (number, proto) in seen_ports):
            return None
        if type(target) is int:
            if not 1 <= target <= 65535:
                return None
        elif type(target) is not str or (target.isascii() and target.isdigit()):
            return None
        node_port = p.get("nodePort") if node_ports else None
        if node_port is not None and (type(node_port) is not int
                                      or not 1 <= node_port <= 65535):
            return None
        seen_names.add(port_name)
        seen_ports.add((number, proto))
        out.ports.append(ServicePort(
            ServicePortName(ns, name, port_name, proto), svc_type, cluster_ips, number, proto,
            target, node_port, external_ips, lb_ips, affinity, internal_local, external_local,
            traffic_distribution, hc_port, source_ranges))
    return out


def _canonical_ip(value: str) -> str:
    """:func:`_ip` without its message: raises (OSError, ValueError, TypeError)."""
    family = socket.AF_INET6 if ":" in value else socket.AF_INET
    return socket.inet_ntop(family, socket.inet_pton(family, value))


def _parse_service(obj: Obj, origin: str) -> Parsed:
    """:func:`parse_service` for any input: the reference, with a Problem per mistake."""
    out = Parsed()
    try:
        ns, name = _meta(obj)
        spec = obj.get("spec")
        if not is_mapping(spec):
            raise _Bad("spec", "missing")
        labels = obj["metadata"].get("labels") or {}
        if is_mapping(labels):
            if HEADLESS_LABEL in labels:
                out.skipped.append(f"{object_ref(obj)}: labelled {HEADLESS_LABEL}; not proxied")
                return out
            proxy_name = labels.get(PROXY_NAME_LABEL)
            out.proxy_name = None if proxy_name is None else str(proxy_name)
        svc_type = spec.get("type") or "ClusterIP"
        if svc_type not in SERVICE_TYPES:
            raise _Bad("spec.type", f"unknown type {svc_type!r} ({', '.join(SERVICE_TYPES)})")
        if svc_type == "ExternalName":
            out.skipped.append(f"{object_ref(obj)}: ExternalName services are not proxied")
            return out
        cluster_ips = _cluster_ips(spec)
        if cluster_ips is None:
            out.skipped.append(
                f"{object_ref(obj)}: headless (clusterIP: None) services are not proxied")
            return out
        external_ips = _ip_list(spec.get("externalIPs"), "spec.externalIPs")
        lb_ips = _lb_ips(obj)
        affinity = _affinity(spec)
        internal_local = spec.get("internalTrafficPolicy") == "Local"
        external_local = spec.get("externalTrafficPolicy") == "Local"
        traffic_distribution = _optional_str(spec.get("trafficDistribution"),
                                             "spec.trafficDistribution")
        source_ranges = _source_ranges(spec.get("loadBalancerSourceRanges"))
        hc_port = None  # kube-proxy's NeedsHealthCheck: LoadBalancer + Local only
        if svc_type == "LoadBalancer" and external_local and spec.get("healthCheckNodePort"):
            hc_port = _port_number(spec["healthCheckNodePort"], "spec.healthCheckNodePort")
        ports = spec.get("ports")
        if not isinstance(ports, list) or not ports:
            raise _Bad("spec.ports", "missing or empty")
    except _Bad as bad:
        out.problems.append(Problem(origin, object_ref(obj), bad.field_path, bad.message))
        return out

    seen_names: set[str] = set()
    seen_ports: set[tuple[int, str]] = set()
    for i, p in enumerate(ports):
        where = f"spec.ports[{i}]"
        try:
            if not is_mapping(p):
                raise _Bad(where, "must be a mapping")
            port_name = p.get("name") or ""
            if not isinstance(port_name, str):
                raise _Bad(f"{where}.name", "must be a string")
            if len(ports) > 1 and not port_name:
                raise _Bad(f"{where}.name", "required when a service has several ports")
            if port_name in seen_names:
                raise _Bad(f"{where}.name", f"duplicate port name {port_name!r}")
            number = _port_number(p.get("port"), f"{where}.port")
            proto = _protocol(p.get("protocol"), f"{where}.protocol")
            if (number, proto) in seen_ports:
                raise _Bad(f"{where}.port", f"duplicate {proto} port {number}")
            target = p.get("targetPort", number)
            if isinstance(target, str) and not (target.isascii() and target.isdigit()):
                target_port: int | str = target
            else:
                target_port = _port_number(target, f"{where}.targetPort")
            node_port = None
            if svc_type in ("NodePort", "LoadBalancer") and p.get("nodePort") is not None:
                node_port = _port_number(p.get("nodePort"), f"{where}.nodePort")
            seen_names.add(port_name)
            seen_ports.add((number, proto))
            if proto not in PROXIED_PROTOCOLS:
                out.problems.append(
                    Problem(origin, object_ref(obj), f"{where}.protocol",
                            f"{proto} is not supported; skipped")
                )
                continue
            out.ports.append(
                ServicePort(
                    name=ServicePortName(ns, name, port_name, proto),
                    type=str(svc_type),
                    cluster_ips=cluster_ips,
                    port=number,
                    protocol=proto,
                    target_port=target_port,
                    node_port=node_port,
                    external_ips=external_ips,
                    load_balancer_ips=lb_ips,
                    affinity_timeout=affinity,
                    internal_local=internal_local,
                    external_local=external_local,
                    traffic_distribution=traffic_distribution,
                    health_check_node_port=hc_port,
                    source_ranges=source_ranges,
                )
            )
        except _Bad as bad:
            out.problems.append(Problem(origin, object_ref(obj), bad.field_path, bad.message))
    return out


def _cluster_ips(spec: Mapping[str, Any]) -> tuple[str, ...] | None:
    ips = spec.get("clusterIPs")
    if ips is None:
        one = spec.get("clusterIP")
        ips = [] if one in (None, "") else [one]
    if not isinstance(ips, list):
        raise _Bad("spec.clusterIPs", "must be a list")
    if any(ip == "None" for ip in ips):
        return None
    if not ips:
        raise _Bad("spec.clusterIP", "missing (manifests must name the ClusterIP)")
    field_name = "spec.clusterIPs" if "clusterIPs" in spec else "spec.clusterIP"
    return tuple(_ip(ip, field_name) for ip in ips)


def _lb_ips(obj: Obj) -> tuple[str, ...]:
    status = obj.get("status")
    if not is_mapping(status):
        return ()
    lb = status.get("loadBalancer")
    if not is_mapping(lb):
        return ()
    ingress = lb.get("ingress") or []
    if not isinstance(ingress, list):
        raise _Bad("status.loadBalancer.ingress", "must be a list")
    out = []
    for i, entry in enumerate(ingress):
        # ipMode Proxy: the load balancer proxies to the NodePorts; the IP is not captured
        if is_mapping(entry) and entry.get("ip") and entry.get("ipMode") != "Proxy":
            out.append(_ip(entry["ip"], f"status.loadBalancer.ingress[{i}].ip"))
    return tuple(out)


def _source_ranges(value: Any) -> tuple[str, ...]:
    """``loadBalancerSourceRanges``: trimmed CIDRs; a zero CIDR among them allows all (())."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Bad("spec.loadBalancerSourceRanges", "must be a list")
    out = []
    for i, text in enumerate(value):
        try:
            net = ipaddress.ip_network(str(text).strip(), strict=False)
        except ValueError:
            raise _Bad(f"spec.loadBalancerSourceRanges[{i}]",
                       f"{text!r} is not a CIDR") from None
        if net.prefixlen == 0:
            return ()
        out.append(str(net))
    return tuple(out)


def _affinity(spec: Mapping[str, Any]) -> int | None:
    mode = spec.get("sessionAffinity") or "None"
    if mode == "None":
        return None
    if mode != "ClientIP":
        raise _Bad("spec.sessionAffinity", f"unknown value {mode!r} (None or ClientIP)")
    cfg = spec.get("sessionAffinityConfig") or {}
    client = cfg.get("clientIP") if is_mapping(cfg) else None
    timeout = client.get("timeoutSeconds") if is_mapping(client) else None
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 < timeout <= 86400:
        raise _Bad(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            f"{timeout!r} is outside 1-86400",
        )
    return timeout


def parse_endpoint_slice(obj: Obj, origin: str = "") -> Parsed:
    """A discovery.k8s.io/v1 EndpointSlice -> one EndpointSet (FQDN slices are ignored)."""
    if type(obj) is dict:
        fast = _slice_fast(obj)
        if fast is not None:
            return fast
    return _parse_endpoint_slice(obj, origin)


def _slice_fast(obj: dict[str, Any]) -> Parsed | None:
    """:func:`_parse_endpoint_slice` for the common shapes, or None (as
    :func:`_service_fast`)."""
    meta = obj.get("metadata")
    if type(meta) is not dict:
        return None
    name = meta.get("name")
    ns = meta.get("namespace") or "default"
    labels = meta.get("labels")
    if type(name) is not str or not name or type(ns) is not str or type(labels) is not dict:
        return None
    service = labels.get(SERVICE_NAME_LABEL)
    addr_type = obj.get("addressType") or "IPv4"
    if type(service) is not str or not service or (addr_type != "IPv4" and addr_type != "IPv6"):
        return None
    raw_ports = obj.get("ports")
    if raw_ports is not None and type(raw_ports) is not list:
        return None
    ports = []
    for p in raw_ports or ():
        if type(p) is not dict:
            return None
        port_name = p.get("name") or ""
        number = p.get("port")
        proto = p.get("protocol")
        if proto is None:
            proto = "TCP"
        if (type(port_name) is not str or type(number) is not int
                or not 1 <= number <= 65535 or proto not in KNOWN_PROTOCOLS):
            return None
        ports.append(SlicePort(port_name, number, proto))
    raw = obj.get("endpoints") or ()
    if type(raw) is not list and raw != ():
        return None
    family = socket.AF_INET6 if addr_type == "IPv6" else socket.AF_INET
    endpoints = []
    try:
        for ep in raw:
            if type(ep) is not dict:
                return None
            addresses = ep.get("addresses")
            if type(addresses) is not list or not addresses:
                return None
            cond = ep.get("conditions") or {}
            node = ep.get("nodeName")
            zone = ep.get("zone")
            if (type(cond) is not dict or (node is not None and type(node) is not str)
                    or (zone is not None and type(zone) is not str)):
                return None
            ready = cond.get("ready") is not False
            serving_raw = cond.get("serving")
            hints = ep.get("hints")
            zone_hints, node_hints = ((), ()) if hints is None else _hints(hints, "")
            endpoints.append(Endpoint(
                socket.inet_ntop(family, socket.inet_pton(family, addresses[0])), 0, ready,
                ready if serving_raw is None else serving_raw is not False,
                cond.get("terminating") is True, node, zone, zone_hints, node_hints))
    except (_Bad, OSError, ValueError, TypeError):
        return None  # (an address of the other family fails inet_pton: the message says so)
    annotations = meta.get("annotations")
    trigger = None
    if annotations:
        if type(annotations) is not dict:
            return None
        value = annotations.get("endpoints.kubernetes.io/last-change-trigger-time")
        trigger = value if type(value) is str else None
    out = Parsed()
    out.endpoint_sets.append(
        EndpointSet(ns, service, addr_type, tuple(ports), tuple(endpoints), trigger))
    return out


def _parse_endpoint_slice(obj: Obj, origin: str) -> Parsed:
    """:func:`parse_endpoint_slice` for any input: the reference, with a Problem per mistake."""
    out = Parsed()
    try:
        ns, _name = _meta(obj)
        labels = obj["metadata"].get("labels") or {}
        service = labels.get(SERVICE_NAME_LABEL) if is_mapping(labels) else None
        if not isinstance(service, str) or not service:
            raise _Bad(f"metadata.labels[{SERVICE_NAME_LABEL}]", "missing")
        addr_type = obj.get("addressType") or "IPv4"
        if addr_type == "FQDN":
            out.skipped.append(f"{object_ref(obj)}: FQDN slices are not proxied")
            return out
        if addr_type not in ("IPv4", "IPv6"):
            raise _Bad("addressType", f"unknown value {addr_type!r}")
        ports = tuple(_slice_ports(obj.get("ports"), "ports"))
        endpoints: list[Endpoint] = []
        raw = obj.get("endpoints") or []
        if not isinstance(raw, list):
            raise _Bad("endpoints", "must be a list")
        for i, ep in enumerate(raw):
            where = f"endpoints[{i}]"
            try:
                endpoints.extend(_slice_endpoint(ep, where, addr_type))
            except _Bad as bad:
                out.problems.append(Problem(origin, object_ref(obj), bad.field_path, bad.message))
        annotations = obj["metadata"].get("annotations") or {}
        trigger = None
        if is_mapping(annotations):
            value = annotations.get("endpoints.kubernetes.io/last-change-trigger-time")
            trigger = value if isinstance(value, str) else None
        out.endpoint_sets.append(
            EndpointSet(ns, service, addr_type, ports, tuple(endpoints), trigger)
        )
    except _Bad as bad:
        out.problems.append(Problem(origin, object_ref(obj), bad.field_path, bad.message))
    return out


def _slice_ports(raw: Any, where: str) -> Iterator[SlicePort]:
    if raw is None:
        return
    if not isinstance(raw, list):
        raise _Bad(where, "must be a list")
    for i, p in enumerate(raw):
        if not is_mapping(p):
            raise _Bad(f"{where}[{i}]", "must be a mapping")
        name = p.get("name") or ""
        number = _port_number(p.get("port"), f"{where}[{i}].port")
        proto = _protocol(p.get("protocol"), f"{where}[{i}].protocol")
        yield SlicePort(str(name), number, proto)


def _slice_endpoint(ep: Any, where: str, addr_type: str) -> Iterator[Endpoint]:
    if not is_mapping(ep):
        raise _Bad(where, "must be a mapping")
    addresses = ep.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        raise _Bad(f"{where}.addresses", "missing")
    cond = ep.get("conditions") or {}
    if not is_mapping(cond):
        raise _Bad(f"{where}.conditions", "must be a mapping")
    # API semantics: a nil ready means ready; serving defaults to ready.
    ready = cond.get("ready") is not False
    serving_raw = cond.get("serving")
    serving = ready if serving_raw is None else serving_raw is not False
    terminating = cond.get("terminating") is True
    node = _optional_str(ep.get("nodeName"), f"{where}.nodeName")
    zone = _optional_str(ep.get("zone"), f"{where}.zone")
    # Only the first address is used, as kube-proxy does.
    ip = _ip(addresses[0], f"{where}.addresses[0]")
    if (":" in ip) != (addr_type == "IPv6"):
        raise _Bad(f"{where}.addresses[0]", f"{ip} is not {addr_type}")
    zone_hints, node_hints = _hints(ep.get("hints"), f"{where}.hints")
    yield Endpoint(ip, 0, ready, serving, terminating, node, zone, zone_hints, node_hints)


def _hints(raw: Any, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``hints.forZones[].name`` and ``hints.forNodes[].name``."""
    if raw is None:
        return (), ()
    if not is_mapping(raw):
        raise _Bad(where, "must be a mapping")
    out: list[tuple[str, ...]] = []
    for key in ("forZones", "forNodes"):
        items = raw.get(key) or []
        if not isinstance(items, list):
            raise _Bad(f"{where}.{key}", "must be a list")
        names = []
        for i, item in enumerate(items):
            name = item.get("name") if is_mapping(item) else None
            if not isinstance(name, str) or not name:
                raise _Bad(f"{where}.{key}[{i}].name", "missing")
            names.append(name)
        out.append(tuple(names))
    return out[0], out[1]


ZONE_LABEL = "topology.kubernetes.io/zone"


def parse_node(obj: Obj, origin: str = "") -> Parsed:
    """A v1 Node -> its zone label (topology); the rest of a Node is not used."""
    out = Parsed()
    try:
        _meta(obj)
        labels = obj["metadata"].get("labels") or {}
        zone = labels.get(ZONE_LABEL) if is_mapping(labels) else None
        out.node_zone = _optional_str(zone, f"metadata.labels[{ZONE_LABEL}]")
        out.node_ips = node_host_ips(obj)
    except _Bad as bad:
        out.problems.append(Problem(origin, object_ref(obj), bad.field_path, bad.message))
    return out


def node_host_ips(node: Obj) -> tuple[str, ...]:
    """A Node's primary IP of each family, primary family first (kube-proxy's
    ``GetNodeHostIPs``): ``status.addresses``, InternalIP before ExternalIP."""
    status = node.get("status")
    addresses = status.get("addresses") if is_mapping(status) else None
    if not isinstance(addresses, list):
        return ()
    out: dict[bool, str] = {}
    for wanted in ("InternalIP", "ExternalIP"):
        for a in addresses:
            if is_mapping(a) and a.get("type") == wanted:
                try:
                    ip = _ip(a.get("address"), "status.addresses")
                except _Bad:
                    continue
                out.setdefault(":" in ip, ip)
    return tuple(out.values())


def parse_endpoints(obj: Obj, origin: str = "") -> Parsed:
    """A v1 Endpoints (hand-written for selector-less services) -> EndpointSets per subset."""
    out = Parsed()
    try:
        ns, name = _meta(obj)
        subsets = obj.get("subsets") or []
        if not isinstance(subsets, list):
            raise _Bad("subsets", "must be a list")
        for i, subset in enumerate(subsets):
            where = f"subsets[{i}]"
            if not is_mapping(subset):
                raise _Bad(where, "must be a mapping")
            ports = tuple(_slice_ports(subset.get("ports"), f"{where}.ports"))
            eps: list[Endpoint] = []
            for key, ready in (("addresses", True), ("notReadyAddresses", False)):
                addrs = subset.get(key) or []
                if not isinstance(addrs, list):
                    raise _Bad(f"{where}.{key}", "must be a list")
                for j, addr in enumerate(addrs):
                    if not is_mapping(addr):
                        raise _Bad(f"{where}.{key}[{j}]", "must be a mapping")
                    ip = _ip(addr.get("ip"), f"{where}.{key}[{j}].ip")
                    node = _optional_str(addr.get("nodeName"), f"{where}.{key}[{j}].nodeName")
                    eps.append(Endpoint(ip, 0, ready, ready, False, node, None))
            by_family: dict[str, list[Endpoint]] = {}
            for ep in eps:
                by_family.setdefault("IPv6" if ":" in ep.ip else "IPv4", []).append(ep)
            for family, members in by_family.items():
                out.endpoint_sets.append(EndpointSet(ns, name, family, ports, tuple(members)))
    except _Bad as bad:
        out.problems.append(Problem(origin, object_ref(obj), bad.field_path, bad.message))
    return out


def resolve_endpoints(port: ServicePort, sets: Iterable[EndpointSet]) -> tuple[Endpoint, ...]:
    """The endpoints of one service port: slice ports matched by name and protocol.

    The target port comes from the slice (per endpoint set), not from the Service.
    Only sets of the service's families (those of its ClusterIPs) are used; each
    family's traffic then chooses among its own (:func:`uproxy.balance.usable_endpoints`).
    """
    ips = port.cluster_ips
    families: Collection[str]
    if len(ips) == 1:  # (most: no set to build)
        families = ("IPv6",) if ":" in ips[0] else ("IPv4",)
    else:
        families = {"IPv6" if ":" in ip else "IPv4" for ip in ips} or {"IPv4"}
    found: dict[tuple[str, int], Endpoint] = {}
    port_name, protocol = port.name.port, port.protocol
    for s in sets:
        if s.address_type not in families:
            continue
        for sp in s.ports:
            if sp.name == port_name and sp.protocol == protocol:
                number = sp.port
                for ep in s.endpoints:
                    address = (ep.ip, number)
                    prev = found.get(address)
                    # Duplicates across slices: a ready copy wins.
                    if prev is None or (ep.ready and not prev.ready):
                        found[address] = Endpoint(
                            ep.ip, number, ep.ready, ep.serving, ep.terminating, ep.node_name,
                            ep.zone, ep.zone_hints, ep.node_hints)
    # (sorted by address: the order of Endpoint's fields, as each address is there once)
    return tuple(map(found.__getitem__, sorted(found)))
