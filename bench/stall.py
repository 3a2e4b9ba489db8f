"""The longest wait a client sees, on one keep-alive connection and on new connections.

::

    python -m bench.stall HOST PORT --seconds 10

Two threads for ``--seconds``: one sends HTTP/1.1 keep-alive ``GET /`` requests on one
connection (an established connection's view), the other opens a new connection per
request (a new client's view). Prints one JSON line: per thread the requests done, the
errors and the longest gap between two completed requests in ms. Run in the lab's
client namespace while uproxy is replaced (the takeover figure of ``make bench``).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

TIMEOUT = 10.0


def _request(sock: socket.socket, host: str) -> None:
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF in the response head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF in the response body")
        body += chunk


def _loop(host: str, port: int, seconds: float, keep_alive: bool, out: dict[str, Any]) -> None:
    done, errors, longest = 0, 0, 0.0
    samples: list[str] = []
    end = time.monotonic() + seconds
    last = time.monotonic()
    sock: socket.socket | None = None
    while time.monotonic() < end:
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=TIMEOUT)
            _request(sock, host)
            done += 1
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now
        except OSError as exc:
            errors += 1
            if len(samples) < 3:
                samples.append(f"{time.monotonic() - end + seconds:.2f}s: {exc!r}")
            if sock is not None:
                sock.close()
            sock = None
            continue
        if not keep_alive:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    out.update(requests=done, errors=errors, longest_gap_ms=round(longest * 1000, 1),
               samples=samples)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stall")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    result: dict[str, dict[str, Any]] = {"keepalive": {}, "new": {}}
    threads = [threading.Thread(target=_loop, args=(args.host, args.port, args.seconds,
                                                    name == "keepalive", result[name]))
               for name in result]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
