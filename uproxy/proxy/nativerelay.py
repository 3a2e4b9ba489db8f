"""The native engine behind the relay contract (:mod:`uproxy.proxy.relay`).

:class:`NativeRelay` hands the two fds to the C engine (``native/relay.c``):
its engine threads (``threads``, the daemon's ``--engine-threads``; one relay per
process) each run an edge-triggered epoll loop, accept on every listener and move
both directions of their connections themselves (small reads with recv/send, bulk
with splice through pooled pipes); the event loop hears only of set-ups and
finished connections, through one eventfd for the group that it watches with
``add_reader``, and drains the group's queues as one engine's. Counters live in C
memory, read as plain 64-bit loads. Why an engine thread rather than splice steps run
from loop callbacks: the measurements are in ``bench/ANALYSIS.md`` (uproxy/proxy/nativerelay.py).

Reason and side codes, and the smallest pipe the engine settles for, come
from the compiled module (``native/uproxy_native.h``), never re-declared here.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from uproxy import native
from uproxy.proxy.pyrelay import PyRelay, PyRelayHandle
from uproxy.proxy.relay import (
    HANDED_OVER,
    DoneCallback,
    RefusedHandle,
    RelayResult,
    RelayState,
    refuse,
)

PIPE_SIZE = 256 * 1024
"""Pipe size the native engine asks for (halved down to ``UPROXY_PIPE_SIZE_MIN`` when refused)."""
MAX_PIPES_CAP = 1024
KEEP_FREE_PIPES = 16
"""Idle pipes the engine keeps open for reuse; the rest close when they empty."""
_POLL_BATCH = 256
ListenerPush = tuple[int, int, int, Sequence[tuple[str, int, int, float]], Sequence[bool], int,
                     int, float]
"""One listener for :meth:`NativeRelay.listeners_add`: its fd, has_service, family, endpoints
(ip, port, index, avoided until), here (per endpoint, or empty), transparent bits, affinity
group and timeout: :meth:`NativeRelay.listener_set`'s arguments."""
DETACH_TIMEOUT = 5.0  # the engine thread answers in microseconds; this only bounds a bug
HOLD_OPENED = 0.05
"""Seconds an engine-made connection's OPENED record may wait in Python, undecoded, for its
DONE (while :attr:`NativeRelay.hold` says so): a short connection whose DONE comes within
that time is counted without a handle or a table entry. Readers (``catch_up``), a takeover
and any other set-up event release them at once."""



@dataclass(slots=True)
class SetupEvent:
    """What the engine's connection set-up reports (``uproxy_event``), decoded.

    ``kind``: ``opened`` (relayed: ``handle``, its on_done still to be set; or, when the
    connection already ended in the same batch, no handle and its ``result``),
    ``connect_failed`` (one attempt: ``endpoint``, ``error``), ``refused`` (the client
    got a RST: ``reason`` as :mod:`uproxy.connect` names it, or ``no_service``,
    ``cancelled``), ``no_fds`` (the listener pauses; ``error``) or ``no_link`` (transparent
    mode: ``endpoint``, on this node, has no on-link route in the links the engine has).

    Addresses stay packed (``*_raw``: the engine's 16 bytes and the port) until
    :attr:`client` or :attr:`endpoint` is read: a connection that opens and closes
    within one batch is counted without ever being turned into strings.
    """

    kind: str
    listener: int
    family: int = socket.AF_INET
    client_raw: tuple[bytes, int] | None = None
    endpoint_raw: tuple[bytes, int] | None = None
    index: int = -1
    attempts: int = 0
    error: str | None = None
    reason: str | None = None
    handle: NativeRelayHandle | None = None
    ended: tuple[int, int, str | None] | None = None  # opened: it already ended (no handle):
    # bytes up, bytes down and error, as its RelayResult would say

    @property
    def client(self) -> tuple[str, int] | None:
        return _unpack_address(self.family, self.client_raw)

    @property
    def endpoint(self) -> tuple[str, int] | None:
        return _unpack_address(self.family, self.endpoint_raw)


def _unpack_address(family: int, raw: tuple[bytes, int] | None) -> tuple[str, int] | None:
    if raw is None:
        return None
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[0]), raw[1]
    return socket.inet_ntop(socket.AF_INET, raw[0][:4]), raw[1]


SetupSink = Callable[[list[SetupEvent]], None]
ShortGroup = tuple["SetupEvent", int, int, int]
"""Connections that opened and closed while held: one OPENED-like event (no client, no
handle) standing for every one of them with that listener and endpoint, then their count
and bytes up and down."""
ShortSink = Callable[[list[ShortGroup]], None]


class _RawEvent(NamedTuple):
    """``struct uproxy_event`` as unpacked in one go (field names checked against the cdef)."""

    kind: int
    listener: int
    token: int
    conn: int
    endpoint: int
    attempts: int
    err: int
    reason: int
    family: int
    client_addr: bytes
    client_port: int
    endpoint_addr: bytes
    endpoint_port: int


# tuple.__new__(_RawEvent, t): the same as _RawEvent._make(t), without a Python frame a record
_as_raw_event: Callable[[tuple[Any, ...]], _RawEvent] = functools.partial(tuple.__new__, _RawEvent)


def _layout(ffi: Any, cname: str, names: Sequence[str]) -> struct.Struct:
    """A :class:`struct.Struct` reading ``cname`` (its fields ``names``, in order) as the
    compiler laid it out: offsets and sizes from cffi, never re-declared here. One unpack
    of a whole batch costs less than reading every field of every record through cffi."""
    ctype = ffi.typeof(cname)
    fmt, at = ["="], 0
    fields = list(ctype.fields)
    assert [n for n, _ in fields][:len(names)] == list(names), (cname, fields)
    for _name, field in fields[:len(names)]:
        size = ffi.sizeof(field.type)
        if field.offset > at:
            fmt.append(f"{field.offset - at}x")
        kind = field.type.kind
        if kind == "array":
            fmt.append(f"{size}s")
        elif kind == "pointer" or field.type.cname in ("uint64_t", "size_t"):
            fmt.append({8: "Q", 4: "I"}[size])
        else:
            fmt.append({4: "i", 8: "q"}[size])
        at = field.offset + size
    fmt.append(f"{ffi.sizeof(ctype) - at}x")
    return struct.Struct("".join(fmt))


_STAT_NAMES = ("conns_live", "pipes_in_use", "pipes_total", "pipes_max", "pipe_size",
               "splice_bytes", "copy_bytes", "bufs_in_use", "setups_live", "setups_opened",
               "setups_refused", "closes_first", "tw_destroyed", "tw_left", "fins_with_data",
               "acks_with_data")
_DONE_FIELDS = ("conn", "token", "bytes_up", "bytes_down", "reason", "side", "err")


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


def _ignore_result(result: RelayResult) -> None:
    pass


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


_NOTHING_YET = RelayResult(0, 0)  # (frozen: one for every handle, not one each)


class NativeRelayHandle:
    """A connection owned by the engine. Counters are read from C memory until
    the completion arrives, then frozen (the engine frees that memory)."""

    native = True
    __slots__ = ("_conn", "_detached", "_final", "_on_done", "_relay", "_socks", "_twin",
                 "_want_detach")

    def __init__(self, relay: NativeRelay, conn: Any, on_done: DoneCallback) -> None:
        self._relay = relay
        self._conn: Any = conn
        self._on_done = on_done
        self._final = _NOTHING_YET
        self._want_detach = False
        self._detached: RelayState | None = None  # taken back from the engine (a takeover)
        self._socks: tuple[socket.socket, socket.socket] | None = None
        self._twin: PyRelayHandle | RefusedHandle | None = None  # where it went on after resume

    @property
    def bytes_up(self) -> int:
        conn = self._conn
        if conn is not None:
            return int(conn.bytes_up)
        return self._twin.bytes_up if self._twin is not None else self._final.bytes_up

    @property
    def bytes_down(self) -> int:
        conn = self._conn
        if conn is not None:
            return int(conn.bytes_down)
        return self._twin.bytes_down if self._twin is not None else self._final.bytes_down

    def abort(self) -> None:
        if self._conn is not None:
            self._relay._abort(self._conn)
        elif self._twin is not None:
            self._twin.abort()

    # Takeover: the engine hands the connection back, with the bytes its pipes held.
    def request_pause(self) -> None:
        """Ask the engine to hand the connection back, without waiting (see ``pause``):
        asking for every connection first, then waiting, costs one round trip, not one each."""
        if self._conn is not None and not self._want_detach and self._relay._stopped is None:
            self._want_detach = True
            self._relay._lib.uproxy_engine_detach(self._relay._raw, self._conn)

    def pause(self) -> bool:
        """Take the connection back from the engine (waits for it); False if it ended."""
        if isinstance(self._twin, PyRelayHandle):  # resumed on the twin after a failed takeover
            return self._twin.pause()
        if self._conn is None or self._relay._stopped is not None:
            return self._detached is not None
        self.request_pause()
        deadline = time.monotonic() + DETACH_TIMEOUT
        while self._conn is not None and time.monotonic() < deadline:
            # (poll, not select: the eventfd may be above FD_SETSIZE with 10,000 listeners)
            waiter = select.poll()
            waiter.register(self._relay._efd, select.POLLIN)
            waiter.poll(max(0.0, deadline - time.monotonic()) * 1000)
            self._relay._on_completions()
        if self._detached is None:
            self._want_detach = False  # a late answer resumes it on the twin
        return self._detached is not None

    def state(self) -> RelayState:
        if isinstance(self._twin, PyRelayHandle):
            return self._twin.state()
        assert self._detached is not None
        return self._detached

    def sockets(self) -> tuple[socket.socket, socket.socket]:
        if isinstance(self._twin, PyRelayHandle):
            return self._twin.sockets()
        assert self._socks is not None
        return self._socks

    def resume(self) -> None:
        """The takeover failed: relay on in this process, back on the engine with the
        state it handed over (on the Python twin only when the engine refuses it)."""
        if isinstance(self._twin, PyRelayHandle):
            self._twin.resume()
            return
        if self._detached is None or self._socks is None:
            return
        state, (client, backend) = self._detached, self._socks
        self._detached = self._socks = None
        self._want_detach = False
        if self._relay._attach(self, client, backend, state):
            return
        self._twin = self._relay._resume_relay().adopt(client, backend, state, self._on_done)

    def release(self) -> None:
        """The new process owns the connection: close our fds only (no shutdown, no RST)."""
        if isinstance(self._twin, PyRelayHandle):
            self._twin.release()
            return
        if self._detached is None or self._socks is None:
            return
        state = self._detached
        for sock in self._socks:
            sock.close()
        self._detached = self._socks = None
        self._on_done(RelayResult(state.up, state.down, HANDED_OVER))


class NativeRelay:
    """The C engine behind the :class:`Relay` contract (see the module docstring)."""

    name = "native"

    @property
    def threads(self) -> int:
        """Engine threads accepting and relaying (``--engine-threads``)."""
        return self._threads

    def __init__(self, loop: asyncio.AbstractEventLoop, *, max_pipes: int | None = None,
                 pipe_size: int = PIPE_SIZE, keep_free_pipes: int = KEEP_FREE_PIPES,
                 threads: int = 1) -> None:
        self.loop = loop
        self._lib = native.lib()
        ffi = self._ffi = native.ffi()
        if max_pipes is None:
            max_pipes = default_max_pipes(pipe_size)
        # (threads > 1: a group behind one handle, one eventfd; see uproxy_native.h)
        engine = self._lib.uproxy_engine_new_threads(threads, max_pipes, pipe_size,
                                                     keep_free_pipes)
        if engine == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"native relay engine: {os.strerror(err)}")
        # Freed by close(); the gc hook only covers a relay dropped without it.
        self._engine: Any = ffi.gc(engine, self._lib.uproxy_engine_free)
        self._raw = engine
        self._threads = int(self._lib.uproxy_engine_threads(engine))
        self._efd: int = self._lib.uproxy_engine_eventfd(engine)
        self._done_buf = ffi.new("struct uproxy_done[]", _POLL_BATCH)
        self._stats = ffi.new("struct uproxy_engine_stats *")
        self._live: dict[int, NativeRelayHandle] = {}
        self._next_token = 1
        self._stopped: asyncio.Future[None] | None = None
        self._final_stats: dict[str, int] = {}
        self._resumed: PyRelay | None = None  # connections taken back whose takeover failed
        self._events_buf = ffi.new("struct uproxy_event[]", _POLL_BATCH)
        self.setup_sink: SetupSink | None = None  # who hears of the engine's set-ups
        self.batch_end: Callable[[], None] | None = None  # called after every batch
        self.in_batch = False  # in _on_completions (batch_end comes before it returns)
        self.hold: Callable[[], bool] | None = None  # may OPENED records wait (HOLD_OPENED)?
        # who hears of the held ones that ended, grouped (else they go to setup_sink one by one)
        self.short_sink: ShortSink | None = None
        self._held: dict[int, tuple[_RawEvent, float]] = {}  # token -> (OPENED, when read)
        self._hold_timer: asyncio.TimerHandle | None = None
        self._event_layout = _layout(ffi, "struct uproxy_event", _RawEvent._fields)
        self._done_layout = _layout(ffi, "struct uproxy_done", _DONE_FIELDS)
        self._conn_type = ffi.typeof("struct uproxy_conn *")  # (cast by name: a lookup each)
        lib = self._lib
        self._refused = {lib.UPROXY_REFUSED_NO_SERVICE: "no_service",
                         lib.UPROXY_REFUSED_NO_ENDPOINTS: "no_endpoints",
                         lib.UPROXY_REFUSED_ALL_FAILED: "all_failed",
                         lib.UPROXY_REFUSED_NO_SOCKET: "no_socket",
                         lib.UPROXY_REFUSED_ABORTED: "cancelled"}
        # (under load the engine writes the eventfd at most every 40 ms, so
        # the bookkeeping runs in batches: native/relay.c, notify_python)
        loop.add_reader(self._efd, self._on_completions)

    # Connection set-up in the engine: listeners, their endpoints, the events. -----------
    def setup_config(self, timeouts: Sequence[float], *, avoid: float, fd_retry: float,
                     fd_wait: float, fd_pause: float) -> None:
        rc = self._lib.uproxy_engine_setup_config(self._raw, list(timeouts), len(timeouts),
                                                  avoid, fd_retry, fd_wait, fd_pause)
        if rc < 0:
            raise ValueError(f"engine set-up config refused: {os.strerror(-rc)}")

    def listener_add(self, fd: int) -> int:
        """The engine accepts on ``fd`` from now on (the socket stays the caller's)."""
        if self._stopped is not None:
            raise OSError(0, "relay closed")
        lid = self._lib.uproxy_engine_listener_add(self._raw, fd)
        if lid < 0:
            raise OSError(-lid, f"native listener: {os.strerror(-lid)}")
        return int(lid)

    def listener_set(self, lid: int, *, has_service: bool, family: int,
                     endpoints: Sequence[tuple[str, int, int, float]],
                     here: Sequence[bool] = (), transparent: int = 0,
                     affinity_group: int = -1, affinity_timeout: float = 0.0) -> None:
        """The endpoints new clients of ``lid`` may go to: (ip, port, index, avoided until
        (``time.monotonic()``, 0: not)); ``here``: which are on this node; ``transparent``:
        ``UPROXY_TP_*`` bits (see :meth:`transparent_bits`); ClientIP affinity: the pins of
        ``affinity_group`` (the service port's number) with ``affinity_timeout`` seconds
        (0: none)."""
        if self._engine is None:
            return
        af, size = (socket.AF_INET6, 16) if family == 6 else (socket.AF_INET, 4)
        n = len(endpoints)
        addrs = b"".join(socket.inet_pton(af, ip) for ip, _, _, _ in endpoints)
        rc = self._lib.uproxy_engine_listener_set(
            self._raw, lid, int(has_service), family, n, addrs if n else self._ffi.NULL,
            [p for _, p, _, _ in endpoints], [i for _, _, i, _ in endpoints],
            [a for _, _, _, a in endpoints],
            [int(h) for h in here] if here else self._ffi.NULL, transparent,
            affinity_group, affinity_timeout)
        assert size * n == len(addrs)
        if rc < 0:
            raise OSError(-rc, f"native listener endpoints: {os.strerror(-rc)}")

    def listeners_add(self, listeners: Sequence[ListenerPush]) -> list[tuple[int, int]]:
        """:meth:`listener_add` then :meth:`listener_set` for each of ``listeners`` in one
        C call (a start hands over 10,000): per listener (its id or add's -errno, set's 0
        or -errno); a failed add leaves nothing done for that listener, a failed set
        leaves it added without endpoints (as the two calls would). OSError: none added
        (the relay is closed)."""
        n = len(listeners)
        if self._stopped is not None:
            raise OSError(0, "relay closed")
        if self._engine is None or not n:
            return [(-errno.ENOSYS, 0)] * n
        inet_pton, af4, af6 = socket.inet_pton, socket.AF_INET, socket.AF_INET6
        fds, has, fams, counts, tps, groups, timeouts = [], [], [], [], [], [], []
        addrs: list[bytes] = []
        ports: list[int] = []
        indexes: list[int] = []
        avoid: list[float] = []
        here: list[int] = []
        for fd, has_service, family, endpoints, on_node, transparent, group, timeout \
                in listeners:
            fds.append(fd)
            has.append(has_service)
            fams.append(family)
            counts.append(len(endpoints))
            tps.append(transparent)
            groups.append(group)
            timeouts.append(timeout)
            af = af6 if family == 6 else af4
            for ip, port, index, until in endpoints:
                addrs.append(inet_pton(af, ip))
                ports.append(port)
                indexes.append(index)
                avoid.append(until)
            if on_node:
                here += map(int, on_node)
            else:
                here += [0] * len(endpoints)
        if not ports:  # (no endpoint at all: the C arrays still need an address)
            addrs, ports, indexes, avoid, here = [bytes(4)], [0], [0], [0.0], [0]
        ffi = self._ffi
        ids, errs = ffi.new("int[]", n), ffi.new("int[]", n)
        rc = self._lib.uproxy_engine_listeners_add(
            self._raw, n, fds, has, fams, counts, b"".join(addrs), ports, indexes, avoid, here,
            tps, groups, timeouts, ids, errs)
        if rc < 0:
            raise OSError(-rc, f"native listeners: {os.strerror(-rc)}")
        return list(zip(ids, errs, strict=True))

    # ClientIP pins of the engine (native/affinity.c) ------------------------------------
    def affinity_export(self) -> list[tuple[int, str, tuple[str, int], float, float]]:
        """Every pin not expired: (group, client IP, endpoint (ip, port), seconds idle,
        timeout seconds)."""
        if self._engine is None:
            return []
        lib, ffi = self._lib, self._ffi
        size = max(64, int(lib.uproxy_engine_affinity_count(self._raw)) + 64)
        while True:  # (pins made meanwhile: ask again with room for them)
            buf = ffi.new("struct uproxy_pin[]", size)
            n = int(lib.uproxy_engine_affinity_export(self._raw, buf, size))
            if n <= size:
                break
            size = n + 64
        out = []
        for i in range(n):
            p = buf[i]
            cfam = socket.AF_INET6 if p.family == 6 else socket.AF_INET
            efam = socket.AF_INET6 if p.endpoint_family == 6 else socket.AF_INET
            client = socket.inet_ntop(cfam, bytes(p.client)[:16 if p.family == 6 else 4])
            ep = socket.inet_ntop(efam, bytes(p.endpoint)[:16 if p.endpoint_family == 6 else 4])
            out.append((int(p.group), client, (ep, int(p.endpoint_port)), float(p.idle),
                        float(p.timeout)))
        return out

    def affinity_import(self, pins: Sequence[tuple[int, str, tuple[str, int], float, float]]
                        ) -> int:
        """Pins as :meth:`affinity_export` gives them (a takeover); how many were taken."""
        if self._engine is None or not pins:
            return 0
        buf = self._ffi.new("struct uproxy_pin[]", len(pins))
        n = 0
        for group, client, (ip, port), idle, timeout in pins:
            try:
                cfam, craw = _packed(client)
                efam, eraw = _packed(ip)
            except (OSError, ValueError):
                continue  # (not an address: skipped, as the engine skips what it cannot use)
            p = buf[n]
            p.group, p.family, p.endpoint_family = group, cfam, efam
            p.client[0:len(craw)] = craw
            p.endpoint[0:len(eraw)] = eraw
            p.endpoint_port, p.idle, p.timeout = port, idle, timeout
            n += 1
        return int(self._lib.uproxy_engine_affinity_import(self._raw, buf, n))

    def affinity_sweep(self) -> int:
        return 0 if self._engine is None else int(self._lib.uproxy_engine_affinity_sweep(self._raw))

    def affinity_forget(self, group: int) -> int:
        if self._engine is None:
            return 0
        return int(self._lib.uproxy_engine_affinity_forget(self._raw, group))

    def affinity_count(self) -> int:
        return 0 if self._engine is None else int(self._lib.uproxy_engine_affinity_count(self._raw))

    def transparent_bits(self, *, on: bool, external: bool, external_local: bool) -> int:
        lib = self._lib
        return ((lib.UPROXY_TP_ON if on else 0) | (lib.UPROXY_TP_EXTERNAL if external else 0)
                | (lib.UPROXY_TP_EXTERNAL_LOCAL if external_local else 0))

    def set_links(self, links: Any) -> None:
        """Hand the engine a ``struct uproxy_links *`` (detached from its
        :class:`~uproxy.proxy.native_links.NativeLinks`; None: no links): it owns it now."""
        if self._engine is None:
            if links is not None:
                self._lib.uproxy_links_free(links)
            return
        self._lib.uproxy_engine_set_links(self._raw, self._ffi.NULL if links is None else links)

    def listener_pause(self, lid: int) -> None:
        if self._engine is not None:
            self._lib.uproxy_engine_listener_pause(self._raw, lid)

    def listener_resume(self, lid: int) -> None:
        if self._engine is not None:
            self._lib.uproxy_engine_listener_resume(self._raw, lid)

    def listener_remove(self, lid: int) -> None:
        """When this returns the engine no longer touches the fd."""
        if self._engine is not None:
            self._lib.uproxy_engine_listener_remove(self._raw, lid)

    def _read_events(self, out: list[_RawEvent]) -> None:
        """Every queued set-up event, unpacked (one ``struct.iter_unpack`` per 256)."""
        lib, buf, layout = self._lib, self._events_buf, self._event_layout
        while True:
            n = lib.uproxy_engine_events(self._raw, buf, _POLL_BATCH)
            if n:
                out.extend(map(_as_raw_event,
                               layout.iter_unpack(self._ffi.buffer(buf, n * layout.size))))
            if n < _POLL_BATCH:
                return

    def _decode(self, ev: _RawEvent, ended: dict[int, tuple[int, int, str | None]]) -> SetupEvent:
        kind, lib = ev.kind, self._lib
        if kind == lib.UPROXY_EV_OPENED:
            event = SetupEvent("opened", ev.listener, ev.family, (ev.client_addr, ev.client_port),
                               (ev.endpoint_addr, ev.endpoint_port), ev.endpoint, ev.attempts)
            result = ended.pop(ev.token, None)
            if result is not None:  # it ended in this batch: no handle, nothing live
                event.ended = result
            else:
                handle = NativeRelayHandle(self, self._ffi.cast(self._conn_type, ev.conn),
                                           _ignore_result)
                self._live[ev.token] = handle
                event.handle = handle
            return event
        if kind == lib.UPROXY_EV_NO_FDS:
            return SetupEvent("no_fds", ev.listener, error=os.strerror(ev.err))
        event = SetupEvent("", ev.listener, ev.family, (ev.client_addr, ev.client_port),
                           None if ev.endpoint < 0 else (ev.endpoint_addr, ev.endpoint_port),
                           ev.endpoint, ev.attempts)
        if kind == lib.UPROXY_EV_NO_LINK:
            event.kind = "no_link"
        elif kind == lib.UPROXY_EV_CONNECT_FAILED:
            event.kind = "connect_failed"
            event.error = "timed out" if ev.err == errno.ETIMEDOUT else os.strerror(ev.err)
        else:
            event.kind = "refused"
            event.reason = self._refused.get(ev.reason, "all_failed")
            event.error = os.strerror(ev.err) if ev.err else None
        return event

    def _resume_relay(self) -> PyRelay:
        if self._resumed is None:
            self._resumed = PyRelay(self.loop)
        return self._resumed

    def start(self, client: socket.socket, backend: socket.socket,
              on_done: DoneCallback) -> NativeRelayHandle | RefusedHandle:
        if self._stopped is not None:
            return refuse(self.loop, client, backend, on_done, "relay closed", native=True)
        token = self._next_token
        self._next_token += 1
        conn = self._lib.uproxy_engine_add(self._raw, client.fileno(), backend.fileno(), token)
        if conn == self._ffi.NULL:  # ENOMEM: the sockets are still ours
            error = f"error: {os.strerror(self._ffi.errno)}"
            return refuse(self.loop, client, backend, on_done, error, native=True)
        # The engine owns the fds now; the socket objects must forget them.
        client.detach()
        backend.detach()
        handle = NativeRelayHandle(self, conn, on_done)
        self._live[token] = handle
        return handle

    def adopt(self, client: socket.socket, backend: socket.socket, state: RelayState,
              on_done: DoneCallback) -> NativeRelayHandle | RefusedHandle:
        """A connection another process relayed until now, with its counters and bytes
        (:meth:`PyRelay.adopt`'s contract): the engine delivers the pending bytes first
        and sends the SHUT_WR an EOF already read still owes."""
        if self._stopped is not None:
            return refuse(self.loop, client, backend, on_done, "relay closed", native=True)
        handle = NativeRelayHandle(self, None, on_done)
        if self._attach(handle, client, backend, state):
            return handle
        # (ENOMEM: the sockets are still ours) the Python twin carries it rather than a reset
        handle._twin = self._resume_relay().adopt(client, backend, state, on_done)
        return handle

    def _attach(self, handle: NativeRelayHandle, client: socket.socket,
                backend: socket.socket, state: RelayState) -> bool:
        """Give the engine ``handle``'s connection with ``state``; False (the sockets
        still ours) when it refuses."""
        if self._stopped is not None:
            return False
        token = self._next_token
        self._next_token += 1
        conn = self._lib.uproxy_engine_add_state(
            self._raw, client.fileno(), backend.fileno(), token, state.up, state.down,
            state.pending_up, len(state.pending_up), state.pending_down,
            len(state.pending_down), int(state.eof_up), int(state.eof_down))
        if conn == self._ffi.NULL:
            return False
        client.detach()
        backend.detach()
        handle._conn = conn
        self._live[token] = handle
        return True

    def _abort(self, conn: Any) -> None:
        if self._stopped is None:
            self._lib.uproxy_engine_abort(self._raw, conn)

    def _on_completions(self, flush: bool = False) -> int:
        """One wake-up: the set-up events, then the completions, handled as one batch.

        A connection the engine set up whose DONE is already here with its OPENED gets no
        handle at all (its event carries the result); the others' callbacks run after
        the set-up sink, and :attr:`batch_end` last (the sink's per-batch totals).
        OPENED records without their DONE may wait for it (:data:`HOLD_OPENED`, while
        :attr:`hold` says so), undecoded; ``flush`` releases every one.
        Returns how many events and completions it handled."""
        if self.in_batch:  # (pause() waiting from a callback of this batch)
            return self._batch(flush)
        self.in_batch = True
        try:
            return self._batch(flush)
        finally:
            self.in_batch = False

    def _batch(self, flush: bool = False) -> int:
        lib, engine, buf = self._lib, self._raw, self._done_buf
        stopped = bool(lib.uproxy_engine_stopped(engine))  # before polling: then all are queued
        raw: list[_RawEvent] = []
        self._read_events(raw)  # an OPENED comes before its DONE
        count = len(raw)
        live, layout = self._live, self._done_layout
        closed_ok, setup_bit = lib.UPROXY_DONE_CLOSED, lib.UPROXY_SETUP_TOKEN
        detached = lib.UPROXY_DONE_DETACHED
        finished: list[tuple[NativeRelayHandle, RelayResult]] = []
        ended: dict[int, tuple[int, int, str | None]] = {}  # set-up, not live yet: OPENED in `raw`
        while True:
            n = lib.uproxy_engine_poll_release(engine, buf, _POLL_BATCH)  # (not the detached)
            count += int(n)
            records = layout.iter_unpack(self._ffi.buffer(buf, n * layout.size)) if n else ()
            for i, (_, token, up, down, reason, side, err) in enumerate(records):
                handle = live.pop(token, None)
                if reason == detached:
                    if handle is None and token & setup_bit:
                        self._drain_into(raw, ended)  # (and every held OPENED)
                        handle = live.pop(token, None)
                    self._detached(buf[i], handle)
                    lib.uproxy_engine_release(engine, buf[i].conn)
                    continue
                error = None if reason == closed_ok else _native_error(lib, reason, side, err)
                if handle is not None:
                    handle._conn = None
                    result = handle._final = RelayResult(up, down, error)
                    finished.append((handle, result))
                elif token & setup_bit:
                    ended[token] = (up, down, error)
            if n < _POLL_BATCH:
                break
        held = self._held
        if ended and len(ended) > sum(ev.token in ended for ev in raw) + (
                len(ended.keys() & held.keys()) if held else 0):
            self._read_events(raw)  # an OPENED queued after our first look
        if flush or stopped or self.hold is None or not self.hold():
            self._drain_into(raw, ended)
        else:
            self._drain_holding(raw, ended)
        for handle, result in finished:
            try:
                handle._on_done(result)
            except Exception as exc:
                self.loop.call_exception_handler({
                    "message": "relay on_done callback failed",
                    "exception": exc,
                })
        if self.batch_end is not None:
            try:
                self.batch_end()
            except Exception as exc:
                self.loop.call_exception_handler({"message": "set-up batch end failed",
                                                  "exception": exc})
        if self._stopped is not None and not self._stopped.done():
            if stopped:
                self._stopped.set_result(None)
            elif lib.uproxy_engine_stopped(engine):
                # The engine stopped while this batch ran: its last wake-up went into the
                # eventfd that uproxy_engine_poll drained above, so no reader call is
                # coming for it. Another pass sees it (and what it queued before it).
                return count + self._batch()
        return count

    def _drain_holding(self, raw: list[_RawEvent],
                       ended: dict[int, tuple[int, int, str | None]]) -> None:
        """As :meth:`_drain_into`, but an OPENED whose DONE is not here yet waits (up to
        :data:`HOLD_OPENED`) when the batch holds nothing else: the engine's order is kept
        (held records go first, and any other event releases them all)."""
        opened = self._lib.UPROXY_EV_OPENED
        if any(ev.kind != opened for ev in raw):
            self._drain_into(raw, ended)
            return
        held, now = self._held, self.loop.time()
        out: list[_RawEvent] = []
        done: list[_RawEvent] = []  # held ones that ended
        if held:
            cutoff = now - HOLD_OPENED
            for token, (ev, when) in list(held.items()):
                if token in ended:
                    done.append(ev)
                    del held[token]
                elif when <= cutoff:
                    out.append(ev)
                    del held[token]
        if ended:
            for ev in raw:
                if ev.token in ended:
                    done.append(ev)
                else:
                    held[ev.token] = (ev, now)
        else:
            for ev in raw:
                held[ev.token] = (ev, now)
        raw.clear()
        self._hand_on(out, ended)
        if self.short_sink is None:
            self._hand_on(done, ended)
        elif done:
            self._hand_short(done, ended)
        if held and self._hold_timer is None:
            self._hold_timer = self.loop.call_later(HOLD_OPENED, self._hold_over)

    def _hand_short(self, done: list[_RawEvent],
                    ended: dict[int, tuple[int, int, str | None]]) -> None:
        """The ended ones, counted per listener and endpoint, to :attr:`short_sink`."""
        groups: dict[tuple[int, int, bytes, int], list[Any]] = {}
        pop = ended.pop
        for ev in done:
            up, down, _ = pop(ev.token)
            key = (ev.listener, ev.endpoint, ev.endpoint_addr, ev.endpoint_port)
            sums = groups.get(key)
            if sums is None:
                groups[key] = [ev, 1, up, down]
            else:
                sums[1] += 1
                sums[2] += up
                sums[3] += down
        out: list[ShortGroup] = []
        for ev, count, up, down in groups.values():
            out.append((SetupEvent("opened", ev.listener, ev.family, None,
                                   (ev.endpoint_addr, ev.endpoint_port), ev.endpoint,
                                   ev.attempts), count, up, down))
        try:
            self.short_sink(out)  # type: ignore[misc]  # (checked by the caller)
        except Exception as exc:
            self.loop.call_exception_handler({"message": "set-up event handler failed",
                                              "exception": exc})

    def _hold_over(self) -> None:
        self._hold_timer = None
        if self._held and self._engine is not None:
            self._on_completions()

    def _drain_into(self, raw: list[_RawEvent],
                    ended: dict[int, tuple[int, int, str | None]]) -> None:
        """Decode the events read so far, after every held OPENED (registering the live
        handles), and hand them on."""
        held = self._held
        if held:
            raw[:0] = [ev for ev, _ in held.values()]
            held.clear()
        self._hand_on(raw, ended)
        raw.clear()

    def _hand_on(self, raw: list[_RawEvent],
                 ended: dict[int, tuple[int, int, str | None]]) -> None:
        if not raw:
            return
        events = [self._decode(ev, ended) for ev in raw]
        sink = self.setup_sink
        if sink is None:  # nobody listens: the opened ones' handles are kept right all the same
            return
        try:
            sink(events)
        except Exception as exc:
            self.loop.call_exception_handler({"message": "set-up event handler failed",
                                              "exception": exc})

    def _detached(self, done: Any, handle: NativeRelayHandle | None) -> None:
        """A connection the engine handed back: its fds and held bytes are ours again."""
        ffi = self._ffi
        state = RelayState(
            int(done.bytes_up), int(done.bytes_down),
            ffi.buffer(done.pending_up, done.pending_up_len)[:] if done.pending_up_len else b"",
            ffi.buffer(done.pending_down, done.pending_down_len)[:]
            if done.pending_down_len else b"",
            bool(done.eof_up), bool(done.eof_down))
        socks = (socket.socket(fileno=int(done.client_fd)),
                 socket.socket(fileno=int(done.backend_fd)))
        if handle is None:  # cannot happen (detach is asked through a live handle)
            for sock in socks:
                sock.close()
            return
        handle._conn = None
        handle._final = RelayResult(state.up, state.down)
        handle._detached, handle._socks = state, socks
        if not handle._want_detach:
            handle.resume()

    def catch_up(self) -> None:
        """Everything the engine has done so far is known (held OPENED records too)."""
        if self._engine is not None and self._stopped is None:
            self._on_completions(flush=True)

    def active(self) -> int:
        """Live connections, counting the ones the engine is still setting up."""
        setting_up = self._stat("setups_live")
        return len(self._live) + len(self._held) + setting_up + (
            self._resumed.active() if self._resumed is not None else 0)

    def stats(self) -> dict[str, int]:
        """Engine-wide figures: live connections, pool use, bytes per path."""
        if self._engine is None:
            return dict(self._final_stats)  # the last figures before the engine was freed
        self._lib.uproxy_engine_stats(self._raw, self._stats)
        s = self._stats
        return {name: int(getattr(s, name)) for name in _STAT_NAMES}

    def thread_stats(self) -> list[dict[str, int]]:
        """:meth:`stats` of each engine thread (``--engine-threads``), the first the leader's:
        how the group shares the work (the metrics' ``thread`` label)."""
        if self._engine is None:
            return []
        out = []
        for i in range(self._threads):
            self._lib.uproxy_engine_thread_stats(self._raw, i, self._stats)
            s = self._stats
            out.append({name: int(getattr(s, name)) for name in _STAT_NAMES})
        return out

    def _stat(self, name: str) -> int:
        """One engine-wide figure of :meth:`stats`, without building the others (per batch)."""
        if self._engine is None:
            return int(self._final_stats.get(name, 0))
        self._lib.uproxy_engine_stats(self._raw, self._stats)
        return int(getattr(self._stats, name))

    def closes_first(self) -> int:
        """Backend connections that got our FIN before sending theirs (ever): each leaves
        a TIME_WAIT socket on the node (transparent mode sweeps those)."""
        return self._stat("closes_first")

    def time_wait_left(self) -> int:
        """Of those, transparent ones whose TIME_WAIT socket the engine could not destroy
        at close by its exact address (ever): the caller sweeps for them (once a batch)."""
        return self._stat("tw_left")

    def time_wait_destroyed(self) -> int:
        """Transparent TIME_WAIT sockets the engine destroyed at close (ever)."""
        return self._stat("tw_destroyed")

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
        if self._resumed is not None:
            await self._resumed.close()
        if self._stopped is None:
            self._stopped = self.loop.create_future()
            self._lib.uproxy_engine_stop(self._raw)
        await asyncio.shield(self._stopped)
        if self._engine is None:  # a concurrent close() finished first
            return
        self._on_completions(flush=True)
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.loop.remove_reader(self._efd)
        self._final_stats = self.stats()
        engine, self._engine = self._engine, None
        self._ffi.release(engine)  # uproxy_engine_free: joins the (finished) thread


def _packed(ip: str) -> tuple[int, bytes]:
    """(4 or 6, the address's bytes) of an IP address string."""
    if ":" in ip:
        return 6, socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    return 4, socket.inet_pton(socket.AF_INET, ip)
