"""Traffic over time: bounded rings of per-second samples, per service port (pure).

The status server samples the connection table's running totals once a
second (:meth:`Series.sample`) and this module turns them into what the page
charts: new connections/s, bytes/s each way (rates from monotonic counters,
with Prometheus's reset rule: a counter that went down started again from
zero), open connections and UDP flows (gauges, as read).

Memory is bounded whatever the cluster does: each ring has a fixed capacity
(900 samples: 15 minutes at one a second), at most ``max_keys`` service ports
get rings of their own (the busiest first come first served; a port whose
rings stayed all zero for a whole window gives its place up), and the
``total`` series always sums every service port, tracked or not.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

CAPACITY = 900  # 15 minutes at one sample a second
MAX_KEYS = 200
TOTAL = "total"
FIELDS = ("connections", "bytesUp", "bytesDown", "open", "udpFlows")


class Ring:
    """A fixed-capacity ring of floats: appending past capacity drops the oldest."""

    __slots__ = ("_data", "_next", "_size")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a ring needs a capacity of at least 1")
        self._data = array("d", [0.0]) * capacity
        self._next = 0
        self._size = 0

    @property
    def capacity(self) -> int:
        return len(self._data)

    def append(self, value: float) -> None:
        self._data[self._next] = value
        self._next = (self._next + 1) % len(self._data)
        self._size = min(self._size + 1, len(self._data))

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[float]:
        """Oldest first."""
        cap = len(self._data)
        start = (self._next - self._size) % cap
        for i in range(self._size):
            yield self._data[(start + i) % cap]

    def values(self) -> list[float]:
        return list(self)

    def last(self) -> float | None:
        return self._data[(self._next - 1) % len(self._data)] if self._size else None


@dataclass(frozen=True, slots=True)
class Counters:
    """One service port's readings at one instant: three counters and two gauges."""

    opened: int = 0  # connections and UDP flows since start (counter)
    bytes_up: int = 0  # counter, client to backend
    bytes_down: int = 0  # counter
    open: int = 0  # gauge: TCP connections open now
    flows: int = 0  # gauge: UDP flows held now

    def __add__(self, other: Counters) -> Counters:
        return Counters(self.opened + other.opened, self.bytes_up + other.bytes_up,
                        self.bytes_down + other.bytes_down, self.open + other.open,
                        self.flows + other.flows)


def increase(previous: int, current: int) -> int:
    """A counter's increase between two readings; a lower reading means it was reset."""
    return current - previous if current >= previous else current


class _Track:
    __slots__ = ("idle", "last", "rings")

    def __init__(self, capacity: int, filled: int) -> None:
        self.rings = {f: Ring(capacity) for f in FIELDS}
        for ring in self.rings.values():  # line up with the time ring: zeros before we knew
            for _ in range(filled):
                ring.append(0.0)
        self.last: Counters | None = None
        self.idle = 0  # samples in a row with nothing happening

    def add(self, counters: Counters, dt: float) -> None:
        last = self.last if self.last is not None else counters
        opened = increase(last.opened, counters.opened)
        up = increase(last.bytes_up, counters.bytes_up)
        down = increase(last.bytes_down, counters.bytes_down)
        values = (opened / dt, up / dt, down / dt, float(counters.open), float(counters.flows))
        for name, value in zip(FIELDS, values, strict=True):
            self.rings[name].append(value)
        self.last = counters
        self.idle = self.idle + 1 if not any(values) else 0


class Series:
    """Per service port rings of rates and gauges, one sample per :meth:`sample` call."""

    def __init__(self, capacity: int = CAPACITY, max_keys: int = MAX_KEYS) -> None:
        self.capacity = capacity
        self.max_keys = max_keys
        self.times = Ring(capacity)
        self._tracks: dict[str, _Track] = {}
        self._total = _Track(capacity, 0)
        self._total_last: dict[str, Counters] = {}  # every port's last reading, for the total
        self._last_time: float | None = None
        self.untracked = 0  # service ports over max_keys at the last sample

    def sample(self, now: float, readings: Mapping[str, Counters]) -> None:
        """Add one sample taken at ``now`` (seconds) of every service port's counters.

        A port missing from ``readings`` reads as zero (it was removed or pruned).
        """
        dt = 1.0 if self._last_time is None else max(now - self._last_time, 1e-3)
        self._last_time = now
        filled = len(self.times)
        self.times.append(now)
        # The total: the increase of each port's counters, summed (a port coming or going
        # does not make the total jump).
        previous = self._total_last
        opened = up = down = opened_gauge = flows = 0
        for key, c in readings.items():
            p = previous.get(key, c if self._total.last is None else Counters())
            opened += increase(p.opened, c.opened)
            up += increase(p.bytes_up, c.bytes_up)
            down += increase(p.bytes_down, c.bytes_down)
            opened_gauge += c.open
            flows += c.flows
        self._total_last = dict(readings)
        base = self._total.last or Counters()
        self._total.add(Counters(base.opened + opened, base.bytes_up + up,
                                 base.bytes_down + down, opened_gauge, flows), dt)
        self.untracked = 0
        for key, c in readings.items():
            track = self._tracks.get(key)
            if track is None:
                if len(self._tracks) >= self.max_keys:
                    self.untracked += 1
                    continue
                track = self._tracks[key] = _Track(self.capacity, filled)
                # The baseline: the port's reading at the last sample (it was tracked before
                # and gave its place up, or had none), zero if it had no reading then (its
                # connections are new); at the very first sample, the reading itself.
                if filled:
                    track.last = previous.get(key, Counters())
            track.add(c, dt)
        for key, track in list(self._tracks.items()):
            if key not in readings:
                track.add(Counters(), dt)
            if track.idle >= self.capacity:
                del self._tracks[key]

    def keys(self) -> list[str]:
        return sorted(self._tracks)

    def as_dict(self, wanted: str | None = None, *, items: bool = True) -> dict[str, Any]:
        """The JSON document: times (seconds since the epoch) and one value list per field.

        ``wanted`` keeps the service ports whose name matches (``ns/name:port``,
        ``ns/name`` or ``name``); ``total`` is always there, ``keys`` names every
        tracked port; ``items=False`` leaves the per-port lists out.
        """
        def fields(track: _Track) -> dict[str, list[float]]:
            return {f: [round(v, 3) for v in track.rings[f]] for f in FIELDS}

        keys = self.keys()
        found = [{"service": key, **fields(self._tracks[key])} for key in keys
                 if items and (not wanted or _matches(key, wanted))]
        return {"kind": "SeriesList", "interval": 1, "capacity": self.capacity,
                "times": [round(t, 3) for t in self.times], "total": fields(self._total),
                "keys": keys, "items": found, "untracked": self.untracked}


def _matches(key: str, wanted: str) -> bool:
    base = key.rsplit(":", 1)[0]
    return wanted in (key, base, base.split("/", 1)[-1])
