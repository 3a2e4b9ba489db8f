"""The benchmark's C UDP relay (``native/udp_reference.c``) builds and relays like uproxy.

``make bench`` measures it beside uproxy as the ceiling of uproxy's UDP design, so it must
really relay: ``dig`` through a REDIRECT rule to it gets answers from both dnsmasq pods,
from the ClusterIP (dig rejects replies from any other source), with and without ``-c``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.peers import build_udp_reference
from uproxy.demo.lab import Lab

VIP, LOCAL = "10.0.0.10", 10053


@pytest.mark.parametrize("flags", [[], ["-c"]], ids=["listener-replies", "connected"])
def test_reference_relay_answers_through_the_cluster_ip(
        lab_factory: Callable[..., Lab], flags: list[str]) -> None:
    lab = lab_factory(pods=2, name_hint="udpref")
    for i in (1, 2):
        lab.start_dnsmasq(i)
    binary = build_udp_reference(lab.workdir)
    proc = lab.spawn("node", [str(binary), *flags, str(LOCAL),
                              *(f"{ip}:53" for ip in lab.pod_ips)], "udp-reference")
    lab.wait_port("node", "0.0.0.0", LOCAL, "udp", proc=proc)
    lab.run("node", ["iptables", "-t", "nat", "-A", "PREROUTING", "-d", VIP, "-p", "udp",
                     "--dport", "53", "-j", "REDIRECT", "--to-ports", str(LOCAL)])
    answers = []
    for sport in range(40000, 40008):  # one flow per source port, endpoints round-robin
        out = lab.run("client", ["dig", f"@{VIP}", "-b", f"0.0.0.0#{sport}", "+short",
                                 "+tries=1", "+time=2", "whoami.uproxy.test", "TXT"],
                      check=False)
        answers.append(out.stdout.strip())
    assert set(answers) == {'"pod1"', '"pod2"'}, answers
    proc.kill()
    proc.wait(5)
