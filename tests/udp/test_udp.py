"""UDP services end to end: the real daemon in the lab's node namespace, dnsmasq and the echo
server in pod namespaces, ``dig`` and the probe as clients, ``conntrack`` and ``ss`` as the
witnesses of what the node holds.

``dig`` only accepts a reply from the address it asked, so every answer here also proves
that replies leave with the ClusterIP as their source (conntrack's reverse mapping).
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections import Counter

import pytest

from tests.support.matrix import Flavor
from tests.support.waiting import wait_until
from uproxy.demo.lab import Lab
from uproxy.demo.node import NodeProxy, endpoint_slice, service

DNS_IP = "10.0.0.10"
STICKY_IP = "10.0.0.11"
PORTS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
         {"name": "echo", "port": 5353, "protocol": "UDP", "targetPort": 5353}]
SLICE_PORTS = [{"name": "dns", "port": 53, "protocol": "UDP"},
               {"name": "echo", "port": 5353, "protocol": "UDP"}]
WHOAMI = ["whoami.uproxy.test", "TXT", "+short", "+tries=1", "+time=2"]

# A client that keeps one source port and asks again every 50 ms, as forwarders do; prints
# one JSON line: how many asked, answered, and by whom.
STEADY_CLIENT = textwrap.dedent("""\
    import json, re, socket, struct, sys, time
    server, port, sport, seconds, stop_when_answered = (
        sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1")
    qname = b"".join(bytes([len(p)]) + p for p in b"whoami.uproxy.test".split(b".")) + b"\\0"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", sport))
    sock.connect((server, port))
    sock.settimeout(1.0)
    asked, answers, first = 0, {}, None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        asked += 1
        sock.send(struct.pack("!HHHHHH", asked & 0xFFFF, 0x0100, 1, 0, 0, 0) + qname
                  + struct.pack("!HH", 16, 1))
        try:
            reply = sock.recv(4096)
        except (TimeoutError, ConnectionRefusedError):
            continue
        m = re.search(rb"pod[0-9]+", reply)
        who = m.group().decode() if m else "?"
        answers[who] = answers.get(who, 0) + 1
        first = first or asked
        if stop_when_answered:
            break
        time.sleep(0.05)
    print(json.dumps({"asked": asked, "answers": answers, "first_answer": first}))
""")

# Bursts: many datagrams sent before any reply is read (what dnsperf does), so the proxy
# receives and sends them in batches; prints how many came back, whole and in order.
BURST_CLIENT = textwrap.dedent("""\
    import json, socket, sys
    server, port = sys.argv[1], int(sys.argv[2])
    sizes = [int(x) for x in sys.argv[3].split(",")]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect((server, port))
    sock.settimeout(2.0)
    result = {"sent": 0, "received": 0, "whole_in_order": True}
    for burst in range(3):
        sent = [bytes([burst * 64 + i % 64]) * size for i, size in enumerate(sizes)]
        for payload in sent:
            sock.send(payload)
        result["sent"] += len(sent)
        got = []
        try:
            while len(got) < len(sent):
                got.append(sock.recv(65536))
        except TimeoutError:
            pass
        result["received"] += len(got)
        result["whole_in_order"] = result["whole_in_order"] and got == sent
    print(json.dumps(result))
""")


def dns_objects(lab: Lab, pods: list[int], *, name: str = "dns", ip: str = DNS_IP,
                **spec: object) -> tuple[dict[str, object], dict[str, object]]:
    return (service(name, ip, PORTS, **spec),
            endpoint_slice(name, [lab.pod_ip(i) for i in pods], SLICE_PORTS))


def start_pods(lab: Lab, pods: int = 3) -> None:
    for i in range(1, pods + 1):
        lab.start_dnsmasq(i)
        lab.start_echo(i, udp_ports=(5353,))


def dig_many(lab: Lab, count: int, *, ns: str = "client", server: str = DNS_IP) -> Counter[str]:
    """``count`` queries from one dig run: each from a new source port (a new flow)."""
    batch = lab.workdir / f"queries-{count}.txt"
    batch.write_text("whoami.uproxy.test TXT\n" * count)
    out = lab.run(ns, ["dig", f"@{server}", "+short", "+tries=1", "+time=2", "-f", str(batch)],
                  check=False, timeout=30).stdout
    return Counter(line.strip('"') for line in out.split())


def dig_one(lab: Lab, *, ns: str = "client", server: str = DNS_IP,
            source: str | None = None) -> str:
    argv = ["dig", f"@{server}", *WHOAMI]
    if source:
        argv[1:1] = ["-b", source]
    return lab.run(ns, argv, check=False).stdout.strip().strip('"')


def backend_flows(lab: Lab) -> list[str]:
    """Peers of the node's connected UDP sockets to pods: one per uproxy flow."""
    out = lab.run("node", ["ss", "-Hun"]).stdout
    peers = [line.split()[-1] for line in out.splitlines() if line.strip()]
    return [p for p in peers if p.startswith("172.17.0.")]


def conntrack_udp(lab: Lab) -> str:
    return lab.run("node", ["conntrack", "-L", "-p", "udp"], check=False).stdout


def status(lab: Lab, path: str) -> str:
    """GET from the daemon's status server (it listens on the node's own loopback)."""
    return lab.run("node", ["curl", "-sS", "--max-time", "3",
                            f"http://127.0.0.1:10249{path}"]).stdout


def udp_rows(lab: Lab) -> list[dict[str, object]]:
    doc = json.loads(status(lab, "/api/v1/connections"))
    return [row for row in doc["items"] if row["protocol"] == "UDP"]


def metric(lab: Lab, name: str, **labels: str) -> float:
    """Sum of one metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in status(lab, "/metrics").splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def pod_of(lab: Lab, peer: str) -> str:
    ip = peer.rsplit(":", 1)[0]
    return f"pod{lab.pod_ips.index(ip) + 1}"


def test_dig_through_the_cluster_ip_and_whole_large_datagrams(lab: Lab,
                                                              flavor: Flavor) -> None:
    """Through the default interception (nftables where nft works) on every flavor."""
    _dig_through_the_cluster_ip(lab, NodeProxy(lab, loop=flavor.loop, native=flavor.native))


def test_dig_through_the_cluster_ip_iptables_interception(lab: Lab) -> None:
    _dig_through_the_cluster_ip(lab, NodeProxy(lab, args=["--interception", "iptables"]))


def _dig_through_the_cluster_ip(lab: Lab, node: NodeProxy) -> None:
    loop, native = node.loop, node.native
    start_pods(lab)
    node.write("dns.yaml", *dns_objects(lab, [1, 2, 3]))
    node.start(wait_for="default/dns:echo cluster IP")
    try:
        rules = [r for r in node.redirects() if r[1] == DNS_IP]
        assert any(r[2:4] == (53, "UDP") for r in rules), rules
        if node.interception == "iptables":
            assert any("-p udp" in ln and "--dport 53" in ln and "REDIRECT" in ln
                       for ln in node.iptables_save().splitlines() if DNS_IP in ln)
        assert dig_one(lab, ns="client") in {"pod1", "pod2", "pod3"}
        assert dig_one(lab, ns="node") in {"pod1", "pod2", "pod3"}  # the OUTPUT path
        counts = dig_many(lab, 60)
        assert sum(counts.values()) == 60, counts
        assert set(counts) == {"pod1", "pod2", "pod3"}, counts
        for size in ("9000", "65507"):
            echo = lab.probe("udp", DNS_IP, "5353", "--size", size, "--count", "3")
            assert echo["counts"] == {"echo": 3}, echo
        assert f"event loop: {loop}" in node.log
        rows = udp_rows(lab)
        assert rows and all(r["native"] is native for r in rows), rows  # who moved the bytes
        assert f"dst={DNS_IP}" in conntrack_udp(lab)
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []
    # Stopped: no client is left mapped to a closed proxy port.
    assert f"dst={DNS_IP}" not in conntrack_udp(lab)


def test_idle_flows_expire_and_client_ip_affinity_holds(lab: Lab) -> None:
    start_pods(lab)
    node = NodeProxy(lab, loop="asyncio", args=["--udp-timeout", "1s"])
    node.write("dns.yaml", *dns_objects(lab, [1, 2, 3]))
    node.write("sticky.yaml", *dns_objects(lab, [1, 2, 3], name="sticky", ip=STICKY_IP,
                                           sessionAffinity="ClientIP"))
    node.start(wait_for="default/sticky:dns cluster IP")
    fixed = f"{lab.client_ip}#40053"
    # Within the timeout one source port is one flow: always the same endpoint.
    answers = {dig_one(lab, source=fixed) for _ in range(5)}
    assert len(answers) == 1 and answers <= {"pod1", "pod2", "pod3"}, answers
    assert len(backend_flows(lab)) == 1
    rows = udp_rows(lab)
    assert [(r["client"], r["state"], r["service"]) for r in rows] == [
        (f"{lab.client_ip}:40053", "open", "default/dns:dns")], rows
    assert metric(lab, "uproxy_udp_flows_active", service="default/dns:dns") == 1
    wait_until(lambda: not backend_flows(lab), timeout=3, message="the idle flow expired")
    assert udp_rows(lab) == []
    assert metric(lab, "uproxy_udp_flows_active", service="default/dns:dns") == 0
    # After expiry the same source port is a new flow and may land elsewhere.
    seen = set(answers)
    for _ in range(8):
        seen.add(dig_one(lab, source=fixed))
        if len(seen) > 1:
            break
        wait_until(lambda: not backend_flows(lab), timeout=3, message="the idle flow expired")
    assert len(seen) > 1, seen
    # ClientIP affinity: 30 new flows from one client all go to one endpoint.
    sticky = dig_many(lab, 30, server=STICKY_IP)
    assert sum(sticky.values()) == 30 and len(sticky) == 1, sticky


def test_removed_endpoint_and_service_leave_no_stale_conntrack(lab: Lab) -> None:
    start_pods(lab)
    node = NodeProxy(lab, loop="uvloop")
    node.write("dns.yaml", *dns_objects(lab, [1, 2, 3]))
    node.start(wait_for="default/dns:dns cluster IP")
    counts = dig_many(lab, 30)
    assert set(counts) == {"pod1", "pod2", "pod3"}, counts
    pod3 = lab.pod_ip(3)
    assert f"src={pod3} dst=" in conntrack_udp(lab)
    assert any(p.startswith(pod3 + ":") for p in backend_flows(lab))

    node.write("dns.yaml", *dns_objects(lab, [1, 2]))  # pod3 leaves the service
    wait_until(lambda: f"src={pod3} " not in conntrack_udp(lab),
               message="no conntrack entry answered by pod3")
    assert not any(p.startswith(pod3 + ":") for p in backend_flows(lab))
    assert f"dst={DNS_IP}" in conntrack_udp(lab)  # clients' mappings to the proxy are kept
    later = dig_many(lab, 30)
    assert sum(later.values()) == 30 and set(later) == {"pod1", "pod2"}, later

    node.remove("dns.yaml")  # the whole service goes away
    node.wait_rules(lambda text: DNS_IP not in text)
    wait_until(lambda: f"dst={DNS_IP}" not in conntrack_udp(lab),
               message="no conntrack entry to the ClusterIP")
    wait_until(lambda: not backend_flows(lab), message="no flow left")
    assert node.stop() == 0


def test_client_sending_before_the_service_exists_is_answered_once_it_does(lab: Lab) -> None:
    """The kube-proxy DNS blackhole: a client that keeps its source port keeps refreshing the
    un-NATed conntrack entry it made before the rule existed, unless that entry is deleted."""
    start_pods(lab, 1)
    # Real nodes track connections before uproxy starts (kube-proxy and most firewalls add
    # exactly this rule); a fresh namespace does not, so the test adds it.
    lab.run("node", ["iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID",
                     "-j", "DROP"])
    script = lab.workdir / "steady.py"
    script.write_text(STEADY_CLIENT)
    client = lab.spawn("client", [sys.executable, str(script), DNS_IP, "53", "40054", "15", "1"],
                       "steady-early")
    wait_until(lambda: "sport=40054 dport=53" in conntrack_udp(lab),
               message="the early client's conntrack entry exists")
    node = NodeProxy(lab, loop="uvloop")
    node.write("dns.yaml", *dns_objects(lab, [1]))
    node.start(wait_for="default/dns:dns cluster IP")
    started = time.monotonic()
    assert client.wait(20) == 0
    result = json.loads(lab.log("steady-early").strip().splitlines()[-1])
    assert result["answers"] == {"pod1": 1}, result
    assert time.monotonic() - started < 10


def test_flood_of_new_clients_keeps_the_bound_and_the_steady_client(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPROXY_UDP_MAX_FLOWS", "32")
    start_pods(lab)
    node = NodeProxy(lab, loop="uvloop")
    node.write("dns.yaml", *dns_objects(lab, [1, 2, 3]))
    node.start(wait_for="default/dns:dns cluster IP")
    script = lab.workdir / "steady.py"
    script.write_text(STEADY_CLIENT)
    steady = lab.spawn("client", [sys.executable, str(script), DNS_IP, "53", "40055", "4", "0"],
                       "steady")
    wait_until(lambda: len(backend_flows(lab)) == 1, message="the steady client's flow")
    peak = 0
    flood = lab.spawn("client", [sys.executable, "-m", "uproxy.demo.probe", "udp", DNS_IP, "5353",
                                 "--count", "600", "--new-socket-each", "--concurrency", "40",
                                 "--timeout", "0.3", "--max-time", "3"], "flood")
    while flood.poll() is None:
        # ss dumps the socket table bucket by bucket, not atomically: while flows are
        # evicted and opened, one dump can list a closed socket and its successor. A
        # real overflow persists, so the smaller of two back-to-back dumps counts.
        peak = max(peak, min(len(backend_flows(lab)), len(backend_flows(lab))))
        time.sleep(0.02)
    assert steady.wait(10) == 0
    result = json.loads(lab.log("flood").strip().splitlines()[-1])
    answered = sum(result["counts"].values())
    assert 0 < answered < result["attempted"], result  # some served, the excess dropped
    assert result["errors"]["timeout"] > 0, result
    assert 0 < peak <= 32, peak
    assert len(backend_flows(lab)) <= 32
    assert metric(lab, "uproxy_udp_flows_evicted_total", service="default/dns:echo") > 0
    assert metric(lab, "uproxy_connections_total", service="default/dns:echo",
                  result="table_full") > 0
    steady_result = json.loads(lab.log("steady").strip().splitlines()[-1])
    assert steady_result["asked"] >= 20, steady_result
    assert sum(steady_result["answers"].values()) == steady_result["asked"], steady_result
    assert len(steady_result["answers"]) == 1, steady_result  # one flow, one endpoint
    assert node.stop() == 0


def test_unreachable_endpoint_is_left_for_another(lab: Lab) -> None:
    lab.start_dnsmasq(1)  # pod2 runs nothing: port unreachable
    node = NodeProxy(lab, loop="asyncio")
    node.write("dns.yaml", *dns_objects(lab, [1, 2]))
    node.start(wait_for="default/dns:dns cluster IP")
    answers = [dig_one(lab, source=f"{lab.client_ip}#40056") for _ in range(6)]
    # At most the first query (if it went to pod2) is lost; its flow is closed on the ICMP
    # error and pod2 is avoided, so the same client's next query is answered by pod1.
    assert answers[1:] == ["pod1"] * 5, answers
    assert all(pod_of(lab, p) == "pod1" for p in backend_flows(lab))


def test_nodeport_and_external_ip_from_client_and_node(lab: Lab) -> None:
    start_pods(lab, 2)
    ports = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53,
              "nodePort": 30053}]
    node = NodeProxy(lab, loop="uvloop")
    node.write("dns.yaml",
               service("dns", DNS_IP, ports, type="NodePort", externalIPs=["10.0.0.250"]),
               endpoint_slice("dns", lab.pod_ips[:2], [{"name": "dns", "port": 53,
                                                        "protocol": "UDP"}]))
    node.start(wait_for="default/dns:dns external IP")
    lab.wait_port("node", "0.0.0.0", 30053, "udp", proc=node.proc)
    cases = [("client", lab.node_ip, "30053"), ("node", "127.0.0.1", "30053"),
             ("node", lab.bridge_ip, "30053"), ("client", "10.0.0.250", "53"),
             ("node", "10.0.0.250", "53")]
    for ns, host, port in cases:
        answer = lab.run(ns, ["dig", f"@{host}", "-p", port, *WHOAMI], check=False).stdout
        assert answer.strip().strip('"') in {"pod1", "pod2"}, (ns, host, port, answer)
    rows = udp_rows(lab)
    assert {r["scope"] for r in rows} == {"nodeport", "external"}, rows
    assert node.stop() == 0


def test_bursts_pass_whole_and_in_order_also_where_the_path_mtu_is_small(
        lab: Lab, flavor: Flavor) -> None:
    """Runs of equal-sized datagrams leave the native path as one UDP_SEGMENT message; where
    the path cannot carry the segment size (br0's MTU is 1000 here) the kernel refuses that
    and they must still arrive, sent one by one (fragmented, like any large datagram)."""
    loop, native = flavor.loop, flavor.native
    start_pods(lab, 1)
    lab.run("node", ["ip", "link", "set", "br0", "mtu", "1000"])
    node = NodeProxy(lab, loop=loop, native=native)
    node.write("dns.yaml", *dns_objects(lab, [1]))
    node.start(wait_for="default/dns:echo cluster IP")
    script = lab.workdir / "burst.py"
    script.write_text(BURST_CLIENT)
    try:
        for sizes in ([100] * 50 + [30], [1200] * 40 + [700] + [1200] * 10, [9000] * 5):
            out = lab.run("client", [sys.executable, str(script), DNS_IP, "5353",
                                     ",".join(map(str, sizes))], timeout=30).stdout
            result = json.loads(out.strip().splitlines()[-1])
            assert result == {"sent": 3 * len(sizes), "received": 3 * len(sizes),
                              "whole_in_order": True}, (sizes[:3], result)
        rows = udp_rows(lab)
        assert len(rows) == 3, rows  # one flow per burst client
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []
