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
  are closed, with a :class:`RelayResult` whose ``error`` is ``None`` (both
  sides finished cleanly), ``"reset by client|backend"``, ``"client|backend
  error: ..."``, ``"aborted"`` (``handle.abort()`` or ``close()``) or
  ``"relay closed"`` (``start`` after ``close``: both sockets get RST).
* ``await relay.close()`` resets every live connection and releases
  everything the relay holds (the native engine's thread is joined).
* ``active()`` counts live connections; ``pipes_in_use()`` and
  ``buffers_in_use()`` count where stuck bytes sit (an idle connection holds
  neither); ``stats()`` has those figures by name for the status page.

This module holds both implementations and :func:`make_relay`, which picks
the native engine when it is active (:data:`uproxy.native.ACTIVE`).

:class:`NativeRelay` hands the two fds to the C engine (``native/relay.c``):
one engine thread per relay (one per process in the daemon) runs an
edge-triggered epoll loop and moves both directions itself (small reads with
recv/send, bulk with splice through pooled pipes); the event loop hears only
of finished connections, through an eventfd it watches with ``add_reader``,
and drains a completion queue. Counters live in C memory, read as plain
64-bit loads.

Engine thread rather than per-readiness Python callbacks (the loop calls a
splice step from ``add_reader``/``add_writer`` callbacks): measured with
``native/bench_relay.py`` on the shared 2-core build box over loopback, uvloop,
2-3 s runs, one iperf3 stream and a 32-connection 512-byte ping-pong. The box
was noisy, so throughput was a wash (bulk: native 10-18, callbacks 7-16,
Python copy 8-18 Gbit/s; loopback copies are cheap). CPU was not: per GB,
native 0.24-0.33 s, callbacks 0.22-0.35 s, copy 0.34-0.45 s; per ping-pong
round trip, native 12.4-13.9 us, callbacks 14.8-17.7 us, copy 14.7-16.4 us.
And the event loop thread, which accepts, connects and serves the status
page, spent 0.00-0.01 s with the engine against all of the relaying CPU with
callbacks. So the engine thread it is.

:class:`PyRelay` is the pure-Python twin (``add_reader``/``add_writer`` on raw
non-blocking sockets, so it runs the same on asyncio and uvloop). It reads
into one buffer shared by the whole relay and keeps only what the peer would
not take yet, so an idle connection holds no buffer. One difference it cannot
avoid with level-triggered readers: a reset arriving on a side it is not
reading (after that side's EOF, or while that side's bytes wait for the other
side) is noticed at the next write to that side; the native engine sees it
at once (EPOLLERR).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from uproxy import native

CHUNK = 256 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)

PIPE_SIZE = 256 * 1024
"""Pipe size the native engine asks for (it halves down to 64 KiB when refused)."""
MAX_PIPES_CAP = 1024
KEEP_FREE_PIPES = 16
"""Idle pipes the engine keeps open for reuse; the rest close when they empty."""
_POLL_BATCH = 256


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

    def pipes_in_use(self) -> int: ...

    def buffers_in_use(self) -> int: ...

    def stats(self) -> dict[str, int]: ...

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


def _refuse(loop: asyncio.AbstractEventLoop, client: socket.socket, backend: socket.socket,
            on_done: DoneCallback, error: str, *, native: bool) -> RefusedHandle:
    reset_close(client)
    reset_close(backend)
    loop.call_soon(on_done, RelayResult(0, 0, error))
    return RefusedHandle(native=native)


def _describe(exc: OSError, client_side: bool) -> str:
    who = "client" if client_side else "backend"
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return f"reset by {who}"
    return f"{who} error: {exc.strerror or exc}"


# ---- the Python twin ---------------------------------------------------------


class _Direction:
    """One way of a relay: read from ``src``, write to ``dst``; ``pending`` is
    what ``dst`` has not taken yet (empty while idle)."""

    __slots__ = ("dst", "eof", "moved", "pending", "src")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.pending = b""
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
        buf = self._relay.buffer
        try:
            n = d.src.recv_into(buf)
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
        try:
            sent = d.dst.send(memoryview(buf)[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._finish(reset=True, error=_describe(exc, d is not self._up))
            return
        d.moved += sent
        if sent < n:
            # Backpressure: keep the rest, stop reading this way until dst drains.
            d.pending = bytes(buf[sent:n])
            self._loop.remove_reader(d.src.fileno())
            self._loop.add_writer(d.dst.fileno(), self._writable, d)

    def _writable(self, d: _Direction) -> None:
        try:
            sent = d.dst.send(d.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(reset=True, error=_describe(exc, d is not self._up))
            return
        d.moved += sent
        d.pending = d.pending[sent:]
        if d.pending:
            return
        self._loop.remove_writer(d.dst.fileno())
        if d.eof:
            self._maybe_shutdown(d)
        else:
            self._loop.add_reader(d.src.fileno(), self._readable, d)

    def _maybe_shutdown(self, d: _Direction) -> None:
        if d.pending or self._closed:
            return
        with contextlib.suppress(OSError):
            d.dst.shutdown(socket.SHUT_WR)
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
        self._up.pending = self._down.pending = b""
        self._relay._done(self)
        self._on_done(RelayResult(self._up.moved, self._down.moved, error))


class PyRelay:
    """The pure-Python relay (``UPROXY_NO_NATIVE=1``, or the module is not built)."""

    name = "python"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buffer = bytearray(CHUNK)  # shared: callbacks run one at a time on the loop
        self._live: set[PyRelayHandle] = set()
        self._closed = False

    def start(self, client: socket.socket, backend: socket.socket,
              on_done: DoneCallback) -> PyRelayHandle | RefusedHandle:
        if self._closed:
            return _refuse(self.loop, client, backend, on_done, "relay closed", native=False)
        handle = PyRelayHandle(self, client, backend, on_done)
        self._live.add(handle)
        return handle

    def _done(self, handle: PyRelayHandle) -> None:
        self._live.discard(handle)

    def active(self) -> int:
        return len(self._live)

    def pipes_in_use(self) -> int:
        return 0

    def buffers_in_use(self) -> int:
        """Directions holding bytes their destination has not taken yet."""
        return sum((h._up.pending != b"") + (h._down.pending != b"") for h in self._live)

    def stats(self) -> dict[str, int]:
        """The same keys as the native engine's, where they mean something here."""
        return {"conns_live": len(self._live), "pipes_in_use": 0,
                "bufs_in_use": self.buffers_in_use()}

    async def close(self) -> None:
        """Abort live connections (both sides get RST); later ``start`` calls are refused."""
        self._closed = True
        for handle in list(self._live):
            handle.abort()


# ---- the native engine -------------------------------------------------------


def default_max_pipes(pipe_size: int = PIPE_SIZE) -> int:
    """Pool bound: half the per-user pipe page budget (``pipe-user-pages-soft``), capped.

    Root is not held to that limit, but other processes of the same user are,
    so we leave them the other half.
    """
    try:
        with open("/proc/sys/fs/pipe-user-pages-soft") as f:
            pages = int(f.read())
    except (OSError, ValueError):
        pages = 16384  # the kernel default
    if pages <= 0:  # 0 means unlimited
        return MAX_PIPES_CAP
    budget = pages * os.sysconf("SC_PAGE_SIZE") // 2
    return max(0, min(MAX_PIPES_CAP, budget // max(pipe_size, 1)))


def _native_error(lib: Any, reason: int, side: int, err: int) -> str | None:
    who = {lib.UPROXY_SIDE_CLIENT: "client", lib.UPROXY_SIDE_BACKEND: "backend"}.get(side)
    if reason == lib.UPROXY_DONE_CLOSED:
        return None
    if reason == lib.UPROXY_DONE_ABORTED:
        return "aborted"
    if reason == lib.UPROXY_DONE_RESET and who:
        return f"reset by {who}"
    text = os.strerror(err) if err else "unknown error"
    return f"{who} error: {text}" if who else f"error: {text}"


class NativeRelayHandle:
    """A connection owned by the engine. Counters are read from C memory until
    the completion arrives, then frozen (the engine frees that memory)."""

    native = True
    __slots__ = ("_conn", "_final", "_on_done", "_relay")

    def __init__(self, relay: NativeRelay, conn: Any, on_done: DoneCallback) -> None:
        self._relay = relay
        self._conn: Any = conn
        self._on_done = on_done
        self._final = RelayResult(0, 0)

    @property
    def bytes_up(self) -> int:
        conn = self._conn
        return int(conn.bytes_up) if conn is not None else self._final.bytes_up

    @property
    def bytes_down(self) -> int:
        conn = self._conn
        return int(conn.bytes_down) if conn is not None else self._final.bytes_down

    def abort(self) -> None:
        if self._conn is not None:
            self._relay._abort(self._conn)


class NativeRelay:
    """The C engine behind the :class:`Relay` contract (see the module docstring)."""

    name = "native"

    def __init__(self, loop: asyncio.AbstractEventLoop, *, max_pipes: int | None = None,
                 pipe_size: int = PIPE_SIZE, keep_free_pipes: int = KEEP_FREE_PIPES) -> None:
        self.loop = loop
        self._lib = native.lib()
        ffi = self._ffi = native.ffi()
        if max_pipes is None:
            max_pipes = default_max_pipes(pipe_size)
        engine = self._lib.uproxy_engine_new(max_pipes, pipe_size, keep_free_pipes)
        if engine == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"native relay engine: {os.strerror(err)}")
        # Freed by close(); the gc hook only covers a relay dropped without it.
        self._engine: Any = ffi.gc(engine, self._lib.uproxy_engine_free)
        self._raw = engine
        self._efd: int = self._lib.uproxy_engine_eventfd(engine)
        self._done_buf = ffi.new("struct uproxy_done[]", _POLL_BATCH)
        self._stats = ffi.new("struct uproxy_engine_stats *")
        self._live: dict[int, NativeRelayHandle] = {}
        self._next_token = 1
        self._stopped: asyncio.Future[None] | None = None
        self._final_stats: dict[str, int] = {}
        loop.add_reader(self._efd, self._on_completions)

    def start(self, client: socket.socket, backend: socket.socket,
              on_done: DoneCallback) -> NativeRelayHandle | RefusedHandle:
        if self._stopped is not None:
            return _refuse(self.loop, client, backend, on_done, "relay closed", native=True)
        token = self._next_token
        self._next_token += 1
        conn = self._lib.uproxy_engine_add(self._raw, client.fileno(), backend.fileno(), token)
        if conn == self._ffi.NULL:  # ENOMEM: the sockets are still ours
            error = f"error: {os.strerror(self._ffi.errno)}"
            return _refuse(self.loop, client, backend, on_done, error, native=True)
        # The engine owns the fds now; the socket objects must forget them.
        client.detach()
        backend.detach()
        handle = NativeRelayHandle(self, conn, on_done)
        self._live[token] = handle
        return handle

    def _abort(self, conn: Any) -> None:
        if self._stopped is None:
            self._lib.uproxy_engine_abort(self._raw, conn)

    def _on_completions(self) -> None:
        lib, engine, buf = self._lib, self._raw, self._done_buf
        stopped = bool(lib.uproxy_engine_stopped(engine))  # before polling: then all are queued
        while True:
            n = lib.uproxy_engine_poll(engine, buf, _POLL_BATCH)
            for i in range(n):
                done = buf[i]
                handle = self._live.pop(int(done.token), None)
                result = RelayResult(int(done.bytes_up), int(done.bytes_down),
                                     _native_error(lib, done.reason, done.side, done.err))
                if handle is not None:
                    handle._conn = None
                    handle._final = result
                lib.uproxy_engine_release(engine, done.conn)
                if handle is not None:
                    try:
                        handle._on_done(result)
                    except Exception as exc:
                        self.loop.call_exception_handler({
                            "message": "relay on_done callback failed",
                            "exception": exc,
                        })
            if n < _POLL_BATCH:
                break
        if stopped and self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def active(self) -> int:
        return len(self._live)

    def stats(self) -> dict[str, int]:
        """Engine-wide figures: live connections, pool use, bytes per path."""
        if self._engine is None:
            return dict(self._final_stats)  # the last figures before the engine was freed
        self._lib.uproxy_engine_stats(self._raw, self._stats)
        s = self._stats
        return {name: int(getattr(s, name)) for name in (
            "conns_live", "pipes_in_use", "pipes_total", "pipes_max", "pipe_size",
            "splice_bytes", "copy_bytes", "bufs_in_use")}

    def pipes_in_use(self) -> int:
        """Pipes holding a connection's bytes right now (idle connections hold none)."""
        return self.stats()["pipes_in_use"]

    def buffers_in_use(self) -> int:
        """Copy buffers holding bytes a destination has not taken yet."""
        return self.stats()["bufs_in_use"]

    async def close(self) -> None:
        """Abort live connections (both sides get RST), wait for the thread, free everything."""
        if self._engine is None:
            return
        if self._stopped is None:
            self._stopped = self.loop.create_future()
            self._lib.uproxy_engine_stop(self._raw)
        await asyncio.shield(self._stopped)
        if self._engine is None:  # a concurrent close() finished first
            return
        self._on_completions()
        self.loop.remove_reader(self._efd)
        self._final_stats = self.stats()
        engine, self._engine = self._engine, None
        self._ffi.release(engine)  # uproxy_engine_free: joins the (finished) thread


def make_relay(loop: asyncio.AbstractEventLoop, *, prefer_native: bool = True,
               max_pipes: int | None = None) -> Relay:
    """The native engine when it is active (see :mod:`uproxy.native`), else the Python twin."""
    if prefer_native and native.ACTIVE == "native":
        return NativeRelay(loop, max_pipes=max_pipes)
    return PyRelay(loop)
