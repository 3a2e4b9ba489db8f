"""The Python twin of the relay contract (:mod:`uproxy.proxy.relay`).

``add_reader``/``add_writer`` on raw non-blocking sockets, so it runs the same
on asyncio and uvloop. It reads into one buffer shared by the whole relay and
keeps only what the peer would not take yet, so an idle connection holds no
buffer. One difference it cannot avoid with level-triggered readers: a reset
arriving on a side it is not reading (after that side's EOF, or while that
side's bytes wait for the other side) is noticed at the next write to that
side; the native engine sees it at once (EPOLLERR).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket

from uproxy.proxy import sockdiag
from uproxy.proxy.relay import (
    HANDED_OVER,
    DoneCallback,
    RefusedHandle,
    RelayResult,
    RelayState,
    refuse,
    reset_close,
)

CHUNK = 256 * 1024


def _describe(exc: OSError, client_side: bool) -> str:
    who = "client" if client_side else "backend"
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return f"reset by {who}"
    return f"{who} error: {exc.strerror or exc}"



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
                 on_done: DoneCallback, *, paused: bool = False) -> None:
        self._relay = relay
        self._loop = relay.loop
        self._client = client
        self._backend = backend
        self._on_done = on_done
        self._up = _Direction(client, backend)
        self._down = _Direction(backend, client)
        self._closed = False
        self._tw: sockdiag.Named | None = None  # transparent, our FIN first: its TIME_WAIT
        client.setblocking(False)
        backend.setblocking(False)
        if not paused:
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
        if d is self._up and not self._down.eof:  # our FIN first: the backend's TIME_WAIT here
            self._relay.closes_first_count += 1
            self._tw = sockdiag.transparent_name(self._backend)  # (while it is connected)
        with contextlib.suppress(OSError):
            d.dst.shutdown(socket.SHUT_WR)
        if self._up.eof and self._down.eof and not self._up.pending and not self._down.pending:
            self._finish(reset=False, error=None)

    def abort(self) -> None:
        self._finish(reset=True, error="aborted")

    # Takeover: stop, describe, then go on (it failed) or let go (the new process has it).
    def pause(self) -> bool:
        """Stop every callback; the state stays as it is until ``resume`` or ``release``.

        False when the connection has ended (nothing to move)."""
        if self._closed:
            return False
        for sock in (self._client, self._backend):
            self._loop.remove_reader(sock.fileno())
            self._loop.remove_writer(sock.fileno())
        return True

    def resume(self) -> None:
        """Wait on what each direction waits for: its destination (bytes pending) or its source."""
        if self._closed:
            return
        for d in (self._up, self._down):
            if d.pending:
                self._loop.add_writer(d.dst.fileno(), self._writable, d)
            elif not d.eof:
                self._loop.add_reader(d.src.fileno(), self._readable, d)

    def state(self) -> RelayState:
        """What travels with the connection: counters, unwritten bytes, EOFs seen."""
        up, down = self._up, self._down
        return RelayState(up.moved, down.moved, up.pending, down.pending, up.eof, down.eof)

    def sockets(self) -> tuple[socket.socket, socket.socket]:
        return self._client, self._backend

    def release(self) -> None:
        """The connection lives on in another process: close our fds only (no shutdown, no RST)."""
        if self._closed:
            return
        self.pause()
        self._closed = True
        self._client.close()
        self._backend.close()
        self._relay._done(self)
        self._on_done(RelayResult(self._up.moved, self._down.moved, HANDED_OVER))

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
        if self._tw is not None and self._down.eof:  # the backend's FIN read: it exists now
            self._relay.time_wait(self._tw)
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
        self.closes_first_count = 0  # backends that got our FIN before sending theirs
        self._time_wait_destroyed = 0  # of those, transparent TIME_WAIT sockets destroyed
        self._time_wait_left = 0  # ... and ones that could not be (the sweep's)
        self._exact: sockdiag.Exact | None = sockdiag.Exact()  # None: the kernel refused

    def closes_first(self) -> int:
        """Backend connections that got our FIN before sending theirs (ever): each leaves
        a TIME_WAIT socket on the node (transparent mode sweeps those)."""
        return self.closes_first_count

    def time_wait_left(self) -> int:
        """Transparent ones whose TIME_WAIT socket could not be destroyed at close by its
        exact address (ever): the caller sweeps for them."""
        return self._time_wait_left

    def time_wait_destroyed(self) -> int:
        """Transparent TIME_WAIT sockets destroyed at close (ever)."""
        return self._time_wait_destroyed

    def time_wait(self, name: sockdiag.Named) -> None:
        """A transparent backend socket's TIME_WAIT exists: destroy it by its address (as
        the native engine does, native/relay.c)."""
        if self._exact is not None:
            try:
                self._time_wait_destroyed += self._exact.destroy(name)
                return
            except OSError:  # refused: the sweep says why, once
                self._exact.close()
                self._exact = None
        self._time_wait_left += 1

    def start(self, client: socket.socket, backend: socket.socket,
              on_done: DoneCallback) -> PyRelayHandle | RefusedHandle:
        if self._closed:
            return refuse(self.loop, client, backend, on_done, "relay closed", native=False)
        handle = PyRelayHandle(self, client, backend, on_done)
        self._live.add(handle)
        return handle

    def adopt(self, client: socket.socket, backend: socket.socket, state: RelayState,
              on_done: DoneCallback) -> PyRelayHandle | RefusedHandle:
        """A connection another process relayed until now, with its counters and bytes."""
        if self._closed:
            return refuse(self.loop, client, backend, on_done, "relay closed", native=False)
        handle = PyRelayHandle(self, client, backend, on_done, paused=True)
        for d, moved, pending, eof in ((handle._up, state.up, state.pending_up, state.eof_up),
                                       (handle._down, state.down, state.pending_down,
                                        state.eof_down)):
            d.moved, d.pending, d.eof = moved, pending, eof
        self._live.add(handle)
        handle.resume()
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

    def catch_up(self) -> None:
        """Nothing is queued: this relay runs on the loop itself."""

    def stats(self) -> dict[str, int]:
        """The same keys as the native engine's, where they mean something here."""
        return {"conns_live": len(self._live), "pipes_in_use": 0,
                "bufs_in_use": self.buffers_in_use()}

    def thread_stats(self) -> list[dict[str, int]]:
        """No engine threads: this relay runs on the loop itself."""
        return []

    async def close(self) -> None:
        """Abort live connections (both sides get RST); later ``start`` calls are refused."""
        self._closed = True
        for handle in list(self._live):
            handle.abort()
        if self._exact is not None:
            self._exact.close()
