"""The UDP flow table's order: which flow is idlest, which expire, which to evict.

Pure bookkeeping (the caller closes what it is handed), so that expiry and
eviction are O(1) each and testable without a socket. One ``OrderedDict``
over every flow of every listener, touched on every datagram in either
direction:

* idle flows expire after ``--udp-timeout`` (default 30 s). Why 30 s: it is
  the kernel's own timeout for an unreplied UDP conntrack entry, so uproxy
  never forgets a flow the kernel still maps. kube-proxy's old userspace mode
  used 250 ms, which broke DNS through forwarders: a reply that takes longer
  than the timeout (a forwarder asking upstream) arrives after the backend
  socket is closed and is lost. A long timeout costs one socket per idle flow,
  bounded by the table size;
* the table is bounded (``max_flows``). When it is full, the least recently
  used flow is evicted if it has been idle at least ``evict_min_idle`` (1 s);
  otherwise the new client's datagram is dropped -- what the kernel does when
  its conntrack table is full -- so a flood of new source ports can neither
  grow memory nor cut off flows that are in use (a request in flight would
  lose its reply if its flow were evicted).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

EVICT_MIN_IDLE = 1.0


class Timed(Protocol):
    last: float


F = TypeVar("F", bound=Timed)


class FlowLru(Generic[F]):
    """Flows in least-recently-used order, bounded; pure bookkeeping (the caller closes).

    ``touch`` on every datagram keeps the order equal to the order of
    ``last`` (as long as time does not go backwards), so the oldest flow is
    always first: expiry pops from the front until it meets a live one.
    """

    def __init__(self, max_flows: int, *, evict_min_idle: float = EVICT_MIN_IDLE) -> None:
        if max_flows < 1:
            raise ValueError(f"max_flows must be at least 1, got {max_flows}")
        self.max_flows = max_flows
        self.evict_min_idle = evict_min_idle
        self._order: OrderedDict[F, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, flow: object) -> bool:
        return flow in self._order

    def __iter__(self) -> Iterator[F]:
        return iter(list(self._order))

    @property
    def full(self) -> bool:
        return len(self._order) >= self.max_flows

    def oldest(self) -> F | None:
        return next(iter(self._order), None)

    def victim(self, now: float) -> F | None:
        """The flow to evict to make room (the oldest, if idle long enough), or None."""
        oldest = self.oldest()
        if oldest is not None and now - oldest.last >= self.evict_min_idle:
            return oldest
        return None

    def add(self, flow: F, now: float) -> None:
        """Insert a new flow; the caller made room first (``full``/``victim``)."""
        if len(self._order) >= self.max_flows:
            raise OverflowError("flow table full")
        flow.last = now
        self._order[flow] = None

    def touch(self, flow: F, now: float) -> None:
        flow.last = now
        self._order.move_to_end(flow)

    def remove(self, flow: F) -> None:
        self._order.pop(flow, None)

    def expired(self, now: float, timeout: float) -> list[F]:
        """Remove and return the flows idle for ``timeout`` or longer, oldest first."""
        out: list[F] = []
        order = self._order
        while order:
            flow = next(iter(order))
            if now - flow.last < timeout:
                break
            del order[flow]
            out.append(flow)
        return out

    def next_expiry(self, timeout: float) -> float | None:
        oldest = self.oldest()
        return None if oldest is None else oldest.last + timeout
