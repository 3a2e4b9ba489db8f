"""The UDP new-flow and refused-flow decisions, as a machine that takes events and
returns actions (mitmproxy's ``proxy/layers`` idea): no socket, no loop, no clock.

Why a machine: these branches (no service, full table with or without a victim,
no endpoint, out of descriptors, an endpoint that refuses, the one retry of a
refused datagram) are the ones a lab rarely reaches, and each has a consequence
worth a test (what is dropped and counted under which reason, which endpoint is
avoided, which flow closes). :class:`~uproxy.proxy.udp.proxy.UdpProxy` drives
it: it feeds an event, performs the actions in order, and answers the last one
(``Choose``, ``Open``) with the next event. The byte path never sees it: a
datagram of a known flow goes straight to the flow's socket.

Setting up a flow for a client's first datagram::

    NewClient -> Drop("no_service") | Drop("table_full")
              |  [Evict(victim)], Choose
    Chosen    -> Drop("no_endpoints") | Open(endpoint)
    Opened    -> Established(endpoint)
    OpenFailed-> [Log(warning, once)], Drop("no_fds")             (out of descriptors)
              |  MarkFailed(endpoint), Drop("connect_failed")     (any other errno)

A send or receive on an existing flow's backend socket failing::

    BackendFailed -> MarkFailed(endpoint, refused=True), Log(debug), Close("endpoint refused")
                        (ECONNREFUSED: the endpoint answered with ICMP port unreachable)
                  |  Log(info), Close(strerror)                  (anything else)
                  then Retry when a datagram is left unsent and is not a retry itself:
                  the driver sets up a new flow (another endpoint: the refusing one is
                  avoided) and sends that datagram once more; it is never retried twice.

Out of descriptors does not mark the endpoint (it is not the endpoint's fault) and
warns once until a flow opens again.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Generic, TypeVar

from uproxy.model import Endpoint

OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

V = TypeVar("V")


# Events ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NewClient(Generic[V]):
    """A datagram from a client with no flow on its listener (or a refused one to retry)."""

    has_service: bool  # the listener's service port is in the current entries
    table_full: bool
    victim: V | None = None  # when full: the idle flow the table would give up, if any


@dataclass(frozen=True, slots=True)
class Chosen:
    """The balancer's answer to :class:`Choose`: an endpoint, or None (none usable)."""

    endpoint: Endpoint | None


@dataclass(frozen=True, slots=True)
class Opened:
    """The connected backend socket for :class:`Open` exists."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class OpenFailed:
    """Opening the backend socket for :class:`Open` failed with ``errno``."""

    endpoint: Endpoint
    errno: int
    strerror: str
    flows: int  # flows held now (for the message)


@dataclass(frozen=True, slots=True)
class BackendFailed:
    """A send to, or a receive from, an existing flow's endpoint failed with ``errno``."""

    endpoint: Endpoint
    errno: int
    strerror: str
    service: str
    unsent: bool = False  # a datagram of the client was not sent (and could be retried)
    retried: bool = False  # that datagram was already the retry
    closed: bool = False  # the flow was closed already (nothing to close or mark)


Event = NewClient[V] | Chosen | Opened | OpenFailed | BackendFailed


# Actions -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Drop:
    """Drop the datagram and count it under ``reason``; the set-up ends."""

    reason: str


@dataclass(frozen=True, slots=True)
class Evict(Generic[V]):
    """Close ``victim`` (reason "evicted") and count the eviction."""

    victim: V


@dataclass(frozen=True, slots=True)
class Choose:
    """Ask the balancer for an endpoint; answer with :class:`Chosen`."""


@dataclass(frozen=True, slots=True)
class Open:
    """Open a connected backend socket to ``endpoint``; answer with Opened/OpenFailed."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class Established:
    """The flow to ``endpoint`` is set up: register it and send the datagram."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class MarkFailed:
    """Tell the balancer to avoid ``endpoint`` (and drop the client's pin to it);
    ``refused``: it refused a datagram (counted as an endpoint failure)."""

    endpoint: Endpoint
    refused: bool = False


@dataclass(frozen=True, slots=True)
class Close:
    """Close the flow the event was about, with ``reason``."""

    reason: str


@dataclass(frozen=True, slots=True)
class Retry:
    """Set up a new flow for the unsent datagram (a NewClient event) and send it once."""


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    message: str


Action = Drop | Evict[V] | Choose | Open | Established | MarkFailed | Close | Retry | Log


class FlowSetup(Generic[V]):
    """The decisions; its only memory is whether the out-of-descriptors warning was given."""

    def __init__(self) -> None:
        self.fds_warned = False

    def handle(self, event: Event[V]) -> list[Action[V]]:
        match event:
            case NewClient():
                return self._new_client(event)
            case Chosen(endpoint=None):
                return [Drop("no_endpoints")]
            case Chosen(endpoint=Endpoint() as endpoint):
                return [Open(endpoint)]
            case Opened(endpoint=endpoint):
                self.fds_warned = False
                return [Established(endpoint)]
            case OpenFailed():
                return self._open_failed(event)
            case BackendFailed():
                return self._backend_failed(event)
        raise TypeError(f"not a flow set-up event: {event!r}")

    @staticmethod
    def _new_client(event: NewClient[V]) -> list[Action[V]]:
        if not event.has_service:
            return [Drop("no_service")]
        if event.table_full:
            if event.victim is None:  # everyone active: drop newcomers, as a full conntrack
                return [Drop("table_full")]
            return [Evict(event.victim), Choose()]
        return [Choose()]

    def _open_failed(self, event: OpenFailed) -> list[Action[V]]:
        if event.errno in OUT_OF_FDS:
            actions: list[Action[V]] = []
            if not self.fds_warned:
                self.fds_warned = True
                actions.append(Log(logging.WARNING,
                                   f"out of file descriptors for UDP flows ({event.strerror}, "
                                   f"{event.flows} flows); dropping new flows"))
            actions.append(Drop("no_fds"))
            return actions
        return [MarkFailed(event.endpoint), Drop("connect_failed")]

    @staticmethod
    def _backend_failed(event: BackendFailed) -> list[Action[V]]:
        actions: list[Action[V]] = []
        if not event.closed:
            if event.errno == errno.ECONNREFUSED:
                actions += [MarkFailed(event.endpoint, refused=True),
                            Log(logging.DEBUG, f"{event.service}: {event.endpoint} refused a "
                                               "datagram (port unreachable)"),
                            Close("endpoint refused")]
            else:
                actions += [Log(logging.INFO, f"{event.service}: relaying to {event.endpoint} "
                                              f"failed: {event.strerror}"),
                            Close(event.strerror)]
        if event.unsent and not event.retried:
            actions.append(Retry())
        return actions
