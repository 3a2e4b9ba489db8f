"""UDP flows in the per-endpoint tallies: the real UDP proxy on loopback (both loops, both
relay paths: the ``flavor`` fixture), real datagrams, echo backends."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import replace

from tests.support.matrix import Flavor, run_on
from tests.udp.test_udp_flows import NAME, ask, client, entry_for, setup


def test_flows_and_refusals_counted_per_endpoint(flavor: Flavor) -> None:
    async def body() -> None:
        async with setup(flavor, backends=2) as s:
            socks = [client(s.port) for _ in range(20)]  # 20 client ports: 20 flows
            try:
                answers = [await ask(s.port, sock=sock) for sock in socks]
                by_port = {str(b.port).encode(): ("127.0.0.1", b.port) for b in s.backends}
                tallies = s.conns.services[NAME].by_endpoint
                for answer, address in by_port.items():
                    n = answers.count(answer)
                    t = tallies.get(address)
                    got = (t.flows, t.flows_opened, t.opened) if t else (0, 0, 0)
                    assert got == (n, n, 0), (address, got)
                assert s.conns.services[NAME].flows == 20
            finally:
                for sock in socks:
                    sock.close()
            # An endpoint that refuses (ICMP port unreachable) is counted as failed.
            dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            dead.bind(("127.0.0.1", 0))
            dead_port = dead.getsockname()[1]
            dead.close()
            s.proxy.entries = {NAME: replace(entry_for(dead_port))}
            with client(s.port) as sock:
                for _ in range(3):
                    with contextlib.suppress(TimeoutError):  # the first may be lost
                        await ask(s.port, sock=sock, timeout=0.3)
            failed = s.conns.services[NAME].by_endpoint[("127.0.0.1", dead_port)].failed
            assert failed >= 1

    run_on(flavor, body)
