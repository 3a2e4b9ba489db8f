"""A small multi-port TCP/UDP backend that says who it is: the lab's stand-in for a pod's app.

``python -m uproxy.demo.echo --name pod1 --tcp 6789 --tcp 9876 --udp 53 [--bind IP ...]``

``--bind`` may repeat (e.g. ``--bind 0.0.0.0 --bind ::`` for both families; an
IPv6 socket is IPv6-only, so the two never collide).

Why it is shaped this way: tests and the demo need one backend that can answer
"which pod and which port did I reach?" over any protocol a client speaks, and
also move bulk bytes unchanged. Each TCP connection decides its mode from its
first bytes:

- an HTTP request (``GET``/``HEAD``/``POST``): one ``200 OK`` with a JSON body
  ``{"pod", "port", "client"}``, ``Connection: close``, like the tutorials' app;
- a first line exactly ``whoami``: the reply ``NAME PORT`` then plain echo;
- anything else: echo every byte back; on EOF from the client, finish writing
  and close (so half-closed bulk transfers come back whole).

UDP: the datagram ``whoami`` gets ``NAME PORT``, ``peer`` gets the sender's ``IP PORT``
(who the backend sees as its client, like ``client`` in the HTTP reply); any other
datagram is echoed back unchanged, from the socket it arrived on. Plain asyncio
protocols with flow control (no dependencies, thousands of connections); SIGTERM/SIGINT stop
it cleanly with exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from typing import cast

_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ")
_WHOAMI_LINE = b"whoami\n"
_MAX_HEAD = 64 * 1024
_MAX_BODY = 1024 * 1024


def _undecided(buf: bytes) -> bool:
    """True while ``buf`` could still become an HTTP request line or ``whoami\\n``."""
    return any(len(buf) < len(p) and p.startswith(buf) for p in (*_HTTP_METHODS, _WHOAMI_LINE))


class TcpEcho(asyncio.Protocol):
    """One TCP connection: HTTP, whoami-then-echo, or echo (decided by the first bytes)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.mode = "undecided"  # -> "http" | "echo"
        self.buf = b""
        self.port = 0
        self.client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        peer = transport.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}"

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.mode == "echo":
            self.transport.write(data)
            return
        if self.mode == "done":
            return  # answered; the rest of the request is discarded
        self.buf += data
        if self.mode == "undecided":
            if _undecided(self.buf):
                return
            if self.buf.startswith(_HTTP_METHODS):
                self.mode = "http"
            else:
                self.mode = "echo"
                if self.buf.startswith(_WHOAMI_LINE):
                    self.transport.write(f"{self.name} {self.port}\n".encode())
                    self.buf = self.buf[len(_WHOAMI_LINE):]
                pending, self.buf = self.buf, b""
                if pending:
                    self.transport.write(pending)
                return
        self._maybe_answer_http(eof=False)

    def _maybe_answer_http(self, *, eof: bool) -> None:
        assert self.transport is not None
        head_end = self.buf.find(b"\r\n\r\n")
        sep = 4
        if head_end < 0:
            head_end, sep = self.buf.find(b"\n\n"), 2
        if head_end < 0:
            if len(self.buf) > _MAX_HEAD:
                self._http_reply(431, {"error": "request head too large"})
            elif eof:
                self.transport.close()
            return
        head = self.buf[:head_end].decode("latin-1")
        body_len = 0
        for line in head.splitlines()[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                try:
                    body_len = int(value.strip())
                except ValueError:
                    self._http_reply(400, {"error": "bad content-length"})
                    return
        if body_len > _MAX_BODY:
            self._http_reply(413, {"error": "body too large"})
            return
        if len(self.buf) < head_end + sep + body_len and not eof:
            return  # read the body first, so closing does not reset the connection
        self._http_reply(200, {"pod": self.name, "port": self.port, "client": self.client},
                         head_only=head.startswith("HEAD "))

    def _http_reply(self, status: int, doc: dict[str, object], *, head_only: bool = False) -> None:
        assert self.transport is not None
        reasons = {200: "OK", 400: "Bad Request", 413: "Payload Too Large",
                   431: "Request Header Fields Too Large"}
        body = (json.dumps(doc) + "\n").encode()
        head = (f"HTTP/1.1 {status} {reasons[status]}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        self.transport.write(head if head_only else head + body)
        self.mode = "done"
        self.buf = b""
        self.transport.close()  # flushes the buffer first

    def eof_received(self) -> bool:
        if self.mode == "http":
            self._maybe_answer_http(eof=True)
        elif self.mode == "undecided" and self.buf and self.transport is not None:
            self.transport.write(self.buf)
            self.buf = b""
        return False  # the transport closes once everything written is sent

    # flow control: stop reading while the peer does not read our echo
    def pause_writing(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()


class UdpEcho(asyncio.DatagramProtocol):
    """``whoami`` -> ``NAME PORT``; ``peer`` -> the sender's ``IP PORT``; any other datagram
    back unchanged."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        assert self.transport is not None
        word = data.strip()
        if word == b"whoami":
            reply = f"{self.name} {self.port}".encode()
        elif word == b"peer":
            reply = f"{addr[0]} {addr[1]}".encode()
        else:
            reply = data
        self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from earlier replies; nothing to do


def _raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _bound(bind: str, kind: socket.SocketKind, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((bind, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(name: str, bind: str | Sequence[str], tcp_ports: Sequence[int],
                udp_ports: Sequence[int], *, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    binds = [bind] if isinstance(bind, str) else list(bind)
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    servers: list[asyncio.Server] = []
    transports: list[asyncio.BaseTransport] = []
    try:
        for address in binds:
            for port in tcp_ports:
                servers.append(await loop.create_server(
                    lambda: TcpEcho(name), sock=_bound(address, socket.SOCK_STREAM, port),
                    backlog=4096))
            for port in udp_ports:
                udp_transport, _ = await loop.create_datagram_endpoint(
                    lambda: UdpEcho(name), sock=_bound(address, socket.SOCK_DGRAM, port))
                transports.append(udp_transport)
        print(f"echo {name}: listening on {' '.join(binds)} tcp {list(tcp_ports)} "
              f"udp {list(udp_ports)}", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        for server in servers:
            server.close()
        for each in transports:
            each.close()
        for server in servers:
            await server.wait_closed()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uproxy.demo.echo",
                                description="multi-port TCP/UDP echo that says who it is")
    p.add_argument("--name", required=True, help="what whoami and HTTP answer with")
    p.add_argument("--tcp", type=int, action="append", default=[], metavar="PORT")
    p.add_argument("--udp", type=int, action="append", default=[], metavar="PORT")
    p.add_argument("--bind", action="append", default=[], metavar="IP",
                   help="address to listen on (repeatable; default 0.0.0.0)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.tcp and not args.udp:
        print("echo: give at least one --tcp or --udp port", file=sys.stderr)
        return 2
    _raise_nofile_limit()
    binds = args.bind or ["0.0.0.0"]
    try:
        asyncio.run(serve(args.name, binds, args.tcp, args.udp))
    except OSError as exc:
        print(f"echo {args.name}: cannot listen on {' '.join(binds)}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
