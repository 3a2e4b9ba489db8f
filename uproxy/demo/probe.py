"""The client side of the lab: bounded connection loops that report which pods answered.

::

    python -m uproxy.demo.probe tcp  HOST PORT [--count 2000] [--concurrency 20] [--timeout 2]
                                               [--source-ip IP] [--hold S] [--max-time S]
    python -m uproxy.demo.probe udp  HOST PORT [--count N] [--new-socket-each] [--size BYTES] ...
    python -m uproxy.demo.probe echo HOST PORT --bytes N [--timeout S] [--source-ip IP]

Why it is shaped this way: tests, the demo and the benchmark all ask the same
question through a service address -- "how were my connections spread over the
pods, and did any fail?" -- so one tool answers it with one JSON line on stdout::

    {"counts": {"pod1": 1003, "pod2": 997},
     "errors": {"refused": 0, "timeout": 0, "reset": 0, "other": 0},
     "elapsed": 1.2, "attempted": 2000, "skipped": 0, "samples": []}

It speaks to :mod:`uproxy.demo.echo` (``whoami`` -> ``NAME PORT``). Every
operation has a timeout and the whole run a ``--max-time`` (attempts not started
in time are counted as ``skipped``), so a broken proxy makes it fail, never hang.
``samples`` holds up to five distinct error messages for debugging.
Raw non-blocking sockets on asyncio: ``--source-ip`` binds before connecting
(with ``IP_BIND_ADDRESS_NO_PORT`` so many connections can share one source IP).
UDP sockets are *connected*, so a reply from any address other than HOST:PORT
is not accepted -- exactly what a service proxy must get right.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import json
import os
import resource
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
ERROR_KINDS = ("refused", "timeout", "reset", "other")


class _Eof(ConnectionError):
    """The peer closed before sending the expected reply."""


class Tally:
    """Counts by answering pod and by error kind, plus a few error samples."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter({k: 0 for k in ERROR_KINDS})
        self.samples: list[str] = []
        self.attempted = 0

    def error(self, exc: BaseException) -> None:
        if isinstance(exc, ConnectionRefusedError):
            kind = "refused"
        elif isinstance(exc, TimeoutError):
            kind = "timeout"
        elif isinstance(exc, ConnectionResetError | BrokenPipeError | _Eof):
            kind = "reset"
        else:
            kind = "other"
        self.errors[kind] += 1
        msg = f"{kind}: {type(exc).__name__}: {exc}"
        if len(self.samples) < 5 and msg not in self.samples:
            self.samples.append(msg)

    def result(self, *, elapsed: float, total: int) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "errors": dict(self.errors),
            "elapsed": round(elapsed, 3),
            "attempted": self.attempted,
            "skipped": total - self.attempted,
            "samples": self.samples,
        }


def _socket(kind: socket.SocketKind, source_ip: str | None,
            host: str | None = None) -> socket.socket:
    v6 = ":" in (host or source_ip or "")
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    try:
        sock.setblocking(False)
        if source_ip:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def _read_line(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise _Eof(f"connection closed after {len(buf)} bytes, before a reply line")
        buf += chunk
        if len(buf) > 65536:
            raise _Eof("reply line longer than 64 KiB")
    return buf.split(b"\n", 1)[0]


def _who(reply: bytes) -> str:
    words = reply.decode(errors="replace").split()
    return words[0] if words else "<empty>"


async def tcp_whoami(host: str, port: int, *, count: int, concurrency: int, timeout: float,
                     source_ip: str | None = None, hold: float = 0.0,
                     max_time: float = 60.0) -> dict[str, Any]:
    """``count`` connections, ``concurrency`` at a time: send ``whoami``, read the line, close."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    start = time.monotonic()
    deadline = start + max_time
    next_index = 0

    async def one() -> None:
        sock = _socket(socket.SOCK_STREAM, source_ip, host)
        waiting = "connection"
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (host, port))
                waiting = "reply"  # (the samples say which one did not come)
                await loop.sock_sendall(sock, b"whoami\n")
                reply = await _read_line(loop, sock)
            if hold > 0:
                await asyncio.sleep(hold)
        except TimeoutError:
            try:
                local = f" (local port {sock.getsockname()[1]})"
            except OSError:
                local = ""
            raise TimeoutError(f"no {waiting} in {timeout:g}s{local}") from None
        finally:
            sock.close()
        tally.counts[_who(reply)] += 1

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and time.monotonic() < deadline:
            next_index += 1
            tally.attempted += 1
            try:
                await one()
            except (OSError, TimeoutError) as exc:
                tally.error(exc)

    # hard bound: the deadline stops new attempts; this stops stuck ones
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max_time + timeout + hold + 1.0):
            await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    return tally.result(elapsed=time.monotonic() - start, total=count)


def _drain(sock: socket.socket) -> None:
    """Discard late replies to earlier (timed-out) requests."""
    while True:
        try:
            sock.recv(65536)
        except (BlockingIOError, ConnectionRefusedError):
            return


async def udp_whoami(host: str, port: int, *, count: int, timeout: float,
                     source_ip: str | None = None, new_socket_each: bool = False,
                     concurrency: int = 1, size: int | None = None,
                     max_time: float = 60.0) -> dict[str, Any]:
    """``count`` request/reply exchanges over connected UDP sockets.

    Requests are ``whoami`` (counted by the answering pod), or with ``size`` a
    random datagram of that many bytes that must come back unchanged (counted as
    ``echo``; a different reply is an ``other`` error). One socket serves all
    requests one after another unless ``new_socket_each`` (then ``concurrency``
    sockets are in flight at once).
    """
    loop = asyncio.get_running_loop()
    tally = Tally()
    start = time.monotonic()
    deadline = start + max_time
    next_index = 0

    async def exchange(sock: socket.socket) -> None:
        payload = b"whoami" if size is None else os.urandom(size)
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, payload)
            reply = await loop.sock_recv(sock, 65536)
        if size is None:
            tally.counts[_who(reply)] += 1
        elif reply == payload:
            tally.counts["echo"] += 1
        else:
            raise OSError(errno.EBADMSG, f"echo mismatch: sent {len(payload)} bytes, "
                                         f"got {len(reply)} different bytes")

    shared: socket.socket | None = None

    async def worker() -> None:
        nonlocal next_index, shared
        while next_index < count and time.monotonic() < deadline:
            next_index += 1
            tally.attempted += 1
            try:
                if new_socket_each:
                    with _socket(socket.SOCK_DGRAM, source_ip, host) as sock:
                        sock.connect((host, port))  # UDP connect: no packet, sets the peer
                        await exchange(sock)
                    continue
                if shared is None:
                    shared = _socket(socket.SOCK_DGRAM, source_ip, host)
                    shared.connect((host, port))
                _drain(shared)
                await exchange(shared)
            except (OSError, TimeoutError) as exc:
                tally.error(exc)

    workers = max(1, min(concurrency, count)) if new_socket_each else 1
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_time + timeout + 1.0):
                await asyncio.gather(*(worker() for _ in range(workers)))
    finally:
        if shared is not None:
            shared.close()
    return tally.result(elapsed=time.monotonic() - start, total=count)


async def tcp_echo(host: str, port: int, *, nbytes: int, timeout: float,
                   source_ip: str | None = None) -> dict[str, Any]:
    """Send ``nbytes`` random bytes, half-close, read everything back, compare SHA-256."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    sent = received = 0
    error: str | None = None

    async def send(sock: socket.socket) -> None:
        nonlocal sent
        while sent < nbytes:
            chunk = os.urandom(min(65536, nbytes - sent))
            if sent == 0:  # a NUL first byte: never mistaken for HTTP or whoami
                chunk = b"\0" + chunk[1:]
            sent_hash.update(chunk)
            await loop.sock_sendall(sock, chunk)
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)

    async def recv(sock: socket.socket) -> None:
        nonlocal received
        while True:
            chunk = await loop.sock_recv(sock, 262144)
            if not chunk:
                return
            recv_hash.update(chunk)
            received += len(chunk)

    sock = _socket(socket.SOCK_STREAM, source_ip, host)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            await asyncio.gather(send(sock), recv(sock))
    except (OSError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    ok = error is None and sent == received == nbytes and \
        sent_hash.digest() == recv_hash.digest()
    result: dict[str, Any] = {"ok": ok, "sent": sent, "received": received,
                              "elapsed": round(time.monotonic() - start, 3)}
    if error is not None:
        result["error"] = error
    elif not ok:
        result["error"] = "received bytes differ from sent bytes"
    return result


def _raise_nofile_limit() -> None:
    """Many held connections need many descriptors: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uproxy.demo.probe",
                                description="bounded client loops for the uproxy lab")
    sub = p.add_subparsers(dest="mode", required=True)

    def common(sp: argparse.ArgumentParser, default_timeout: float) -> None:
        sp.add_argument("host")
        sp.add_argument("port", type=int)
        sp.add_argument("--timeout", type=float, default=default_timeout,
                        help="seconds per connection/exchange")
        sp.add_argument("--source-ip", default=None, help="bind to this address first")

    tcp = sub.add_parser("tcp", help="count which pods answer whoami over new connections")
    common(tcp, 2.0)
    tcp.add_argument("--count", type=int, default=100)
    tcp.add_argument("--concurrency", type=int, default=10)
    tcp.add_argument("--hold", type=float, default=0.0,
                     help="keep each connection open this long after the reply")
    tcp.add_argument("--max-time", type=float, default=60.0, help="bound on the whole run")

    udp = sub.add_parser("udp", help="count which pods answer whoami datagrams")
    common(udp, 2.0)
    udp.add_argument("--count", type=int, default=100)
    udp.add_argument("--new-socket-each", action="store_true")
    udp.add_argument("--concurrency", type=int, default=1,
                     help="sockets in flight (only with --new-socket-each)")
    udp.add_argument("--size", type=int, default=None,
                     help="send random datagrams of this size and expect them echoed")
    udp.add_argument("--max-time", type=float, default=60.0, help="bound on the whole run")

    echo = sub.add_parser("echo", help="send bytes, half-close, compare what comes back")
    common(echo, 30.0)
    echo.add_argument("--bytes", type=int, required=True, dest="nbytes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "count", 1) < 1 or getattr(args, "nbytes", 1) < 0:
        print("probe: --count must be >= 1 and --bytes >= 0", file=sys.stderr)
        return 2
    largest = 65527 if ":" in getattr(args, "host", "") else 65507  # the IPv6 / IPv4 maximum
    if args.mode == "udp" and args.size is not None and not 1 <= args.size <= largest:
        print(f"probe: --size must be within 1..{largest}", file=sys.stderr)
        return 2
    _raise_nofile_limit()
    if args.mode == "tcp":
        result = asyncio.run(tcp_whoami(
            args.host, args.port, count=args.count, concurrency=args.concurrency,
            timeout=args.timeout, source_ip=args.source_ip, hold=args.hold,
            max_time=args.max_time))
    elif args.mode == "udp":
        result = asyncio.run(udp_whoami(
            args.host, args.port, count=args.count, timeout=args.timeout,
            source_ip=args.source_ip, new_socket_each=args.new_socket_each,
            concurrency=args.concurrency, size=args.size, max_time=args.max_time))
    else:
        result = asyncio.run(tcp_echo(args.host, args.port, nbytes=args.nbytes,
                                      timeout=args.timeout, source_ip=args.source_ip))
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
