"""Open many idle TCP connections and hold them (run in the lab's client namespace).

::

    python -m bench.hold HOST PORT --count 10000 [--hold 60] [--max-time 30]

Prints one JSON line ``{"open": N, "failed": F, "elapsed": S}`` once every
connect has finished (or ``--max-time`` passed), then holds the open ones for
``--hold`` seconds and exits; the benchmark measures the proxy meanwhile and
kills this process when done. Connects run non-blocking, at most
``--in-flight`` at a time, so a slow proxy makes it slow, never stuck.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import selectors
import socket
import sys
import time
from collections.abc import Sequence


def hold(host: str, port: int, *, count: int, in_flight: int, max_time: float
         ) -> tuple[list[socket.socket], int, float]:
    sel = selectors.DefaultSelector()
    opened: list[socket.socket] = []
    failed = 0
    started = time.monotonic()
    deadline = started + max_time
    pending = 0
    launched = 0
    while (launched < count or pending) and time.monotonic() < deadline:
        while launched < count and pending < in_flight:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            rc = s.connect_ex((host, port))
            launched += 1
            if rc in (0, errno.EINPROGRESS):
                sel.register(s, selectors.EVENT_WRITE)
                pending += 1
            else:
                s.close()
                failed += 1
        for key, _ in sel.select(timeout=0.5):
            fobj = key.fileobj
            assert isinstance(fobj, socket.socket)
            s = fobj
            sel.unregister(s)
            pending -= 1
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                opened.append(s)
            else:
                s.close()
                failed += 1
    failed += pending + (count - launched)
    return opened, failed, time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hold")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--in-flight", type=int, default=256)
    p.add_argument("--hold", type=float, default=60.0)
    p.add_argument("--max-time", type=float, default=30.0)
    args = p.parse_args(argv)
    need = args.count + 100
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(need, hard), max(need, hard)))
    opened, failed, elapsed = hold(args.host, args.port, count=args.count,
                                   in_flight=args.in_flight, max_time=args.max_time)
    print(json.dumps({"open": len(opened), "failed": failed, "elapsed": round(elapsed, 3)}),
          flush=True)
    time.sleep(args.hold)
    for s in opened:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
