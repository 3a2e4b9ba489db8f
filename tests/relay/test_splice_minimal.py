"""The benchmark's minimal splice relay (``native/splice_minimal.c``) builds and relays.

``make bench`` runs it beside uproxy on the bulk row as the ceiling of any relay through a
second TCP connection (none of uproxy's code: blocking splices, a thread per direction),
so it must really relay: through a REDIRECT rule, 4 MiB to the echo pod arrive back whole,
for several connections in turn, and one connection's end does not end the next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from bench.peers import build_splice_minimal
from uproxy.demo.lab import Lab

VIP, LOCAL = "10.0.0.13", 10081


@pytest.mark.parametrize("congestion", ["", "cubic"], ids=["default", "cubic"])
def test_minimal_splice_relay_relays_whole_streams_through_the_cluster_ip(
        lab_factory: Callable[..., Lab], congestion: str) -> None:
    """(``-c cubic``: the bench's optional peer "minimal splice relay cubic".)"""
    lab = lab_factory(pods=1, name_hint="splicemin")
    lab.start_echo(1, tcp_ports=(6789,))
    binary = build_splice_minimal(lab.workdir)
    proc = lab.spawn("node", [str(binary), *(["-c", congestion] if congestion else []),
                              str(LOCAL), f"{lab.pod_ip(1)}:6789"], "splice-minimal")
    try:
        lab.wait_port("node", "0.0.0.0", LOCAL, "tcp", proc=proc)
        lab.run("node", ["iptables", "-t", "nat", "-A", "PREROUTING", "-d", VIP, "-p", "tcp",
                         "--dport", "80", "-j", "REDIRECT", "--to-ports", str(LOCAL)])
        block = b"0123456789abcdef" * 262144  # 4 MiB through the echo pod and back
        script = ("import socket,sys,hashlib\n"
                  "data=sys.stdin.buffer.read()\n"
                  "for _ in range(3):\n"
                  f"    s=socket.create_connection(('{VIP}',80),5)\n"
                  "    s.sendall(data); s.shutdown(socket.SHUT_WR)\n"
                  "    got=b''\n"
                  "    while (c:=s.recv(65536)): got+=c\n"
                  "    s.close()\n"
                  "    print(hashlib.sha256(got).hexdigest(), len(got))\n")
        out = lab.run("client", ["python3", "-c", script], input=block.decode(), timeout=60)
        want = f"{hashlib.sha256(block).hexdigest()} {len(block)}"
        assert out.stdout.splitlines() == [want] * 3, out.stdout
        assert proc.poll() is None, lab.log("splice-minimal")
    finally:
        proc.terminate()
        proc.wait(10)
