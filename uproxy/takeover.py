"""Takeover: a new uproxy receives every socket of the running one (pure: format and steps).

The exchange, over the Unix socket in ``--state-dir`` (the edge doing the I/O is
:mod:`uproxy.proxy.handover`); the new process connects at its start and says
hello once its own source is loaded, so the old one serves until then::

    new -> old   hello    {version, netns}
    old -> new   refuse   {reason}                       (version or namespace differ: old
                                                           keeps serving, new exits 2)
    old          pauses: stops accepting and stops every reader of what it hands over
    old -> new   offer    {version, items, fds, batches}  (items: what each fd is)
    old -> new   fds      {index, count} + SCM_RIGHTS     (batches of at most 253 fds)
    new -> old   owned    {fds}                            (new holds a copy of every fd)
    old -> new   released {}                               (old closed its copies; exits 0)

Why these steps: the kernel keeps a socket alive while any process holds an fd
of it, so the receiver must own every fd before the sender closes any
(``owned`` is the commit point); a failure before it — the peer gone, a
timeout, a wrong count — makes the old process resume everything as it was,
and the new one, which touched nothing yet, exits with one line. The new one
starts using what it received only after ``released``: if the old one vanished
between ``owned`` and ``released`` it cannot tell whether the old one resumed,
so it refuses to serve the same sockets twice and exits.

Frames are a 4-byte big-endian length and a JSON object; fds ride on the
``fds`` frames (``SCM_RIGHTS`` carries at most 253 per message). Bytes that a
connection had already read but not yet written travel in its item (base64),
since they belong to the connection, not to the process.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
MAX_FDS_PER_MESSAGE = 253  # SCM_MAX_FD
MAX_FRAME = 256 << 20
SOCKET_NAME = "takeover.sock"
EXIT_REFUSED = 2
EXIT_FAILED = 1

_LEN = struct.Struct(">I")


# Frames ------------------------------------------------------------------------------------
def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"takeover frame of {len(body)} bytes is over the limit")
    return _LEN.pack(len(body)) + body


class FrameError(ValueError):
    pass


class FrameDecoder:
    """Bytes in, whole frames out (a frame may arrive in any number of pieces)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= _LEN.size:
            (size,) = _LEN.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise FrameError(f"frame of {size} bytes announced")
            if len(self._buf) < _LEN.size + size:
                break
            body = bytes(self._buf[_LEN.size:_LEN.size + size])
            del self._buf[:_LEN.size + size]
            try:
                message = json.loads(body)
            except ValueError as exc:
                raise FrameError(f"frame is not JSON: {exc}") from None
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                raise FrameError("frame without a type")
            out.append(message)
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def batches(total: int, limit: int = MAX_FDS_PER_MESSAGE) -> list[int]:
    """How many fds each ``fds`` frame carries: ``total`` split into runs of at most ``limit``."""
    if total < 0 or limit <= 0:
        raise ValueError("negative fd count or batch limit")
    return [min(limit, total - start) for start in range(0, total, limit)]


# Items: what each handed-over fd is --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Item:
    """One handed-over thing: its kind, what the receiver needs to know, and how many fds."""

    kind: str  # listener | server | tcp | udp
    meta: dict[str, Any] = field(default_factory=dict)
    fds: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "fds": self.fds, **self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Item:
        meta = {k: v for k, v in data.items() if k not in ("kind", "fds")}
        kind, fds = data.get("kind"), data.get("fds", 1)
        if not isinstance(kind, str) or not isinstance(fds, int) or fds < 0:
            raise FrameError(f"bad item {data!r}")
        return cls(kind, meta, fds)


def assign(items: Sequence[Item], fds: Sequence[int]) -> list[tuple[Item, list[int]]]:
    """Give each item its fds, in order; the counts must add up exactly."""
    need = sum(item.fds for item in items)
    if need != len(fds):
        raise FrameError(f"the offer names {need} fds, {len(fds)} arrived")
    out, at = [], 0
    for item in items:
        out.append((item, list(fds[at:at + item.fds])))
        at += item.fds
    return out


def pack_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unpack_bytes(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


# The old process's steps -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    netns: str


@dataclass(frozen=True, slots=True)
class Sent:
    fds: int  # how many fds went out


@dataclass(frozen=True, slots=True)
class Owned:
    fds: int


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str  # peer gone, timeout, bad frame, a send that failed


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str


@dataclass(frozen=True, slots=True)
class PauseAndOffer:
    """Stop accepting and reading, then send the offer and every fd; feed ``Sent`` after."""


@dataclass(frozen=True, slots=True)
class Resume:
    reason: str


@dataclass(frozen=True, slots=True)
class Release:
    """Close our copies without touching the sockets (no shutdown, no RST), say
    ``released`` and exit 0 without removing rules."""


GiverEvent = Hello | Sent | Owned | Failed
GiverAction = Refuse | PauseAndOffer | Resume | Release


class Giver:
    """The running process's side. States: serving -> offering -> offered -> released,
    back to serving on any failure before ``owned``."""

    def __init__(self, netns: str, version: int = VERSION) -> None:
        self.netns = netns
        self.version = version
        self.state = "serving"
        self.sent = 0

    def handle(self, event: GiverEvent) -> list[GiverAction]:
        state = self.state
        if isinstance(event, Hello):
            if state != "serving":
                return [Refuse("a takeover is already under way")]
            if event.version != self.version:
                return [Refuse(f"handover format {event.version} is not this uproxy's "
                               f"{self.version}; the running uproxy keeps serving")]
            if event.netns != self.netns:
                return [Refuse("the running uproxy is in another network namespace "
                               "(a state directory shared across namespaces)")]
            self.state = "offering"
            return [PauseAndOffer()]
        if isinstance(event, Sent):
            if state != "offering":
                return []
            self.state, self.sent = "offered", event.fds
            return []
        if isinstance(event, Owned):
            if state != "offered":
                return []
            if event.fds != self.sent:
                self.state = "serving"
                return [Resume(f"the new uproxy owns {event.fds} of {self.sent} fds")]
            self.state = "released"
            return [Release()]
        # Failed
        if state in ("offering", "offered"):
            self.state = "serving"
            return [Resume(event.reason)]
        return []


# The new process's steps -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NoPeer:
    stale: bool  # a socket file was there but nobody listened (a crashed uproxy)


@dataclass(frozen=True, slots=True)
class Connected:
    pass


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


@dataclass(frozen=True, slots=True)
class Offer:
    items: tuple[Item, ...]
    fds: int


@dataclass(frozen=True, slots=True)
class Batch:
    count: int  # fds that arrived with one frame


@dataclass(frozen=True, slots=True)
class Released:
    pass


@dataclass(frozen=True, slots=True)
class StartFresh:
    remove_stale: bool


@dataclass(frozen=True, slots=True)
class SendHello:
    version: int
    netns: str


@dataclass(frozen=True, slots=True)
class ConfirmOwned:
    fds: int


@dataclass(frozen=True, slots=True)
class Adopt:
    """Serve what came over (the old process let go of it)."""


@dataclass(frozen=True, slots=True)
class Exit:
    code: int
    line: str


TakerEvent = NoPeer | Connected | Refused | Offer | Batch | Released | Failed
TakerAction = StartFresh | SendHello | ConfirmOwned | Adopt | Exit


class Taker:
    """The starting process's side. States: connecting -> hello -> receiving ->
    confirming -> adopted (or fresh, or exited)."""

    def __init__(self, netns: str, version: int = VERSION) -> None:
        self.netns = netns
        self.version = version
        self.state = "connecting"
        self.expected = 0
        self.received = 0

    def _fail(self, line: str, code: int = EXIT_FAILED) -> list[TakerAction]:
        self.state = "exited"
        return [Exit(code, line)]

    def handle(self, event: TakerEvent) -> list[TakerAction]:
        state = self.state
        if isinstance(event, NoPeer) and state == "connecting":
            self.state = "fresh"
            return [StartFresh(remove_stale=event.stale)]
        if isinstance(event, Connected) and state == "connecting":
            self.state = "hello"
            return [SendHello(self.version, self.netns)]
        if isinstance(event, Refused) and state == "hello":
            return self._fail(f"takeover refused by the running uproxy: {event.reason}",
                              EXIT_REFUSED)
        if isinstance(event, Offer) and state == "hello":
            if sum(item.fds for item in event.items) != event.fds:
                return self._fail("takeover failed: the offer's fd count does not add up; "
                                  "the running uproxy keeps serving")
            self.state, self.expected = "receiving", event.fds
            return self._maybe_owned()
        if isinstance(event, Batch) and state == "receiving":
            self.received += event.count
            if self.received > self.expected:
                return self._fail(f"takeover failed: {self.received} fds arrived, "
                                  f"{self.expected} offered; the running uproxy keeps serving")
            return self._maybe_owned()
        if isinstance(event, Released) and state == "confirming":
            self.state = "adopted"
            return [Adopt()]
        if isinstance(event, Failed):
            if state == "confirming":
                return self._fail(f"takeover failed: the running uproxy did not confirm "
                                  f"({event.reason}); not serving its sockets twice")
            if state in ("hello", "receiving"):
                return self._fail(f"takeover failed: {event.reason}; "
                                  f"the running uproxy keeps serving")
            return []
        return self._fail(f"takeover failed: unexpected {type(event).__name__.lower()} "
                          f"while {state}; the running uproxy keeps serving")

    def _maybe_owned(self) -> list[TakerAction]:
        if self.received < self.expected:
            return []
        self.state = "confirming"
        return [ConfirmOwned(self.received)]
