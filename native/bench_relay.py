"""Loopback comparison behind the engine-thread decision in uproxy/proxy/nativerelay.py.

    .venv/bin/python native/bench_relay.py bulk     native|callbacks|python [SECONDS]
    .venv/bin/python native/bench_relay.py pingpong native|callbacks|python [SECONDS]

``bulk``: iperf3 client -> this process (uvloop, relaying) -> iperf3 server,
one stream. ``pingpong``: a child process runs an echo server and 32 clients
sending 512-byte messages through this process. Printed: throughput, this
process's CPU seconds (all threads) and the event loop thread's share.

``callbacks`` is the alternative design: the event loop calls a splice step
(``os.splice``) from ``add_reader``/``add_writer`` callbacks per readiness.
127.0.0.1 only; every run is bounded by SECONDS (default 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import uvloop

from uproxy.proxy.nativerelay import NativeRelay
from uproxy.proxy.pyrelay import PyRelay
from uproxy.proxy.relay import RelayResult

F_SETPIPE_SZ = 1031
SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
PIPE = 256 * 1024
FRONT, BACK = 15201, 15202


class _Way:
    """One direction of the per-readiness design: fill the pipe when empty, drain it fully."""

    def __init__(self, conn: _CallbackConn, src: socket.socket, dst: socket.socket) -> None:
        self.conn, self.src, self.dst = conn, src, dst
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE)
        self.in_pipe = 0
        conn.loop.add_reader(src.fileno(), self.readable)

    def readable(self) -> None:
        try:
            n = os.splice(self.src.fileno(), self.w, PIPE, flags=SPLICE)
        except BlockingIOError:
            return
        except OSError:
            self.conn.finish()
            return
        if n == 0:
            self.conn.loop.remove_reader(self.src.fileno())
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
            self.conn.eof()
            return
        self.in_pipe = n
        if not self.drain():
            self.conn.loop.remove_reader(self.src.fileno())
            self.conn.loop.add_writer(self.dst.fileno(), self.writable)

    def drain(self) -> bool:
        while self.in_pipe:
            try:
                self.in_pipe -= os.splice(self.r, self.dst.fileno(), self.in_pipe, flags=SPLICE)
            except BlockingIOError:
                return False
        return True

    def writable(self) -> None:
        if self.drain():
            self.conn.loop.remove_writer(self.dst.fileno())
            self.conn.loop.add_reader(self.src.fileno(), self.readable)


class _CallbackConn:
    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket,
                 backend: socket.socket) -> None:
        self.loop, self.socks, self.eofs = loop, (client, backend), 0
        client.setblocking(False)
        backend.setblocking(False)
        self.ways = (_Way(self, client, backend), _Way(self, backend, client))

    def eof(self) -> None:
        self.eofs += 1
        if self.eofs == 2:
            self.finish()

    def finish(self) -> None:
        for s in self.socks:
            if s.fileno() >= 0:
                self.loop.remove_reader(s.fileno())
                self.loop.remove_writer(s.fileno())
                s.close()
        for w in self.ways:
            for fd in (w.r, w.w):
                with contextlib.suppress(OSError):
                    os.close(fd)


class CallbackRelay:
    name = "callbacks"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def start(self, client: socket.socket, backend: socket.socket,
              on_done: Callable[[RelayResult], None]) -> _CallbackConn:
        return _CallbackConn(self.loop, client, backend)

    async def close(self) -> None:
        pass


async def _proxy(mode: str, backend_port: int, seconds: int,
                 work: Callable[[], Any]) -> None:
    loop = asyncio.get_running_loop()
    relay: Any = {"native": NativeRelay, "python": PyRelay, "callbacks": CallbackRelay}[mode](loop)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", FRONT))
    listener.listen(64)
    listener.setblocking(False)

    async def serve() -> None:
        while True:
            client, _ = await loop.sock_accept(listener)
            backend = socket.socket()
            backend.setblocking(False)
            await loop.sock_connect(backend, ("127.0.0.1", backend_port))
            relay.start(client, backend, lambda result: None)

    server = asyncio.ensure_future(serve())
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time()
    amount, unit = await work()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time()
    server.cancel()
    await relay.close()
    listener.close()
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    per = (f"{cpu / (amount * seconds) * 1e6:5.1f} us CPU per round trip" if "round" in unit
           else f"{cpu / (amount * seconds / 8):5.2f} CPU s per GB")
    print(f"{mode:9s} {amount:10.2f} {unit}  process CPU {cpu:5.2f} s ({per}), "
          f"event loop thread {t1 - t0:5.2f} s")


async def _bulk(seconds: int) -> tuple[float, str]:
    proc = await asyncio.create_subprocess_exec(
        "iperf3", "-c", "127.0.0.1", "-p", str(FRONT), "-t", str(seconds), "-J",
        stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9, "Gbit/s"


async def _pingpong(seconds: int) -> tuple[float, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "_pingpong_child", str(seconds), stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    return int(out) / seconds, "round trips/s"


async def _pingpong_child(seconds: int) -> None:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65536):
                w.write(data)
        w.close()

    async def client(deadline: float) -> int:
        r, w = await asyncio.open_connection("127.0.0.1", FRONT)
        n, msg = 0, b"x" * 512
        while time.monotonic() < deadline:
            w.write(msg)
            await r.readexactly(len(msg))
            n += 1
        w.close()
        return n

    srv = await asyncio.start_server(echo, "127.0.0.1", BACK)
    deadline = time.monotonic() + seconds
    print(sum(await asyncio.gather(*(client(deadline) for _ in range(32)))))
    srv.close()


def main() -> None:
    what, mode = sys.argv[1], sys.argv[2]
    seconds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    if what == "_pingpong_child":
        uvloop.run(_pingpong_child(int(mode)))
    elif what == "pingpong":
        uvloop.run(_proxy(mode, BACK, seconds, lambda: _pingpong(seconds)))
    else:
        iperf = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(BACK)],
                                 stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            uvloop.run(_proxy(mode, BACK, seconds, lambda: _bulk(seconds)))
        finally:
            iperf.wait(10)


if __name__ == "__main__":
    main()
