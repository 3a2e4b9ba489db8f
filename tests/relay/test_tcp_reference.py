"""The benchmark's C TCP relay (``native/tcp_reference.c``) builds and relays like uproxy.

``make bench`` measures it beside uproxy native as the ceiling of uproxy's TCP design (the
same engine, no Python), so it must really set up and relay connections: through a
REDIRECT rule, clients of the ClusterIP reach both pods, an endpoint that refuses is left
for the next one (no client sees an error), and a 4 MiB answer arrives whole -- with one
engine thread and with two (``-t``: ``make bench`` runs it with as many as uproxy's
``--engine-threads``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from bench.peers import build_tcp_reference
from uproxy.demo.lab import Lab

VIP, LOCAL = "10.0.0.12", 10080


@pytest.mark.parametrize("threads", [1, 2])
def test_reference_relay_sets_up_and_relays_through_the_cluster_ip(
        lab_factory: Callable[..., Lab], threads: int) -> None:
    lab = lab_factory(pods=3, name_hint="tcpref")
    for i in (1, 2):
        lab.start_echo(i, tcp_ports=(6789,))
    binary = build_tcp_reference(lab.workdir)
    # pod3 runs nothing on 6789: it refuses, and the engine tries another endpoint
    proc = lab.spawn("node", [str(binary), "-t", str(threads), str(LOCAL),
                              *(f"{lab.pod_ip(i)}:6789" for i in (1, 2, 3))], "tcp-reference")
    try:
        lab.wait_port("node", "0.0.0.0", LOCAL, "tcp", proc=proc)
        lab.run("node", ["iptables", "-t", "nat", "-A", "PREROUTING", "-d", VIP, "-p", "tcp",
                         "--dport", "80", "-j", "REDIRECT", "--to-ports", str(LOCAL)])
        result = lab.probe("tcp", VIP, "80", "--count", "60", "--concurrency", "6",
                           "--timeout", "3")
        assert sum(result["errors"].values()) == 0, result
        assert set(result["counts"]) == {"pod1", "pod2"}, result
        assert sum(result["counts"].values()) == 60, result
        block = b"0123456789abcdef" * 262144  # 4 MiB through the echo pods and back
        script = ("import socket,sys,hashlib\n"
                  f"s=socket.create_connection(('{VIP}',80),5)\n"
                  "data=sys.stdin.buffer.read()\n"
                  "s.sendall(data); s.shutdown(socket.SHUT_WR)\n"
                  "got=b''\n"
                  "while (c:=s.recv(65536)): got+=c\n"
                  "print(hashlib.sha256(got).hexdigest(), len(got))\n")
        out = lab.run("client", ["python3", "-c", script], input=block.decode(),
                      timeout=30)
        assert out.stdout.split() == [hashlib.sha256(block).hexdigest(), str(len(block))], \
            out.stdout
    finally:
        proc.terminate()
        proc.wait(10)
    log = lab.log("tcp-reference")
    assert f"ready ({threads} engine thread" in log and "opened" in log, log
