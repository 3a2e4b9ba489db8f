"""The relay contract: bytes between an accepted client socket and a connected backend socket.

Every implementation keeps it (the native engine, :mod:`uproxy.proxy.nativerelay`,
and the Python twin, :mod:`uproxy.proxy.pyrelay`); callers see only this module:

* ``Relay.start(client, backend, on_done)`` takes ownership of both sockets;
  the caller must not use or close them afterwards.
* Bytes flow both ways until both sides are done. One side's EOF becomes
  ``shutdown(SHUT_WR)`` on the other, only after everything read before the
  EOF has been written (half-close). A reset on one side resets the other.
* Byte counters per direction are readable at any time from the handle
  (no callback per chunk).
* ``on_done`` is called once, on the event loop's thread, when both sockets
  are closed, with a :class:`RelayResult` whose ``error`` is ``None`` (both
  sides finished cleanly), ``"reset by client|backend"``, ``"client|backend
  error: ..."``, ``"aborted"`` (``handle.abort()`` or ``close()``) or
  ``"relay closed"`` (``start`` after ``close``: both sockets get RST).
* ``relay.adopt(client, backend, state, on_done)`` (:class:`AdoptingRelay`) is
  ``start`` for a connection relayed until now elsewhere (a takeover): counters
  go on from ``state``, its pending bytes go out first each way, and an EOF it
  already read gives the peer ``SHUT_WR`` once that way's pending bytes are out.
* ``await relay.close()`` resets every live connection and releases
  everything the relay holds (the native engine's thread is joined).
* ``active()`` counts live connections; ``pipes_in_use()`` and
  ``buffers_in_use()`` count where stuck bytes sit (an idle connection holds
  neither); ``stats()`` has those figures by name for the status page, and
  ``thread_stats()`` per native engine thread (``--engine-threads``).

:func:`make_relay` picks the native engine when it is active
(:data:`uproxy.native.ACTIVE`); it imports the implementation it picks, so a
process on the Python twin never loads the engine's module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from uproxy import native

_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class RelayResult:
    bytes_up: int  # client -> backend
    bytes_down: int  # backend -> client
    error: str | None = None  # e.g. "reset by client"


DoneCallback = Callable[[RelayResult], None]

HANDED_OVER = "handed over"  # the error of a connection a takeover moved to the new process


@dataclass(frozen=True, slots=True)
class RelayState:
    """A paused connection's relay state, as it travels in a takeover."""

    up: int  # bytes written client -> backend so far
    down: int
    pending_up: bytes = b""  # read from the client, not yet written to the backend
    pending_down: bytes = b""
    eof_up: bool = False  # the client's EOF was read (the backend got SHUT_WR once pending_up left)
    eof_down: bool = False


class RelayHandle(Protocol):
    @property
    def bytes_up(self) -> int: ...
    @property
    def bytes_down(self) -> int: ...
    @property
    def native(self) -> bool: ...
    def abort(self) -> None: ...


@runtime_checkable
class MovableHandle(Protocol):
    """A handle a takeover can move to another process (both paths' handles)."""

    def sockets(self) -> tuple[socket.socket, socket.socket]: ...
    def pause(self) -> bool: ...
    def resume(self) -> None: ...
    def state(self) -> RelayState: ...
    def release(self) -> None: ...


@runtime_checkable
class AdoptingRelay(Protocol):
    """A relay that takes a connection with its :class:`RelayState` (both paths' relays)."""

    def adopt(self, client: socket.socket, backend: socket.socket, state: RelayState,
              on_done: DoneCallback) -> RelayHandle: ...


class Relay(Protocol):
    name: str

    def start(self, client: socket.socket, backend: socket.socket,
              on_done: DoneCallback) -> RelayHandle: ...

    def active(self) -> int: ...

    def pipes_in_use(self) -> int: ...

    def buffers_in_use(self) -> int: ...

    def stats(self) -> dict[str, int]: ...

    def thread_stats(self) -> list[dict[str, int]]:
        """:meth:`stats` per native engine thread (none on the Python twin)."""

    def catch_up(self) -> None:
        """Hand over now what the relay queued for the event loop (finished connections,
        set-up records): readers of the table and metrics call it first, as under load
        the native engine wakes the loop at most every few milliseconds."""

    async def close(self) -> None: ...


def reset_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): what a refused or aborted peer should see."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


class RefusedHandle:
    """A connection the relay did not take (closed relay, engine failure): both
    sockets were reset and ``on_done`` is scheduled with the reason."""

    __slots__ = ("native",)
    bytes_up = 0
    bytes_down = 0

    def __init__(self, *, native: bool) -> None:
        self.native = native

    def abort(self) -> None:
        pass


def refuse(loop: asyncio.AbstractEventLoop, client: socket.socket, backend: socket.socket,
           on_done: DoneCallback, error: str, *, native: bool) -> RefusedHandle:
    """Reset both sockets and report ``error`` to ``on_done`` (soon, not now)."""
    reset_close(client)
    reset_close(backend)
    loop.call_soon(on_done, RelayResult(0, 0, error))
    return RefusedHandle(native=native)


AUTO_THREADS_MAX = 8


def engine_threads(setting: int, cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """How many engine threads ``--engine-threads`` means here: ``auto`` (0) is one per
    CPU this process may run on (its affinity, and its cgroup's CPU limit, ``cpu.max``,
    rounded up: a pod limited to 1.5 CPUs gets 2), at most :data:`AUTO_THREADS_MAX`."""
    if setting > 0:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max" and int(period) > 0:
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to read: the affinity alone
    return max(1, min(AUTO_THREADS_MAX, cores))


def make_relay(loop: asyncio.AbstractEventLoop, *, prefer_native: bool = True,
               max_pipes: int | None = None, threads: int = 1) -> Relay:
    """The native engine when it is active (see :mod:`uproxy.native`), else the Python twin.
    ``threads``: the native engine's (see :func:`engine_threads`); the twin has one loop."""
    if prefer_native and native.ACTIVE == "native":
        from uproxy.proxy.nativerelay import NativeRelay

        return NativeRelay(loop, max_pipes=max_pipes, threads=threads)
    from uproxy.proxy.pyrelay import PyRelay

    return PyRelay(loop)
