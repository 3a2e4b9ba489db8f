"""TCP connection set-up as a state machine: which endpoint next, which timeout, when to give up.

An accepted client is connected to an endpoint by up to four attempts with
growing timeouts (250 ms, 500 ms, 1 s, 2 s: kube-proxy's userspace mode), each
to an endpoint not tried yet when the balancer has one; when there is no
usable endpoint, or every attempt fails, the client gets a RST at once, never
a hang. When opening the backend socket fails because the process is out of
file descriptors, the client waits (in steps of :data:`FD_RETRY`, at most
:data:`FD_WAIT` seconds) rather than being refused at once.

The decisions live here, without a socket: :class:`ConnectionSetup` takes
events and returns actions, and the caller (``uproxy/proxy/tcp.py``) does the
I/O, asks the balancer when told to (:class:`Choose`) and feeds back what
happened. The clock comes in with the events that need it. This machine is
the reference a C implementation of the set-up must match.

Transitions (``T`` = :data:`CONNECT_TIMEOUTS`; ``n`` = attempts that got a
socket so far, ``len(tried)``; ``ep`` = the endpoint being tried; ``why`` =
the error text, "timed out" for TimedOut; an event a state does not list is
refused with :class:`ValueError`)::

  state       event                 if                  actions                          next
  ----------  --------------------  ------------------  -------------------------------  ----------
  start       Start(None)                               Reset(no_endpoints)              done
  start       Start(ep)                                 Connect(ep, T[0])                connecting
  connecting  Connected                                 MarkSucceeded(ep), Relay(ep)     done
  connecting  ConnectFailed(why)    n + 1 < len(T)      MarkFailed(ep, why),             choosing
              or TimedOut                               Choose(tried + [ep])
  connecting  ConnectFailed(why)    n + 1 == len(T)     MarkFailed(ep, why),             done
              or TimedOut                               Reset(all_failed)
  connecting  NoSocket(now, fds,    fds and now <       WaitForFds(FD_RETRY, why)        waiting
              why)                  deadline (*)
  connecting  NoSocket(...)         otherwise           Reset(no_socket, why)            done
  waiting     WaitOver                                  Connect(ep, T[n])                connecting
  choosing    Chosen(None)                              Reset(all_failed)                done
  choosing    Chosen(ep2)                               Connect(ep2, T[n])               connecting
  not done    Abort                                     Reset(cancelled)                 done

  (*) deadline = now + FD_WAIT, set by the first NoSocket with fds of an episode.

Counting: an attempt counts (``n`` grows, ``ep`` joins ``tried``) when its
socket was opened and the connect ended in ConnectFailed or TimedOut; a
NoSocket attempt does not count, and the retry after WaitOver uses the same
timeout. A ConnectFailed or TimedOut also ends an out-of-fds episode: the next
NoSocket starts a new FD_WAIT deadline. ``tried`` (the Choose exclusion list)
is in the order tried. MarkFailed is where the caller drops the endpoint's
affinity pins; the Choose that follows must see that.
"""

from __future__ import annotations

from dataclasses import dataclass

from uproxy.model import Endpoint

CONNECT_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
"""Seconds each attempt may take; also the number of attempts."""
FD_WAIT = 2.0
"""How long an accepted client may wait for a backend socket when fds run out."""
FD_RETRY = 0.05
"""Seconds between socket attempts while fds run out (a quarter of the listener's accept pause)."""

# Why a set-up ended without a relay (Reset.reason).
NO_ENDPOINTS = "no_endpoints"  # the balancer had nothing for the first attempt
ALL_FAILED = "all_failed"  # every attempt failed, or no endpoint was left to try
NO_SOCKET = "no_socket"  # the backend socket could not be opened (detail: the error)
CANCELLED = "cancelled"  # Abort (shutdown)


# ---- events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """The balancer's first choice for the accepted client (None: nothing usable)."""

    endpoint: Endpoint | None


@dataclass(frozen=True, slots=True)
class Connected:
    """The connect of the current attempt completed."""


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """The connect of the current attempt failed (``reason``: the error text)."""

    reason: str


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The current attempt's timeout expired before the connect completed."""


@dataclass(frozen=True, slots=True)
class Chosen:
    """The balancer's answer to :class:`Choose` (None: nothing left to try)."""

    endpoint: Endpoint | None


@dataclass(frozen=True, slots=True)
class NoSocket:
    """The backend socket could not be opened; ``out_of_fds`` for EMFILE and kin."""

    now: float
    out_of_fds: bool
    reason: str


@dataclass(frozen=True, slots=True)
class WaitOver:
    """The :class:`WaitForFds` delay passed."""


@dataclass(frozen=True, slots=True)
class Abort:
    """Shutdown: stop connecting."""


Event = Start | Connected | ConnectFailed | TimedOut | Chosen | NoSocket | WaitOver | Abort

# One instance each of the events without fields (they carry nothing to vary).
CONNECTED = Connected()
TIMED_OUT = TimedOut()
WAIT_OVER = WaitOver()
ABORT = Abort()


# ---- actions ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a socket and connect it to ``endpoint``; TimedOut after ``timeout`` seconds."""

    endpoint: Endpoint
    timeout: float


@dataclass(frozen=True, slots=True)
class MarkSucceeded:
    """Tell the balancer ``endpoint`` accepted a connection."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class MarkFailed:
    """Tell the balancer (and the metrics) ``endpoint`` failed; its affinity pins go."""

    endpoint: Endpoint
    reason: str


@dataclass(frozen=True, slots=True)
class Choose:
    """Ask the balancer for another endpoint, not one of ``exclude``; answer with Chosen."""

    exclude: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class WaitForFds:
    """Out of fds: pause accepting, come back with WaitOver after ``delay`` seconds."""

    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class Relay:
    """Connected: hand the client and the backend socket to the relay."""

    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class Reset:
    """Give up: RST the client (``reason``: one of the module's reason constants)."""

    reason: str
    detail: str = ""


Action = Connect | MarkSucceeded | MarkFailed | Choose | WaitForFds | Relay | Reset


class ConnectionSetup:
    """The set-up of one accepted client's connection (see the module docstring's table)."""

    __slots__ = ("endpoint", "fd_deadline", "state", "timeouts", "tried")

    def __init__(self, timeouts: tuple[float, ...] = CONNECT_TIMEOUTS) -> None:
        self.timeouts = timeouts
        self.state = "start"
        self.endpoint: Endpoint | None = None  # the one being tried (or waited for)
        self.tried: list[Endpoint] = []  # attempts that got a socket, in order
        self.fd_deadline: float | None = None

    @property
    def done(self) -> bool:
        return self.state == "done"

    def handle(self, event: Event) -> list[Action]:
        state = self.state
        if isinstance(event, Abort) and state != "done":
            return self._end(Reset(CANCELLED))
        if state == "connecting":
            endpoint = self.endpoint
            assert endpoint is not None
            if isinstance(event, Connected):
                self.state = "done"
                return [MarkSucceeded(endpoint), Relay(endpoint)]
            if isinstance(event, ConnectFailed | TimedOut):
                reason = event.reason if isinstance(event, ConnectFailed) else "timed out"
                self.tried.append(endpoint)
                self.fd_deadline = None
                failed = MarkFailed(endpoint, reason)
                if len(self.tried) < len(self.timeouts):
                    self.state = "choosing"
                    return [failed, Choose(tuple(self.tried))]
                self.state = "done"
                return [failed, Reset(ALL_FAILED)]
            if isinstance(event, NoSocket):
                if event.out_of_fds:
                    if self.fd_deadline is None:
                        self.fd_deadline = event.now + FD_WAIT
                    if event.now < self.fd_deadline:
                        self.state = "waiting"
                        return [WaitForFds(FD_RETRY, event.reason)]
                return self._end(Reset(NO_SOCKET, event.reason))
        elif (state == "choosing" and isinstance(event, Chosen)) \
                or (state == "start" and isinstance(event, Start)):
            if event.endpoint is None:
                return self._end(Reset(NO_ENDPOINTS if state == "start" else ALL_FAILED))
            return self._connect(event.endpoint)
        elif state == "waiting" and isinstance(event, WaitOver):
            assert self.endpoint is not None
            return self._connect(self.endpoint)
        raise ValueError(f"connection set-up: {type(event).__name__} in state {state}")

    def _connect(self, endpoint: Endpoint) -> list[Action]:
        self.state = "connecting"
        self.endpoint = endpoint
        return [Connect(endpoint, self.timeouts[len(self.tried)])]

    def _end(self, reset: Reset) -> list[Action]:
        self.state = "done"
        return [reset]
