"""Long-lived connections that check every byte: ``python -m tests.takeover.streams HOST PORT``.

Run in the lab's client namespace while uproxy is upgraded under it. Against
an echo backend (``uproxy.demo.echo``), each connection is one of:

- ``chatty``: rounds of "send a block, read it back, compare checksums" until
  the time is up; every fourth one sends 4 MiB blocks, so bytes are in flight
  (in the kernel and in the relay) at any moment;
- ``halfclosed``: sends 8 MiB and half-closes while it reads the echo back
  slowly, so the relay holds the backend's bytes and the client's EOF when
  the takeover comes.

Prints one JSON line: ``{"ok": N, "broken": N, "rounds": N, "bytes": N, "errors": [...]}``.
Every wait has a timeout, so a stalled connection is counted broken, never hangs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import socket
import sys
import time
from collections.abc import Sequence

STALL = 10.0  # seconds without progress that count as broken


def _block(rng: random.Random, size: int) -> bytes:
    data = rng.randbytes(size)
    return b"\x00" + data[1:]  # never "GET", "whoami": the echo server's plain echo mode


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int,
                        *, slow: float = 0.0) -> bytes:
    parts, got = [], 0
    while got < size:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, min(65536, size - got)), STALL)
        if not chunk:
            raise ConnectionError(f"EOF after {got} of {size} bytes")
        parts.append(chunk)
        got += len(chunk)
        if slow:
            await asyncio.sleep(slow)
    return b"".join(parts)


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, (host, port)), STALL)
    return sock


async def chatty(host: str, port: int, index: int, deadline: float, stats: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(index)
    sock = await _connect(loop, host, port)
    try:
        while time.monotonic() < deadline:
            size = 4 << 20 if index % 4 == 0 else rng.randint(1, 64 << 10)
            block = _block(rng, size)
            sender = loop.create_task(asyncio.wait_for(loop.sock_sendall(sock, block), STALL * 3))
            echoed = await _recv_exactly(loop, sock, size)
            await sender
            if hashlib.sha256(echoed).digest() != hashlib.sha256(block).digest():
                raise ValueError(f"round {stats['rounds']}: the echo differs")
            stats["rounds"] += 1
            stats["bytes"] += size
            await asyncio.sleep(rng.random() * 0.05)
        sock.shutdown(socket.SHUT_WR)
        tail = await asyncio.wait_for(loop.sock_recv(sock, 1), STALL)
        if tail:
            raise ValueError("bytes after the last round")
    finally:
        sock.close()


async def halfclosed(host: str, port: int, index: int, seconds: float,
                     stats: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(1000 + index)
    size = 8 << 20
    block = _block(rng, size)
    sock = await _connect(loop, host, port)

    async def send_then_half_close() -> None:
        await asyncio.wait_for(loop.sock_sendall(sock, block), STALL * 3)
        sock.shutdown(socket.SHUT_WR)  # while most of the echo is still to come

    try:
        sender = loop.create_task(send_then_half_close())
        # Read slowly: the whole echo takes about ``seconds``, across the upgrades.
        chunks = size // 65536
        echoed = await _recv_exactly(loop, sock, size, slow=seconds / chunks)
        await sender
        if hashlib.sha256(echoed).digest() != hashlib.sha256(block).digest():
            raise ValueError("the echo differs")
        tail = await asyncio.wait_for(loop.sock_recv(sock, 1), STALL)
        if tail:
            raise ValueError("bytes after the echo")
        stats["bytes"] += size
    finally:
        sock.close()


async def run(host: str, port: int, conns: int, halfclosed_count: int, seconds: float) -> dict[
        str, object]:
    stats = {"rounds": 0, "bytes": 0}
    deadline = time.monotonic() + seconds
    jobs = [chatty(host, port, i, deadline, stats) for i in range(conns)]
    jobs += [halfclosed(host, port, i, seconds, stats) for i in range(halfclosed_count)]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return {"ok": len(results) - len(errors), "broken": len(errors), "errors": errors[:10],
            **stats}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streams")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--halfclosed", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.host, args.port, args.conns, args.halfclosed, args.seconds))
    print(json.dumps(result), flush=True)
    return 0 if result["broken"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
