"""UDP services over IPv6 and dual-stack, end to end: the real daemon in the lab's node
namespace, ``ip6tables``, dnsmasq and the echo server in pod namespaces on both families,
``dig`` and the probe as clients, ``conntrack -f ipv6`` as the witness.

``dig`` only accepts a reply from the address it asked, so every answer over IPv6 proves
that replies leave from the address the request went to (``IPV6_PKTINFO``) and conntrack
turns it back into the ClusterIP. Named after the e2e "Granular Checks: Services Secondary
IP Family [LinuxOnly]" cases (test/e2e/network/dual_stack.go).

Both data paths serve IPv6 (the native batches carry an IPv6 client's address and port
beside the packed IPv4 key); the connections table says which one moved the bytes.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.support.matrix import Flavor
from tests.support.waiting import wait_until
from tests.udp.test_udp import udp_rows
from uproxy.demo.lab import Lab
from uproxy.demo.node import NodeProxy, endpoint_slice, service

pytestmark = pytest.mark.lab

DNS4, DNS6 = "10.0.0.53", "fd00:96::53"
NODE_PORT = 30053
PORTS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53,
          "nodePort": NODE_PORT},
         {"name": "echo", "port": 5353, "protocol": "UDP", "targetPort": 5353}]
SLICE_PORTS = [{"name": "dns", "port": 53, "protocol": "UDP"},
               {"name": "echo", "port": 5353, "protocol": "UDP"}]


def dns_objects(lab: Lab, v4: list[int], v6: list[int], **spec: object) -> list[dict[str, object]]:
    """A PreferDualStack NodePort DNS Service with the given IPv4 and IPv6 endpoint pods."""
    objs: list[dict[str, object]] = [
        service("dns", DNS4, PORTS, type="NodePort", clusterIPs=[DNS4, DNS6],
                ipFamilyPolicy="PreferDualStack", ipFamilies=["IPv4", "IPv6"], **spec)]
    if v4:
        objs.append(endpoint_slice("dns", [lab.pod_ip(i) for i in v4], SLICE_PORTS,
                                   name="dns-v4"))
    if v6:
        objs.append(endpoint_slice("dns", [lab.pod_ip6(i) for i in v6], SLICE_PORTS,
                                   name="dns-v6"))
    return objs


def start_pods(lab: Lab) -> None:
    for i in (1, 2, 3):
        lab.start_dnsmasq(i)
        lab.start_echo(i, udp_ports=(5353,))


def dig_many(lab: Lab, count: int, server: str, *, ns: str = "client",
             port: int = 53, source: str | None = None) -> Counter[str]:
    """``count`` queries from one dig run: each from a new source port (a new flow)."""
    batch = lab.workdir / f"queries-{count}.txt"
    batch.write_text("whoami.uproxy.test TXT\n" * count)
    argv = ["dig", f"@{server}", "-p", str(port), "+short", "+tries=1", "+time=2",
            "-f", str(batch)]
    if source:
        argv[1:1] = ["-b", source]
    out = lab.run(ns, argv, check=False, timeout=30).stdout
    return Counter(line.strip('"') for line in out.split())


def conntrack6(lab: Lab) -> str:
    return lab.run("node", ["conntrack", "-L", "-f", "ipv6", "-p", "udp"], check=False).stdout


def test_should_function_for_pod_service_udp_secondary_ip_family(lab: Lab,
                                                                  flavor: Flavor) -> None:
    """e2e "should function for pod-Service: udp", "... node-Service: udp", "... endpoint-
    Service: udp" and "should be able to handle large requests: udp" on the secondary
    family; each family reaches only its own endpoints."""
    start_pods(lab)
    node = NodeProxy(lab, loop=flavor.loop, native=flavor.native)
    node.write("dns.yaml", *dns_objects(lab, [1], [2, 3]))
    node.start(wait_for="default/dns:echo cluster IP")
    try:
        rules6 = node.wait_rules(lambda t: DNS6 in t, family=6)
        assert any(r[1:4] == (DNS6, 53, "UDP") for r in node.redirects(6)), rules6
        both = {"pod2", "pod3"}
        counts = dig_many(lab, 30, DNS6)
        assert sum(counts.values()) == 30 and set(counts) == both, counts
        assert set(dig_many(lab, 10, DNS4)) == {"pod1"}
        # node-Service: the node's own queries (ip6tables OUTPUT -> ::1, replies from ::1)
        node_counts = dig_many(lab, 10, DNS6, ns="node")
        assert sum(node_counts.values()) == 10 and set(node_counts) <= both, node_counts
        # endpoint-Service: an endpoint pod asks its own Service (hairpin)
        hairpin = dig_many(lab, 10, DNS6, ns="pod2")
        assert sum(hairpin.values()) == 10 and set(hairpin) <= both, hairpin
        # the secondary nodeIP:NodePort
        np = dig_many(lab, 10, lab.node_ip6, port=NODE_PORT)
        assert sum(np.values()) == 10 and set(np) <= both, np
        # large requests: 2000 bytes (the e2e size) up to the IPv6 maximum, whole
        for size in ("2000", "65527"):
            echo = lab.probe("udp", DNS6, "5353", "--size", size, "--count", "3")
            assert echo["counts"] == {"echo": 3}, echo
        rows6 = [r for r in udp_rows(lab) if lab.client_ip6 in str(r["client"])]
        assert rows6 and all(r["native"] is flavor.native for r in rows6), rows6
        assert f"dst={DNS6}" in conntrack6(lab)
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []
    assert f"dst={DNS6}" not in conntrack6(lab)  # no client left mapped to a closed port


def test_should_update_endpoints_udp_and_clean_stale_ipv6_conntrack(lab: Lab) -> None:
    """e2e "should update endpoints: udp" on the secondary family: a removed IPv6 endpoint
    and then the removed Service leave no conntrack entry behind (``conntrack -f ipv6``)."""
    start_pods(lab)
    node = NodeProxy(lab, loop="uvloop", args=["-v", "1"])
    node.write("dns.yaml", *dns_objects(lab, [1], [1, 2, 3]))
    node.start(wait_for="default/dns:dns cluster IP")
    counts = dig_many(lab, 30, DNS6)
    assert set(counts) == {"pod1", "pod2", "pod3"}, counts
    pod3 = lab.pod_ip6(3)
    assert f"src={pod3} " in conntrack6(lab)

    node.write("dns.yaml", *dns_objects(lab, [1], [1, 2]))  # pod3 leaves the IPv6 slice
    wait_until(lambda: f"src={pod3} " not in conntrack6(lab), timeout=30,
               message="no conntrack entry answered by pod3 over IPv6")
    assert f"dst={DNS6}" in conntrack6(lab)  # clients' mappings to the proxy are kept
    later = dig_many(lab, 30, DNS6)
    assert sum(later.values()) == 30 and set(later) == {"pod1", "pod2"}, later

    node.remove("dns.yaml")
    node.wait_rules(lambda text: DNS6 not in text, family=6)
    # (one `conntrack -R` line per entry, each a table dump: ~100 entries take seconds on a
    # busy machine)
    wait_until(lambda: f"dst={DNS6}" not in conntrack6(lab), timeout=30,
               message=lambda: f"entries to the IPv6 ClusterIP are left:\n{conntrack6(lab)}"
                               f"\n{node.log}")
    assert node.stop() == 0


def test_should_function_for_client_ip_based_session_affinity_udp_ipv6(lab: Lab) -> None:
    """e2e "should function for client IP based session affinity: udp [LinuxOnly]" on the
    secondary family: new flows (new source ports) from one client all reach one endpoint."""
    start_pods(lab)
    node = NodeProxy(lab, loop="asyncio")
    node.write("dns.yaml", *dns_objects(lab, [1, 2, 3], [1, 2, 3],
                                        sessionAffinity="ClientIP"))
    node.start(wait_for="default/dns:dns cluster IP")
    try:
        sticky = dig_many(lab, 20, DNS6)
        assert sum(sticky.values()) == 20 and len(sticky) == 1, sticky
        lab.add_client_ip("fd00:99::3")
        other = dig_many(lab, 20, DNS6, source="fd00:99::3")
        assert sum(other.values()) == 20 and len(other) == 1, other
    finally:
        assert node.stop() == 0
