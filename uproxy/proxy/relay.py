"""Relaying bytes between an accepted client socket and a connected backend socket.

The contract every implementation keeps (the native engine and the Python twin):

* ``Relay.start(client, backend, on_done)`` takes ownership of both sockets;
  the caller must not use or close them afterwards.
* Bytes flow both ways until both sides are done. One side's EOF becomes
  ``shutdown(SHUT_WR)`` on the other, only after everything read before the
  EOF has been written (half-close). A reset on one side resets the other.
* Byte counters per direction are readable at any time from the handle
  (no callback per chunk).
* ``on_done`` is called once, on the event loop's thread, when both sockets
  are closed.

This module holds the pure-Python twin (``add_reader``/``add_writer`` on raw
non-blocking sockets, so it runs the same on asyncio and uvloop) and
:func:`make_relay`, which picks the native engine when it is active.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

CHUNK = 256 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class RelayResult:
    bytes_up: int  # client -> backend
    bytes_down: int  # backend -> client
    error: str | None = None  # e.g. "reset by client"


DoneCallback = Callable[[RelayResult], None]


class RelayHandle(Protocol):
    @property
    def bytes_up(self) -> int: ...
    @property
    def bytes_down(self) -> int: ...
    @property
    def native(self) -> bool: ...
    def abort(self) -> None: ...


class Relay(Protocol):
    name: str

    def start(self, client: socket.socket, backend: socket.socket,
              on_done: DoneCallback) -> RelayHandle: ...

    def active(self) -> int: ...

    async def close(self) -> None: ...


def reset_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): what a refused or aborted peer should see."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    sock.close()


class _Direction:
    """One way of a relay: read from ``src``, write to ``dst``, keep at most one chunk."""

    __slots__ = ("buf", "dst", "eof", "moved", "pending", "src")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.buf = bytearray(CHUNK)
        self.pending = memoryview(b"")
        self.eof = False
        self.moved = 0


class PyRelayHandle:
    """The Python twin's connection: two directions driven by loop readiness callbacks."""

    native = False

    def __init__(self, relay: PyRelay, client: socket.socket, backend: socket.socket,
                 on_done: DoneCallback) -> None:
        self._relay = relay
        self._loop = relay.loop
        self._client = client
        self._backend = backend
        self._on_done = on_done
        self._up = _Direction(client, backend)
        self._down = _Direction(backend, client)
        self._closed = False
        client.setblocking(False)
        backend.setblocking(False)
        self._loop.add_reader(client.fileno(), self._readable, self._up)
        self._loop.add_reader(backend.fileno(), self._readable, self._down)

    @property
    def bytes_up(self) -> int:
        return self._up.moved

    @property
    def bytes_down(self) -> int:
        return self._down.moved

    def _readable(self, d: _Direction) -> None:
        try:
            n = d.src.recv_into(d.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(reset=True, error=_describe(exc, d is self._up))
            return
        if n == 0:
            d.eof = True
            self._loop.remove_reader(d.src.fileno())
            self._maybe_shutdown(d)
            return
        d.pending = memoryview(d.buf)[:n]
        self._write(d)

    def _write(self, d: _Direction) -> None:
        try:
            while d.pending:
                sent = d.dst.send(d.pending)
                d.moved += sent
                d.pending = d.pending[sent:]
        except (BlockingIOError, InterruptedError):
            # Backpressure: stop reading this way until the other side drains.
            self._loop.remove_reader(d.src.fileno())
            self._loop.add_writer(d.dst.fileno(), self._writable, d)
            return
        except OSError as exc:
            self._finish(reset=True, error=_describe(exc, d is not self._up))
            return

    def _writable(self, d: _Direction) -> None:
        self._write(d)
        if not d.pending and not self._closed:
            self._loop.remove_writer(d.dst.fileno())
            if d.eof:
                self._maybe_shutdown(d)
            else:
                self._loop.add_reader(d.src.fileno(), self._readable, d)

    def _maybe_shutdown(self, d: _Direction) -> None:
        if d.pending or self._closed:
            return
        try:
            d.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self._up.eof and self._down.eof and not self._up.pending and not self._down.pending:
            self._finish(reset=False, error=None)

    def abort(self) -> None:
        self._finish(reset=True, error="aborted")

    def _finish(self, *, reset: bool, error: str | None) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in (self._client, self._backend):
            fd = sock.fileno()
            if fd >= 0:
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
            if reset:
                reset_close(sock)
            else:
                sock.close()
        self._relay._done(self)
        self._on_done(RelayResult(self._up.moved, self._down.moved, error))


def _describe(exc: OSError, client_side: bool) -> str:
    who = "client" if client_side else "backend"
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return f"reset by {who}"
    return f"{who} error: {exc.strerror or exc}"


class PyRelay:
    """The pure-Python relay (``UPROXY_NO_NATIVE=1``, or the module is not built)."""

    name = "python"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._live: set[PyRelayHandle] = set()

    def start(self, client: socket.socket, backend: socket.socket,
              on_done: DoneCallback) -> PyRelayHandle:
        handle = PyRelayHandle(self, client, backend, on_done)
        self._live.add(handle)
        return handle

    def _done(self, handle: PyRelayHandle) -> None:
        self._live.discard(handle)

    def active(self) -> int:
        return len(self._live)

    async def close(self) -> None:
        for handle in list(self._live):
            handle.abort()


def make_relay(loop: asyncio.AbstractEventLoop, *, prefer_native: bool = True) -> Relay:
    """The native engine when it is active (see :mod:`uproxy.native`), else the Python twin."""
    return PyRelay(loop)
