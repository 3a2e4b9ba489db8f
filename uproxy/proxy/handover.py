"""Takeover I/O: the Unix socket in ``--state-dir`` and the fds passed over it.

The steps and the format are :mod:`uproxy.takeover` (pure); this module does
what its machines say. The starting process's side is :func:`connect` at start
(is anyone running? its rules must then stay) and :meth:`Session.take` once its
own source is loaded, so the running one serves on while the new one loads;
:class:`HandoverServer` is the running process's side: it listens on
``<state-dir>/takeover.sock``, waits on the loop for the hello, then asks the
daemon (a :class:`Handing`) to settle its rules, pause, collect what it hands
over, and then either release or resume it.

Settling comes first, on the loop, while everything still serves: the rules work
already under way (an ``nft -f`` or ``iptables-restore`` whose process has
started) finishes and none starts after it, so no rules of the old process can
land after the new one's first sync (up to :data:`SETTLE_WAIT`).

From the hello on, the running side does its exchange with blocking calls and
a deadline: everything it hands over is paused then anyway (the native
engine's own thread keeps relaying what it has not been asked for yet), and a
peer that stalls costs at most the deadline before everything resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from uproxy.takeover import (
    MAX_FDS_PER_MESSAGE,
    SOCKET_NAME,
    VERSION,
    Adopt,
    Batch,
    ConfirmOwned,
    Connected,
    Exit,
    Failed,
    FrameDecoder,
    FrameError,
    Giver,
    Hello,
    Item,
    NoPeer,
    Offer,
    Owned,
    PauseAndOffer,
    Refuse,
    Refused,
    Release,
    Released,
    Resume,
    SendHello,
    Sent,
    StartFresh,
    Taker,
    TakerEvent,
    assign,
    batches,
    encode,
)

log = logging.getLogger("uproxy.takeover")

STEP_TIMEOUT = 10.0  # the whole exchange, either side
HELLO_WAIT = 600.0  # a new uproxy's time to load its source before it says hello
SETTLE_WAIT = 5.0  # the rules work in flight at the hello: at most this long, then hand over
_RECV = 1 << 16


def netns_id() -> str:
    """This process's network namespace (``net:[inode]``): a takeover never crosses one."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


class TakeoverExit(Exception):
    """The new process cannot take over: exit with ``code`` after printing ``line``."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(line)
        self.code = code
        self.line = line


@dataclass
class Received:
    """What came over, each item with its sockets (the new process owns them now)."""

    items: list[tuple[Item, list[socket.socket]]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[tuple[Item, list[socket.socket]]]:
        return [(item, socks) for item, socks in self.items if item.kind == kind]

    def close_unclaimed(self, claimed: set[int]) -> int:
        """Close (plainly) every received socket whose fd nobody claimed."""
        closed = 0
        for _, socks in self.items:
            for sock in socks:
                if sock.fileno() >= 0 and sock.fileno() not in claimed:
                    sock.close()
                    closed += 1
        return closed


class _Channel:
    """Frames over a connected Unix stream socket, with the fds that ride on them."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.decoder = FrameDecoder()
        self.frames: list[dict[str, Any]] = []
        self.fds: list[int] = []
        self.counted = 0  # fds already reported in a Batch

    def _timeout(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        self._timeout()
        data = encode(message)
        if fds:
            sent = socket.send_fds(self.sock, [data], fds)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def receive(self) -> dict[str, Any]:
        """The next frame (fds that arrive on the way collect in ``fds``).

        A read may return the bytes of several frames together with the fds of a
        later one, so fds are not tied to one frame: by the time an ``fds`` frame is
        read, its fds (sent with its first byte) have arrived.
        """
        while not self.frames:
            self._timeout()
            data, fds, flags, _ = socket.recv_fds(self.sock, _RECV, MAX_FDS_PER_MESSAGE)
            self.fds += fds
            if flags & socket.MSG_CTRUNC:
                raise FrameError("fds were cut off (out of file descriptors?)")
            if not data:
                raise ConnectionError("the other uproxy closed the connection")
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    def uncounted(self) -> int:
        new, self.counted = len(self.fds) - self.counted, len(self.fds)
        return new


# The new process ----------------------------------------------------------------------------
class Session:
    """A connection to the running uproxy, made at start; :meth:`take` when ready to serve.

    The running one keeps serving until the hello, so the new one can load its
    source first and take over only when it can sync at once.
    """

    def __init__(self, sock: socket.socket, path: str, timeout: float) -> None:
        self.sock = sock
        self.path = path
        self.timeout = timeout

    def close(self) -> None:
        self.sock.close()

    def take(self) -> Received:
        """Every socket of the running uproxy; raises :class:`TakeoverExit` when it cannot."""
        taker = Taker(netns_id())
        channel = _Channel(self.sock, time.monotonic() + self.timeout)
        event: TakerEvent = Connected()
        items: tuple[Item, ...] = ()
        try:
            while True:
                for action in taker.handle(event):
                    if isinstance(action, SendHello):
                        try:
                            channel.send({"type": "hello", "version": action.version,
                                          "netns": action.netns, "pid": os.getpid()})
                        except OSError as exc:
                            raise TakeoverExit(1, f"uproxy: takeover failed: {exc}; "
                                                  f"the running uproxy keeps serving") from None
                    elif isinstance(action, ConfirmOwned):
                        channel.send({"type": "owned", "fds": action.fds})
                    elif isinstance(action, Adopt):
                        received = Received([(item, [socket.socket(fileno=fd) for fd in fds])
                                             for item, fds in assign(items, channel.fds)])
                        channel.fds = []
                        return received
                    elif isinstance(action, Exit):
                        raise TakeoverExit(action.code, f"uproxy: {action.line}")
                event, items = _next_event(channel, items)
        finally:
            for fd in channel.fds:  # not adopted: plain close, the old process still serves them
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.sock.close()


def connect(state_dir: str, *, timeout: float = STEP_TIMEOUT) -> Session | None:
    """A session with the uproxy running with this state dir; None when none runs (a socket
    file nobody answers on, left by a crashed one, is removed)."""
    path = socket_path(state_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    taker = Taker(netns_id())
    try:
        sock.connect(path)
    except (FileNotFoundError, NotADirectoryError, ConnectionRefusedError) as exc:
        sock.close()
        [action] = taker.handle(NoPeer(stale=isinstance(exc, ConnectionRefusedError)))
        assert isinstance(action, StartFresh)
        if action.remove_stale:
            log.info("no uproxy answers at %s (it crashed?); starting fresh", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return None
    except OSError as exc:
        sock.close()
        raise TakeoverExit(2, f"uproxy: cannot reach the running uproxy at {path}: "
                              f"{exc.strerror or exc}") from None
    return Session(sock, path, timeout)


def take_over(state_dir: str, *, timeout: float = STEP_TIMEOUT) -> Received | None:
    """:func:`connect` and :meth:`Session.take` at once; None when no uproxy runs."""
    session = connect(state_dir, timeout=timeout)
    return None if session is None else session.take()


def _next_event(channel: _Channel, items: tuple[Item, ...]) -> tuple[TakerEvent, tuple[Item, ...]]:
    try:
        frame = channel.receive()
    except (OSError, FrameError) as exc:
        return Failed(str(exc) or type(exc).__name__), items
    kind = frame["type"]
    try:
        if kind == "refuse":
            return Refused(str(frame.get("reason", "no reason given"))), items
        if kind == "offer":
            items = tuple(Item.from_dict(d) for d in frame["items"])
            return Offer(items, int(frame["fds"])), items
        if kind == "fds":
            return Batch(channel.uncounted()), items
        if kind == "released":
            return Released(), items
    except (KeyError, TypeError, ValueError) as exc:
        return Failed(f"bad {kind} frame: {exc}"), items
    return Failed(f"unknown frame {kind!r}"), items


# The running process --------------------------------------------------------------------------
class Handing(Protocol):
    """What the running daemon does for a takeover."""

    async def settle(self) -> None:
        """Let the rules work in flight finish and start no more (until :meth:`unsettle`;
        never again once released): its rules must not land after the new process's."""

    def settle_at_once(self) -> bool:
        """:meth:`settle` without waiting, when no rules work is in flight: True if settled
        (the exchange then runs in the hello's own callback, nothing else in between)."""

    def unsettle(self) -> None:
        """The takeover did not happen (or settling was given up): rules work goes on."""

    def pause(self) -> None:
        """Stop accepting and reading everything that will be handed over."""

    def inventory(self) -> list[tuple[Item, list[socket.socket]]]:
        """What to hand over, each item with its sockets (paused, still ours)."""

    def resume(self, reason: str) -> None:
        """The takeover failed: serve everything again as before."""

    def release(self) -> None:
        """The new process owns everything: close our copies quietly and stop."""


class HandoverServer:
    """Listens on ``<state-dir>/takeover.sock`` for a new uproxy (one at a time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, state_dir: str, daemon: Handing, *,
                 timeout: float = STEP_TIMEOUT,
                 on_released: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.path = socket_path(state_dir)
        self.state_dir = state_dir
        self.daemon = daemon
        self.timeout = timeout
        self.on_released = on_released
        self.giver = Giver(netns_id())
        self.sock: socket.socket | None = None
        self.released = False  # handed over: the socket file is the new uproxy's now
        self.settle_wait = SETTLE_WAIT
        self._inode = 0
        self._serving: asyncio.Task[None] | None = None  # one new uproxy at a time

    def start(self) -> None:
        """Listen (replacing the socket file of an uproxy that no longer answers)."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(4)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._inode = os.stat(self.path).st_ino
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop listening; remove the socket file unless a newer uproxy has replaced it."""
        if self._serving is not None and not self._serving.done():
            self._serving.cancel()  # (still settling: the exchange had not begun)
        if self.sock is None:
            return
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        if self.released:  # (an inode number can be reused, so that check alone is not enough)
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def _accept(self) -> None:
        assert self.sock is not None
        try:
            peer, _ = self.sock.accept()
        except OSError:
            return
        # A new uproxy connects at its start and says hello once its source is loaded:
        # wait on the loop (serving on), up to HELLO_WAIT.
        peer.setblocking(False)
        timer = self.loop.call_later(HELLO_WAIT, self._hello_late, peer)
        self.loop.add_reader(peer.fileno(), self._hello_ready, peer, timer)

    def _hello_late(self, peer: socket.socket) -> None:
        log.warning("takeover: a new uproxy connected but said nothing for %.0fs", HELLO_WAIT)
        self.loop.remove_reader(peer.fileno())
        peer.close()

    def _hello_ready(self, peer: socket.socket, timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        self.loop.remove_reader(peer.fileno())
        if self._serving is not None and not self._serving.done():
            log.warning("takeover: another new uproxy is being served; closing this one")
            peer.close()
            return
        if self.daemon.settle_at_once():  # (the usual case: as before settling existed)
            with self._settled(peer):
                self._serve(peer)
            return
        self._serving = self.loop.create_task(self._settle_and_serve(peer), name="takeover")

    async def _settle_and_serve(self, peer: socket.socket) -> None:
        """Settle the rules (serving on meanwhile), then the exchange (blocking)."""
        started = time.monotonic()
        with self._settled(peer):
            try:  # (asyncio.timeout, not wait_for: see sources/kube/reflector.py)
                async with asyncio.timeout(self.settle_wait):
                    await self.daemon.settle()
            except TimeoutError:  # (settle was cancelled: it holds nothing)
                log.warning("takeover: rules still being applied after %gs; handing over "
                            "anyway (the new uproxy's next full sync puts back any they "
                            "overwrite)", self.settle_wait)
            else:
                waited = time.monotonic() - started
                if waited >= 0.01:
                    log.info("takeover: waited %.0f ms for the rules in flight", waited * 1000)
            self._serve(peer)

    @contextlib.contextmanager
    def _settled(self, peer: socket.socket) -> Iterator[None]:
        """Around a settled daemon's exchange (or its cancelled wait): closes the peer and
        unsettles the daemon after, unless everything was handed over."""
        try:
            yield
        finally:
            peer.close()
            if not self.released:
                self.daemon.unsettle()

    def _serve(self, peer: socket.socket) -> None:
        started = time.monotonic()
        channel = _Channel(peer, started + self.timeout)
        try:
            frame = channel.receive()
            if frame["type"] != "hello":
                raise FrameError(f"expected hello, got {frame['type']}")
            hello = Hello(int(frame["version"]), str(frame.get("netns", "")))
            pid = frame.get("pid")
        except (OSError, FrameError, KeyError, TypeError, ValueError) as exc:
            log.warning("takeover: a peer that did not say hello properly: %s", exc)
            return
        log.info("takeover: uproxy pid %s asks for our sockets (format %s)", pid, hello.version)
        event: Hello | Sent | Owned | Failed = hello
        while True:
            following: Sent | Owned | Failed | None = None
            for action in self.giver.handle(event):
                if isinstance(action, Refuse):
                    log.warning("takeover refused: %s", action.reason)
                    with contextlib.suppress(OSError):
                        channel.send({"type": "refuse", "reason": action.reason})
                    return
                if isinstance(action, Resume):
                    log.warning("takeover failed, serving everything again: %s", action.reason)
                    self.daemon.resume(action.reason)
                    return
                if isinstance(action, Release):
                    self.released = True
                    self.daemon.release()
                    with contextlib.suppress(OSError):
                        channel.send({"type": "released"})
                    log.info("takeover: handed everything to pid %s in %.1f ms", pid,
                             (time.monotonic() - started) * 1000)
                    if self.on_released is not None:
                        self.on_released()
                    return
                if isinstance(action, PauseAndOffer):
                    following = self._offer(channel)
            if following is None:
                if self.giver.state != "offered":
                    return
                following = self._wait_owned(channel)
            event = following

    def _offer(self, channel: _Channel) -> Sent | Failed:
        self.daemon.pause()
        try:
            inventory = self.daemon.inventory()
            fds = [sock.fileno() for _, socks in inventory for sock in socks]
            channel.send({"type": "offer", "version": VERSION,
                          "items": [item.as_dict() for item, _ in inventory],
                          "fds": len(fds)})
            at = 0
            for index, count in enumerate(batches(len(fds))):
                channel.send({"type": "fds", "index": index, "count": count},
                             fds[at:at + count])
                at += count
        except (OSError, ValueError) as exc:
            return Failed(f"sending: {exc}")
        return Sent(len(fds))

    def _wait_owned(self, channel: _Channel) -> Owned | Failed:
        try:
            frame = channel.receive()
            if frame["type"] != "owned":
                return Failed(f"expected owned, got {frame['type']}")
            return Owned(int(frame["fds"]))
        except (OSError, FrameError, KeyError, TypeError, ValueError) as exc:
            return Failed(str(exc) or type(exc).__name__)
