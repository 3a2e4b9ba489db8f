"""Pure state: Kubernetes objects in, the desired proxy table out.

Sources (files, the API) feed :class:`Store` with whole objects, one at a time
(``apply``/``remove``, as watch events arrive) or as a complete snapshot of a
kind (``replace``, after a list or a re-read of the manifests). The store
keeps the parsed values and bumps :attr:`Store.generation` on every real
change; the daemon asks which services changed (:meth:`Store.take_changed`)
when it syncs and diffs only those against what it serves (the table is kept
up to date incrementally). Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from uproxy.model import (
    Endpoint,
    EndpointSet,
    Obj,
    Parsed,
    Problem,
    ServicePort,
    ServicePortName,
    is_mapping,
    parse_endpoint_slice,
    parse_endpoints,
    parse_node,
    parse_service,
    quick_init,
    resolve_endpoints,
)
from uproxy.topology import synthesize_hints

KINDS = ("Service", "EndpointSlice", "Endpoints", "Node")
_PARSERS = {
    "Service": parse_service,
    "EndpointSlice": parse_endpoint_slice,
    "Endpoints": parse_endpoints,
    "Node": parse_node,
}

Key = tuple[str, str]  # (namespace, name)


@quick_init
@dataclass(frozen=True, slots=True)
class Entry:
    """One service port in the desired table, with its resolved endpoints."""

    port: ServicePort
    endpoints: tuple[Endpoint, ...]


Table = dict[ServicePortName, Entry]


@dataclass(slots=True)
class TableDiff:
    added: list[Entry] = field(default_factory=list)
    removed: list[Entry] = field(default_factory=list)
    changed: list[tuple[Entry, Entry]] = field(default_factory=list)  # (old, new)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def key_of(obj: Obj) -> Key | None:
    meta = obj.get("metadata") if is_mapping(obj) else None
    if not is_mapping(meta) or not isinstance(meta.get("name"), str):
        return None
    return (str(meta.get("namespace") or "default"), str(meta["name"]))


class Store:
    """Parsed objects by kind and key; answers with the desired table.

    The table is kept up to date incrementally: a change marks only the services
    it touches (a Service, its EndpointSlices by their service-name label, its v1
    Endpoints), and :meth:`table` recomputes just those. With 10,000 services an
    endpoint change costs one service's work, not 10,000's.
    """

    def __init__(self, *, proxy_name: str | None = None, synthesize_hints: bool = False) -> None:
        #: ``--service-proxy-name``: serve only Services whose service-proxy-name label
        #: equals it; None: only Services without that label (kube-proxy's rule).
        self.proxy_name = proxy_name or None
        #: Write topology hints from ``trafficDistribution`` where no slice carries any
        #: (no EndpointSlice controller: the manifests source). See uproxy.topology.
        self.synthesize_hints = synthesize_hints
        self._objects: dict[str, dict[Key, Parsed]] = {k: {} for k in KINDS}
        self._raw: dict[str, dict[Key, Obj]] = {k: {} for k in KINDS}
        self.generation = 0
        self._table: Table = {}
        self._ports: dict[Key, list[ServicePortName]] = {}  # service -> its names in _table
        self._slices_of: dict[Key, set[Key]] = {}  # service -> keys of its EndpointSlices
        self._dirty: set[Key] = set()  # services to recompute
        self._changed: set[Key] = set()  # services recomputed since take_changed()

    @staticmethod
    def _services_of(kind: str, key: Key, parsed: Parsed | None) -> set[Key]:
        if kind == "Service" or kind == "Endpoints":
            return {key}
        if parsed is None:
            return set()
        return {(s.namespace, s.service) for s in parsed.endpoint_sets}

    def _touch(self, kind: str, key: Key, old: Parsed | None, new: Parsed | None) -> None:
        if kind == "Service" or kind == "Endpoints":  # (_services_of: the key itself)
            self._dirty.add(key)
            self.generation += 1
            return
        before = self._services_of(kind, key, old)
        after = self._services_of(kind, key, new)
        if kind == "EndpointSlice":
            for svc in before - after:
                members = self._slices_of.get(svc)
                if members is not None:
                    members.discard(key)
                    if not members:
                        del self._slices_of[svc]
            for svc in after:
                self._slices_of.setdefault(svc, set()).add(key)
        self._dirty |= before | after
        self.generation += 1

    def apply(self, kind: str, obj: Obj, origin: str = "", *,
              key: Key | None = None) -> list[Problem]:
        """Add or update one object; returns the problems parsing found (already skipped).

        ``key``: ``key_of(obj)`` when the caller has it already."""
        parser = _PARSERS.get(kind)
        if key is None:
            key = key_of(obj)
        if parser is None or key is None:
            ref = f"{kind} ?"
            return [Problem(origin, ref, "metadata.name", "missing")] if parser else []
        if self._raw[kind].get(key) == obj:
            return []
        parsed = parser(obj, origin)
        old = self._objects[kind].get(key)
        self._objects[kind][key] = parsed
        self._raw[kind][key] = obj
        self._touch(kind, key, old, parsed)
        return parsed.problems

    def remove(self, kind: str, namespace: str, name: str) -> bool:
        key = (namespace or "default", name)
        old = self._objects.get(kind, {}).pop(key, None)
        if old is None:
            return False
        self._raw[kind].pop(key, None)
        self._touch(kind, key, old, None)
        return True

    def replace(self, kind: str, objs: Iterable[tuple[Obj, str]]) -> list[Problem]:
        """Make the objects of one kind exactly ``objs`` (a list, or manifests re-read).

        Objects not in ``objs`` are removed: this is how a re-list after ``410 Gone``
        applies deletions that happened while the watch was away.
        """
        problems: list[Problem] = []
        seen: set[Key] = set()
        for obj, origin in objs:
            key = key_of(obj)
            if key is not None:
                seen.add(key)
            problems.extend(self.apply(kind, obj, origin, key=key))
        for key in [k for k in self._objects[kind] if k not in seen]:
            self.remove(kind, *key)
        return problems

    def keys(self, kind: str) -> set[Key]:
        return set(self._objects[kind])

    def raw(self, kind: str) -> dict[Key, Obj]:
        return dict(self._raw[kind])

    def trigger_times(self) -> list[str]:
        """EndpointSlice last-change-trigger-time annotations currently held."""
        return [
            s.trigger_time
            for parsed in self._objects["EndpointSlice"].values()
            for s in parsed.endpoint_sets
            if s.trigger_time
        ]

    def trigger_times_of(self, service: Key) -> set[str]:
        """The trigger-time annotations of one service's EndpointSlices (what
        :meth:`trigger_times` holds for it)."""
        slices = self._objects["EndpointSlice"]
        return {s.trigger_time for sk in self._slices_of.get(service, ())
                for s in slices[sk].endpoint_sets
                if s.trigger_time and (s.namespace, s.service) == service}

    def _endpoint_sets(self, key: Key) -> list[EndpointSet]:
        # When both exist for a service, EndpointSlices win.
        slices = self._objects["EndpointSlice"]
        keys = self._slices_of.get(key)
        if keys is not None and len(keys) == 1:  # (most services: one slice of its own)
            (only,) = keys
            sets = [s for s in slices[only].endpoint_sets if (s.namespace, s.service) == key]
        else:
            sets = [s for sk in sorted(keys or ())
                    for s in slices[sk].endpoint_sets if (s.namespace, s.service) == key]
        if sets:
            return sets
        legacy = self._objects["Endpoints"].get(key)
        return list(legacy.endpoint_sets) if legacy is not None else []

    def table(self) -> Table:
        """The desired table: every proxied service port with its endpoints.

        The same dict object is updated in place; callers must not change it.
        """
        if not self._dirty:
            return self._table
        services = self._objects["Service"]
        table, ports_of, proxy_name = self._table, self._ports, self.proxy_name
        hints = self.synthesize_hints
        for key in self._dirty:  # (10,000 at a start: the loop's lookups are local)
            gone = ports_of.pop(key, None)
            if gone:
                for name in gone:
                    table.pop(name, None)
            parsed = services.get(key)
            if parsed is None or not parsed.ports or parsed.proxy_name != proxy_name:
                continue
            sets = self._endpoint_sets(key)
            names = []
            for port in parsed.ports:
                endpoints = resolve_endpoints(port, sets)
                if hints and port.traffic_distribution is not None:
                    endpoints = synthesize_hints(endpoints, port.traffic_distribution)
                table[port.name] = Entry(port, endpoints)
                names.append(port.name)
            ports_of[key] = names
        self._changed |= self._dirty
        self._dirty.clear()
        return self._table

    def take_changed(self) -> set[Key]:
        """Services whose table entries were recomputed since the last call."""
        self.table()
        changed, self._changed = self._changed, set()
        return changed

    def node_zone(self, name: str) -> str | None:
        """The zone label of the ``kind: Node`` object called ``name`` (manifests), if any."""
        parsed = self._objects["Node"].get(("default", name))
        return parsed.node_zone if parsed is not None else None

    def node_ips(self, name: str) -> tuple[str, ...]:
        """The primary IPs of the ``kind: Node`` object called ``name`` (manifests)."""
        parsed = self._objects["Node"].get(("default", name))
        return parsed.node_ips if parsed is not None else ()

    def ports_of(self, key: Key) -> list[ServicePortName]:
        self.table()
        return list(self._ports.get(key, ()))


def diff_ports(old: Mapping[ServicePortName, Entry], new: Mapping[ServicePortName, Entry],
               old_names: Iterable[ServicePortName], new_names: Collection[ServicePortName],
               into: TableDiff | None = None) -> TableDiff:
    """The one table diff: which of these service ports ``new`` added, removed or changed.

    ``old_names``/``new_names`` say which names to compare (keys of ``old`` and
    ``new``): the whole tables for :func:`diff_tables`, one service's ports for
    :meth:`Served.update`. ``into`` collects several calls in one diff.
    """
    out = TableDiff() if into is None else into
    out.removed.extend(old[name] for name in old_names if name not in new_names)
    for name in new_names:
        entry, prev = new[name], old.get(name)
        if prev is None:
            out.added.append(entry)
        elif prev != entry:
            out.changed.append((prev, entry))
    return out


def diff_tables(
    old: Mapping[ServicePortName, Entry], new: Mapping[ServicePortName, Entry]
) -> TableDiff:
    return diff_ports(old, new, old.keys(), new.keys())


class Served:
    """The table as last synced, kept up to date one service at a time.

    The daemon calls :meth:`update` with the services the store recomputed
    (:meth:`Store.take_changed`): only those are diffed, so an endpoint change
    among 10,000 services costs one service's work.
    """

    def __init__(self) -> None:
        self.table: Table = {}
        self._by_service: dict[Key, set[ServicePortName]] = {}

    def update(self, store: Store, services: Iterable[Key]) -> TableDiff:
        """Bring :attr:`table` up to date for these services; what was added/removed/changed."""
        table = store.table()
        diff = TableDiff()
        ports = store._ports  # (what ports_of copies, after the table() above)
        for key in services:
            old_names = self._by_service.pop(key, None)
            new_names = ports.get(key, ())
            if old_names is None:  # a service new here (a start has 10,000)
                if new_names:
                    for name in new_names:
                        entry = self.table[name] = table[name]
                        diff.added.append(entry)
                    self._by_service[key] = set(new_names)
                continue
            diff_ports(self.table, table, old_names, new_names, into=diff)
            for name in old_names:
                if name not in new_names:
                    del self.table[name]
            for name in new_names:
                self.table[name] = table[name]
            if new_names:
                self._by_service[key] = set(new_names)
        return diff
