"""Pure state: Kubernetes objects in, the desired proxy table out.

Sources (files, the API) feed :class:`Store` with whole objects, one at a time
(``apply``/``remove``, as watch events arrive) or as a complete snapshot of a
kind (``replace``, after a list or a re-read of the manifests). The store
keeps the parsed values and bumps :attr:`Store.generation` on every real
change; the daemon asks for :meth:`Store.table` when it syncs and diffs it
against what it serves with :func:`diff_tables`. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from uproxy.model import (
    Endpoint,
    EndpointSet,
    Obj,
    Parsed,
    Problem,
    ServicePort,
    ServicePortName,
    parse_endpoint_slice,
    parse_endpoints,
    parse_service,
    resolve_endpoints,
)

KINDS = ("Service", "EndpointSlice", "Endpoints")
_PARSERS = {
    "Service": parse_service,
    "EndpointSlice": parse_endpoint_slice,
    "Endpoints": parse_endpoints,
}

Key = tuple[str, str]  # (namespace, name)


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
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        return None
    return (str(meta.get("namespace") or "default"), str(meta["name"]))


class Store:
    """Parsed objects by kind and key; answers with the desired table."""

    def __init__(self) -> None:
        self._objects: dict[str, dict[Key, Parsed]] = {k: {} for k in KINDS}
        self._raw: dict[str, dict[Key, Obj]] = {k: {} for k in KINDS}
        self.generation = 0
        self._table: Table | None = None
        self._table_generation = -1

    def apply(self, kind: str, obj: Obj, origin: str = "") -> list[Problem]:
        """Add or update one object; returns the problems parsing found (already skipped)."""
        parser = _PARSERS.get(kind)
        key = key_of(obj)
        if parser is None or key is None:
            ref = f"{kind} ?"
            return [Problem(origin, ref, "metadata.name", "missing")] if parser else []
        if self._raw[kind].get(key) == obj:
            return []
        parsed = parser(obj, origin)
        self._objects[kind][key] = parsed
        self._raw[kind][key] = obj
        self.generation += 1
        return parsed.problems

    def remove(self, kind: str, namespace: str, name: str) -> bool:
        key = (namespace or "default", name)
        if self._objects.get(kind, {}).pop(key, None) is None:
            return False
        self._raw[kind].pop(key, None)
        self.generation += 1
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
            problems.extend(self.apply(kind, obj, origin))
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

    def table(self) -> Table:
        """The desired table: every proxied service port with its endpoints (cached)."""
        if self._table is not None and self._table_generation == self.generation:
            return self._table
        slices: dict[Key, list[EndpointSet]] = {}
        for parsed in self._objects["EndpointSlice"].values():
            for s in parsed.endpoint_sets:
                slices.setdefault((s.namespace, s.service), []).append(s)
        legacy: dict[Key, list[EndpointSet]] = {}
        for parsed in self._objects["Endpoints"].values():
            for s in parsed.endpoint_sets:
                legacy.setdefault((s.namespace, s.service), []).append(s)
        table: Table = {}
        for key, parsed in sorted(self._objects["Service"].items()):
            # When both exist for a service, EndpointSlices win.
            sets = slices.get(key) or legacy.get(key) or []
            for port in parsed.ports:
                table[port.name] = Entry(port, resolve_endpoints(port, sets))
        self._table = table
        self._table_generation = self.generation
        return table


def diff_tables(
    old: Mapping[ServicePortName, Entry], new: Mapping[ServicePortName, Entry]
) -> TableDiff:
    out = TableDiff()
    for name, entry in new.items():
        prev = old.get(name)
        if prev is None:
            out.added.append(entry)
        elif prev != entry:
            out.changed.append((prev, entry))
    out.removed.extend(entry for name, entry in old.items() if name not in new)
    return out
