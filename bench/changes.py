"""Endpoint-change-to-applied latency, seen from a client (run in the client namespace).

::

    python -m bench.changes MANIFEST VIP PORT --pods IP=NAME,IP=NAME [--count 40] [--gap 0.2]
                            [--control SOCKET]

Each round rewrites MANIFEST (atomically) so the service's single endpoint
moves to the other pod, stamping ``endpoints.kubernetes.io/last-change-trigger-time``
with the write time (or, with ``--control``, applies the same objects to the fake
API server of tests/k8s/apiserver.py), then opens short HTTP connections to VIP:PORT until the
answer comes from the new pod. The time from the write to that answer is the
latency a user sees (manifest poll + sync + the data path picking the new
endpoint). Prints one JSON line ``{"latencies": [...], "timeouts": N}``.
Every wait is bounded (``--timeout`` per change).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from uproxy.demo.node import endpoint_slice, service


def ask(vip: str, port: int, timeout: float = 0.5) -> str:
    """One HTTP/1.0 GET on a new connection; the body's first line (nginx pods answer podN)."""
    try:
        with socket.create_connection((vip, port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return ""
    body = data.partition(b"\r\n\r\n")[2].decode(errors="replace").strip()
    return body


def write(path: Path, vip: str, port: int, ip: str, *, stamp: bool = True) -> None:
    """Replace manifest ``path`` (atomically) with the churn objects."""
    objs = churn_objects(vip, port, ip, stamp=stamp)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(objs, sort_keys=False))
    os.replace(tmp, path)


def churn_objects(vip: str, port: int, ip: str, *, stamp: bool = True) -> list[dict[str, Any]]:
    """The churn Service and its EndpointSlice with ``ip`` as the only endpoint."""
    slice_ = endpoint_slice("churn", [ip], [{"name": "http", "port": port, "protocol": "TCP"}],
                            namespace="bench")
    if stamp:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        slice_["metadata"]["annotations"] = {
            "endpoints.kubernetes.io/last-change-trigger-time": now}
    return [service("churn", vip, [{"name": "http", "port": port, "targetPort": port}],
                    namespace="bench"), slice_]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.changes")
    p.add_argument("manifest", type=Path)
    p.add_argument("vip")
    p.add_argument("port", type=int)
    p.add_argument("--pods", required=True, help="IP=NAME,IP=NAME")
    p.add_argument("--count", type=int, default=40)
    p.add_argument("--gap", type=float, default=0.2)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--control", default=None,
                   help="apply through the fake API server's control socket instead of MANIFEST")
    args = p.parse_args(argv)
    change: Callable[[str], None]
    if args.control:
        from tests.k8s.apiserver import Control

        control = Control(args.control, timeout=5.0)

        def change(ip: str) -> None:
            control.apply(*churn_objects(args.vip, args.port, ip))
    else:
        def change(ip: str) -> None:
            write(args.manifest, args.vip, args.port, ip)

    pods = [tuple(item.split("=", 1)) for item in args.pods.split(",")]
    latencies: list[float] = []
    timeouts = 0
    for i in range(args.count):
        ip, name = pods[(i + 1) % len(pods)]
        t0 = time.monotonic()
        change(ip)
        while True:
            if ask(args.vip, args.port) == name:
                latencies.append(time.monotonic() - t0)
                break
            if time.monotonic() - t0 > args.timeout:
                timeouts += 1
                break
            time.sleep(0.001)
        time.sleep(args.gap)
    print(json.dumps({"latencies": [round(v, 5) for v in latencies], "timeouts": timeouts}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
