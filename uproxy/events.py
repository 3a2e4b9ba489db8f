"""What changed and when: a bounded log of the daemon's events (pure).

The status page and ``/api/v1/events`` show it, newest last, each event with
its time, its object and a short message, after ``kubectl get events``:

- ``ServiceAdded`` / ``ServiceRemoved`` / ``ServiceChanged`` (a service port)
  and ``EndpointAdded`` / ``EndpointRemoved`` / ``EndpointChanged`` (its
  conditions), from the table diff of each sync (:meth:`EventLog.table_changed`);
  a diff of more than :data:`BULK` ports is one summary event, so a first
  sync of 10,000 Services does not wash the log out;
- ``Synced`` with the sync's duration when something changed or the sync was
  slow (:meth:`EventLog.synced`);
- ``RulesRepaired`` (a log call with ``extra=RULES_REPAIRED``), ``Takeover``
  (:meth:`EventLog.takeover`) and anything else through :meth:`EventLog.add`;
- ``Warning`` / ``Error``: every warning or error uproxy logs (a port in use, a
  refused API request, an iptables failure) through :class:`LogHandler`,
  attached to the ``uproxy`` logger while the daemon runs. A log call can name
  the event with ``extra={"event": kind, "object": obj}``.

The same event again (kind, object and message) within the last few is
counted (``count``, ``firstTime``), not repeated, as Kubernetes aggregates
events. Memory is bounded by ``capacity`` events.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from uproxy.state import Entry, TableDiff

CAPACITY = 1000
BULK = 50  # a diff with more service ports than this is one summary event
COALESCE = 8  # the same event among the last this many is counted, not repeated
SLOW_SYNC = 1.0  # seconds: a sync this slow is logged even when nothing changed
# ``extra=`` of the log call that says the daemon put back hooks someone deleted.
RULES_REPAIRED = {"event": "RulesRepaired", "object": "iptables nat hooks"}
NFT_REPAIRED = {"event": "RulesRepaired", "object": "nftables tables"}


@dataclass(slots=True)
class Event:
    seq: int
    time: float
    kind: str
    object: str
    message: str
    level: str = "info"  # info | warning | error
    count: int = 1
    first_time: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": round(self.time, 3),
                "firstTime": round(self.first_time or self.time, 3), "kind": self.kind,
                "object": self.object, "message": self.message, "level": self.level,
                "count": self.count}


class EventLog:
    def __init__(self, capacity: int = CAPACITY,
                 clock: Callable[[], float] = time.time) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self.clock = clock
        self.handler = LogHandler(self)
        # A log record may come from another thread (an executor): adds and reads take turns.
        self._lock = threading.Lock()

    def add(self, kind: str, obj: str, message: str, level: str = "info") -> Event:
        with self._lock:
            return self._add(kind, obj, message, level)

    def _add(self, kind: str, obj: str, message: str, level: str) -> Event:
        now = self.clock()
        for recent in itertools.islice(reversed(self._events), COALESCE):
            if (recent.kind, recent.object, recent.message) == (kind, obj, message):
                recent.count += 1
                recent.first_time = recent.first_time or recent.time
                recent.time = now
                recent.seq = next(self._seq)  # it is news again: streams after a seq see it
                self._events.remove(recent)
                self._events.append(recent)
                return recent
        event = Event(next(self._seq), now, kind, obj, message, level)
        self._events.append(event)
        return event

    def __len__(self) -> int:
        return len(self._events)

    def items(self, *, since: int = 0, limit: int | None = None,
              kinds: Iterable[str] = ()) -> list[Event]:
        """Oldest first; ``since`` keeps events after that seq, ``limit`` the newest n."""
        wanted = set(kinds)
        with self._lock:
            out = [e for e in self._events
                   if e.seq > since and (not wanted or e.kind in wanted)]
        return out[-limit:] if limit is not None else out

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._events[-1].seq if self._events else 0

    # Hooks (one line each in the daemon) --------------------------------------------------
    def table_changed(self, diff: TableDiff) -> None:
        """Service ports and endpoints added, removed or changed by one sync."""
        total = len(diff.added) + len(diff.removed) + len(diff.changed)
        if total > BULK:
            self.add("ServicesChanged", f"{total} service ports",
                     f"+{len(diff.added)} -{len(diff.removed)} ~{len(diff.changed)} "
                     "(too many to list one by one)")
            return
        for entry in diff.added:
            self.add("ServiceAdded", _service(entry),
                     f"{len(entry.endpoints)} endpoints: {_addresses(entry)}")
        for entry in diff.removed:
            self.add("ServiceRemoved", _service(entry), "no longer proxied")
        for old, new in diff.changed:
            self._changed(old, new)

    def _changed(self, old: Entry, new: Entry) -> None:
        if old.port != new.port:
            self.add("ServiceChanged", _service(new), "service spec changed")
        before = {ep.address: ep for ep in old.endpoints}
        after = {ep.address: ep for ep in new.endpoints}
        name = str(new.port.name)
        for address, ep in after.items():
            was = before.get(address)
            if was is None:
                self.add("EndpointAdded", f"Endpoint {ep} of {name}", _conditions(ep))
            elif was != ep:
                self.add("EndpointChanged", f"Endpoint {ep} of {name}",
                         f"{_conditions(was)} -> {_conditions(ep)}")
        for address, ep in before.items():
            if address not in after:
                self.add("EndpointRemoved", f"Endpoint {ep} of {name}", "removed")

    def synced(self, diff: TableDiff, seconds: float, ports: int) -> None:
        """A sync finished: logged when it changed something or was slow."""
        if diff or seconds >= SLOW_SYNC:
            self.add("Synced", f"{ports} service ports",
                     f"+{len(diff.added)} -{len(diff.removed)} ~{len(diff.changed)} "
                     f"in {seconds * 1000:.1f} ms", "warning" if seconds >= SLOW_SYNC else "info")

    def takeover(self, obj: str, message: str) -> None:
        """A takeover step (the takeover code calls this: handed over, taken over, failed)."""
        self.add("Takeover", obj, message)


_SERVICE_PREFIX = re.compile(r"^(?:Service )?([\w.-]+/[\w.-]+(?::[\w.-]+)?)[: ]")


class LogHandler(logging.Handler):
    """Warnings and errors logged by uproxy, as ``Warning``/``Error`` events.

    The object is the ``object`` a log call passes in ``extra``, else the
    service the message starts with (``ns/name:port: ...`` or ``Service
    ns/name...``), else the logger's name.
    """

    def __init__(self, log: EventLog) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is not worth an event
            return
        kind = getattr(record, "event", None) or (
            "Error" if record.levelno >= logging.ERROR else "Warning")
        obj = getattr(record, "object", None)
        if obj is None:
            match = _SERVICE_PREFIX.match(message)
            obj = f"Service {match.group(1)}" if match else record.name
        self.log.add(str(kind), str(obj), message.split("\n", 1)[0][:500],
                     "error" if record.levelno >= logging.ERROR else "warning")


def _service(entry: Entry) -> str:
    return f"Service {entry.port.name}"


def _addresses(entry: Entry, shown: int = 5) -> str:
    names = [str(ep) for ep in entry.endpoints]
    if not names:
        return "<none>"
    more = f" + {len(names) - shown} more" if len(names) > shown else ""
    return ",".join(names[:shown]) + more


def _conditions(ep: Any) -> str:
    flags = [name for name in ("ready", "serving", "terminating") if getattr(ep, name)]
    return ",".join(flags) or "not ready"
