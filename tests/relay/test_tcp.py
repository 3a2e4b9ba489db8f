"""TCP services end to end: the real daemon in the lab's node namespace, real iptables,
real backends in pod namespaces, real clients in the client namespace (and on the node).

The seeds' walkthroughs (multi-port service, scaling) run for real here.
"""

from __future__ import annotations

import shutil
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.matrix import Flavor
from tests.support.tools import tools_dir
from tests.support.waiting import wait_until
from uproxy.demo.lab import Lab
from uproxy.demo.node import NodeProxy, endpoint_slice, service
from uproxy.rules import parse_rules

MULTI_PORTS = [{"name": "port1", "port": 6789, "targetPort": 6789},
               {"name": "port2", "port": 9876, "targetPort": 9876}]
SLICE_PORTS = [{"name": "port1", "port": 6789, "protocol": "TCP"},
               {"name": "port2", "port": 9876, "protocol": "TCP"}]


@pytest.fixture
def node(lab: Lab) -> Iterator[NodeProxy]:
    proxy = NodeProxy(lab)
    yield proxy
    if proxy.proc is not None and proxy.proc.poll() is None:
        proxy.stop()


def _multi_port(lab: Lab, node: NodeProxy, pods: int = 2) -> None:
    for pod in range(1, pods + 1):
        lab.start_echo(pod, tcp_ports=(6789, 9876))
    node.write("multi-port.yaml",
               service("multi-port", "10.0.0.180", MULTI_PORTS),
               endpoint_slice("multi-port", lab.pod_ips[:pods], SLICE_PORTS))


def test_multi_port_service_reaches_both_pods_on_both_ports(lab: Lab,
                                                            flavor: Flavor) -> None:
    loop, native = flavor.loop, flavor.native
    node = NodeProxy(lab, loop=loop, native=native)
    _multi_port(lab, node)
    node.start(wait_for="default/multi-port:port2 cluster IP")
    try:
        # The default interception: uproxy's nftables map wherever nft works.
        assert node.interception == ("nftables" if shutil.which("nft") else "iptables")
        rules = [r for r in node.redirects() if r[1] == "10.0.0.180"]
        assert len(rules) == 2, rules
        assert [r[:4] for r in rules if r[2] == 6789] == [
            ("default/multi-port:port1 cluster IP", "10.0.0.180", 6789, "TCP")]
        for port in (6789, 9876):
            result = lab.probe("tcp", "10.0.0.180", str(port), "--count", "60")
            assert sum(result["counts"].values()) == 60, result
            assert set(result["counts"]) == {"pod1", "pod2"}, result
        # A large transfer with half-close, checked end to end.
        echo = lab.probe("echo", "10.0.0.180", "9876", "--bytes", str(8 << 20))
        assert echo["ok"] and echo["received"] == 8 << 20, echo
        path = "native" if native else "python"
        assert f"relay path: {path}" in node.log
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []


def test_scaling_adds_an_endpoint_without_restart(lab: Lab, node: NodeProxy) -> None:
    lab.start_echo(1, tcp_ports=(9876,))
    lab.start_echo(2, tcp_ports=(9876,))
    ports = [{"port": 80, "targetPort": 9876}]
    slice_ports = [{"name": "", "port": 9876, "protocol": "TCP"}]
    node.write("sise.yaml", service("simpleservice", "10.0.0.155", ports, namespace="namingthings"),
               endpoint_slice("simpleservice", [lab.pod_ip(1)], slice_ports,
                              namespace="namingthings"))
    node.start(wait_for="namingthings/simpleservice: cluster IP")
    pid = node.proc.pid if node.proc else None
    first = lab.probe("tcp", "10.0.0.155", "80", "--count", "40")
    assert first["counts"] == {"pod1": 40}, first
    node.write("sise.yaml", service("simpleservice", "10.0.0.155", ports, namespace="namingthings"),
               endpoint_slice("simpleservice", [lab.pod_ip(1), lab.pod_ip(2)], slice_ports,
                              namespace="namingthings"))
    later: dict[str, Any] = {}

    def both_pods() -> bool:
        nonlocal later
        later = lab.probe("tcp", "10.0.0.155", "80", "--count", "60")
        return set(later["counts"]) == {"pod1", "pod2"}

    wait_until(both_pods, timeout=5, message=lambda: f"both pods answer: {later}")
    assert set(later["counts"]) == {"pod1", "pod2"}, later
    assert sum(later["counts"].values()) == 60
    assert node.proc is not None and node.proc.pid == pid and node.proc.poll() is None


def test_from_the_node_itself_nodeport_and_external_ip(lab: Lab, node: NodeProxy) -> None:
    lab.start_echo(1, tcp_ports=(8080,))
    lab.start_echo(2, tcp_ports=(8080,))
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]
    node.write("web.yaml",
               service("web", "10.0.0.50", ports, type="NodePort", externalIPs=["10.0.0.250"],
                       status={"loadBalancer": {"ingress": [{"ip": "10.0.0.251"}]}}),
               endpoint_slice("web", lab.pod_ips[:2],
                              [{"name": "http", "port": 8080, "protocol": "TCP"}]))
    node.start(wait_for="default/web:http loadbalancer IP")
    text = node.rules_text()
    assert '"default/web:http external IP"' in text
    cases = [
        ("node", "10.0.0.50", "80"),          # OUTPUT hook
        ("client", "10.0.0.50", "80"),        # PREROUTING hook
        ("client", "10.0.0.250", "80"),       # externalIP
        ("client", "10.0.0.251", "80"),       # LoadBalancer ingress IP
        ("client", lab.node_ip, "30080"),     # NodePort on the node's address
        ("node", "127.0.0.1", "30080"),       # NodePort from the node itself
    ]
    for ns, host, port in cases:
        result = lab.probe("tcp", host, port, "--count", "30", ns=ns)
        assert sum(result["counts"].values()) == 30, (ns, host, port, result)
        assert set(result["counts"]) <= {"pod1", "pod2"}


def _chi_square(counts: list[int]) -> float:
    expected = sum(counts) / len(counts)
    return sum((c - expected) ** 2 / expected for c in counts)


@pytest.mark.parametrize("pods", [2, 3])
def test_random_spread_passes_chi_square(lab: Lab, node: NodeProxy, pods: int) -> None:
    for pod in range(1, pods + 1):
        lab.start_echo(pod, tcp_ports=(9376,))
    node.write("hostnames.yaml",
               service("hostnames", "10.0.0.175", [{"port": 80, "targetPort": 9376}]),
               endpoint_slice("hostnames", lab.pod_ips[:pods],
                              [{"name": "", "port": 9376, "protocol": "TCP"}]))
    node.start(wait_for="default/hostnames: cluster IP")
    result = lab.probe("tcp", "10.0.0.175", "80", "--count", "2000", "--concurrency", "20",
                       timeout=120)
    counts = [result["counts"].get(f"pod{i}", 0) for i in range(1, pods + 1)]
    assert sum(counts) == 2000, result
    # Critical values of chi-square at p = 0.001: df=1 -> 10.828, df=2 -> 13.816.
    critical = {2: 10.828, 3: 13.816}[pods]
    assert _chi_square(counts) < critical, counts


def test_client_ip_affinity_sticks_spreads_and_expires(lab: Lab, node: NodeProxy) -> None:
    for pod in (1, 2, 3):
        lab.start_echo(pod, tcp_ports=(9376,))
    extra = [f"10.99.0.{i}" for i in range(10, 18)]
    for ip in extra:
        lab.add_client_ip(ip)
    node.write("sticky.yaml",
               service("sticky", "10.0.0.176", [{"port": 80, "targetPort": 9376}],
                       sessionAffinity="ClientIP",
                       sessionAffinityConfig={"clientIP": {"timeoutSeconds": 1}}),
               endpoint_slice("sticky", lab.pod_ips, [{"name": "", "port": 9376,
                                                       "protocol": "TCP"}]))
    node.start(wait_for="default/sticky: cluster IP")
    # One client keeps its endpoint while it keeps using it.
    same = lab.probe("tcp", "10.0.0.176", "80", "--count", "40", "--concurrency", "1")
    assert len(same["counts"]) == 1 and sum(same["counts"].values()) == 40, same
    # Different clients spread.
    chosen = set()
    for ip in extra:
        r = lab.probe("tcp", "10.0.0.176", "80", "--count", "5", "--source-ip", ip)
        assert len(r["counts"]) == 1, r
        chosen.update(r["counts"])
    assert len(chosen) >= 2, chosen
    # After the timeout passes unused, a new choice is made: over several idle gaps the
    # single client must land on more than one pod ((1/3)^7 chance of a false failure).
    seen = set()
    for _ in range(8):
        time.sleep(1.3)
        r = lab.probe("tcp", "10.0.0.176", "80", "--count", "1")
        seen.update(r["counts"])
        if len(seen) > 1:
            break
    assert len(seen) > 1, seen


HOLD_CLIENT = textwrap.dedent("""
    import socket, sys, time, os
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.sendall(b"whoami\\n")
    print("first", s.recv(100).decode().strip(), flush=True)
    flag = sys.argv[3]
    deadline = time.time() + 20
    while not os.path.exists(flag) and time.time() < deadline:
        time.sleep(0.05)
    s.sendall(b"still-there")
    data = b""
    while len(data) < 11:
        chunk = s.recv(100)
        if not chunk:
            break
        data += chunk
    print("second", data.decode(), flush=True)
""")


def test_open_connection_survives_endpoint_and_service_removal(lab: Lab, node: NodeProxy) -> None:
    lab.start_echo(1, tcp_ports=(9376,))
    lab.start_echo(2, tcp_ports=(9376,))
    ports = [{"port": 80, "targetPort": 9376}]
    sp = [{"name": "", "port": 9376, "protocol": "TCP"}]
    node.write("keep.yaml", service("keep", "10.0.0.177", ports),
               endpoint_slice("keep", [lab.pod_ip(1)], sp))
    node.start(wait_for="default/keep: cluster IP")
    script = lab.workdir / "hold.py"
    script.write_text(HOLD_CLIENT)
    flag = lab.workdir / "go"
    holder = lab.spawn("client", ["python3", str(script), "10.0.0.177", "80", str(flag)], "hold")
    wait_until(lambda: "first pod1" in lab.log("hold"), timeout=10,
               message=lambda: lab.log("hold"))
    # The endpoint goes away: new connections go to pod2 only.
    node.write("keep.yaml", service("keep", "10.0.0.177", ports),
               endpoint_slice("keep", [lab.pod_ip(2)], sp))
    r: dict[str, Any] = {}

    def pod2_only() -> bool:
        nonlocal r
        r = lab.probe("tcp", "10.0.0.177", "80", "--count", "20")
        return bool(r["counts"] == {"pod2": 20})

    wait_until(pod2_only, timeout=5, message=lambda: f"pod2 alone answers: {r}")
    assert r["counts"] == {"pod2": 20}, r
    # Then the whole service goes away: its rule goes, the open connection stays.
    node.remove("keep.yaml")
    node.wait_rules(lambda text: "default/keep" not in text)
    flag.write_text("go")
    assert holder.wait(10) == 0
    assert "second still-there" in lab.log("hold")


@pytest.mark.parametrize("interception", ["nftables", "iptables"])
def test_open_connection_keeps_its_nat_through_the_shutdown_drain(lab: Lab,
                                                                  interception: str) -> None:
    """SIGTERM: new connections stop being intercepted at once (the map or chain is
    emptied), an open one keeps its NAT and finishes, then every rule and table goes."""
    if interception == "nftables" and shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    lab.start_echo(1, tcp_ports=(9376,))
    node = NodeProxy(lab, args=["--interception", interception])
    node.write("drain.yaml", service("drain", "10.0.0.183", [{"port": 80, "targetPort": 9376}]),
               endpoint_slice("drain", [lab.pod_ip(1)], [{"name": "", "port": 9376,
                                                          "protocol": "TCP"}]))
    node.start(wait_for="default/drain: cluster IP")
    script = lab.workdir / "hold.py"
    script.write_text(HOLD_CLIENT)
    flag = lab.workdir / "go-drain"
    holder = lab.spawn("client", ["python3", str(script), "10.0.0.183", "80", str(flag)],
                       "hold-drain")
    try:
        wait_until(lambda: "first pod1" in lab.log("hold-drain"), timeout=10,
                   message=lambda: lab.log("hold-drain"))
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        node.wait_log("letting 1 open connections finish")
        assert node.redirects() == [] and node.proc.poll() is None
        if interception == "nftables":  # the tables (and their nat hooks) stay for now
            assert "map services" in node.nft_tables()
        flag.write_text("go")
        assert holder.wait(10) == 0
        assert "second still-there" in lab.log("hold-drain")
        assert node.proc.wait(15) == 0
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop()
    assert node.uproxy_lines() == []


REFUSE_CLIENT = textwrap.dedent("""
    import socket, sys, time
    best = 10.0
    for _ in range(5):
        s = socket.socket()
        s.settimeout(3)
        t = time.monotonic()
        try:
            s.connect((sys.argv[1], int(sys.argv[2])))
            s.sendall(b"whoami\\n")
            data = s.recv(100)
            outcome = "data" if data else "eof"
        except ConnectionRefusedError:
            outcome = "refused"
        except ConnectionResetError:
            outcome = "reset"
        except TimeoutError:
            outcome = "timeout"
        best = min(best, time.monotonic() - t)
        s.close()
        print(outcome)
    print(f"best {best:.4f}")
""")


def test_backend_killed_and_no_endpoints(lab: Lab, node: NodeProxy) -> None:
    echo1 = lab.start_echo(1, tcp_ports=(9376,))
    lab.start_echo(2, tcp_ports=(9376,))
    sp = [{"name": "", "port": 9376, "protocol": "TCP"}]
    node.write("svc.yaml",
               service("retry", "10.0.0.178", [{"port": 80, "targetPort": 9376}]),
               endpoint_slice("retry", lab.pod_ips[:2], sp),
               service("empty", "10.0.0.179", [{"port": 80, "targetPort": 9376}]))
    node.start(wait_for="default/empty: cluster IP")
    echo1.send_signal(signal.SIGKILL)
    echo1.wait(5)
    # pod1 refuses now; every new connection still succeeds through a retry on pod2.
    r = lab.probe("tcp", "10.0.0.178", "80", "--count", "100")
    assert r["counts"] == {"pod2": 100}, r
    # No endpoints: refused at once (RST), never left hanging.
    script = lab.workdir / "refuse.py"
    script.write_text(REFUSE_CLIENT)
    out = lab.run("client", ["python3", str(script), "10.0.0.179", "80"], timeout=30).stdout
    outcomes = out.split()[:5]
    assert all(o in ("refused", "reset") for o in outcomes), out
    best = float(out.split("best")[1])
    assert best < 0.1, out


@pytest.mark.parametrize("interception", ["nftables", "iptables"])
def test_shutdown_cleanup_and_crash_recovery(lab: Lab, interception: str) -> None:
    if interception == "nftables" and shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    node = NodeProxy(lab, args=["--interception", interception])
    lab.start_echo(1, tcp_ports=(9376,))
    node.write("svc.yaml",
               service("one", "10.0.0.181", [{"port": 80, "targetPort": 9376}]),
               endpoint_slice("one", [lab.pod_ip(1)], [{"name": "", "port": 9376,
                                                        "protocol": "TCP"}]))
    node.start(wait_for="default/one: cluster IP")
    # A crash leaves rules behind...
    assert node.stop(signal.SIGKILL) == -signal.SIGKILL
    assert node.uproxy_lines()
    # ...which a new run replaces (no duplicate hooks) and serves.
    node.start(wait_for="default/one: cluster IP")
    for family in (4, 6):  # ip6tables too
        hooks = [line for line in node.iptables_save(family).splitlines()
                 if line.startswith("-A PREROUTING") and "UPROXY" in line]
        assert len(hooks) == (1 if interception == "iptables" else 0), node.uproxy_lines()
        tables = node.nft_tables(family)
        assert tables.count("table ") == (1 if interception == "nftables" else 0), tables
    assert lab.probe("tcp", "10.0.0.181", "80", "--count", "5")["counts"] == {"pod1": 5}
    # Crash again; `uproxy cleanup` removes everything (nft tables too).
    node.stop(signal.SIGKILL)
    out = lab.run("node", [sys.executable, "-m", "uproxy", "cleanup"]).stdout
    assert "removed" in out
    assert node.uproxy_lines() == []
    # A clean shutdown (SIGTERM) exits 0 and leaves no uproxy rule behind.
    node.start(wait_for="default/one: cluster IP")
    assert node.stop(signal.SIGTERM) == 0
    assert node.uproxy_lines() == []


def test_switching_interception_leaves_nothing_of_the_other(lab: Lab) -> None:
    """A crashed run's rules of either kind are removed when the other kind starts."""
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    lab.start_echo(1, tcp_ports=(9376,))
    node = NodeProxy(lab, args=["--interception", "iptables"])
    node.write("svc.yaml",
               service("one", "10.0.0.181", [{"port": 80, "targetPort": 9376}]),
               endpoint_slice("one", [lab.pod_ip(1)], [{"name": "", "port": 9376,
                                                        "protocol": "TCP"}]))
    node.start(wait_for="default/one: cluster IP")
    node.stop(signal.SIGKILL)
    node.args = ["--interception", "nftables"]
    node.start(wait_for="default/one: cluster IP")
    try:
        assert [ln for ln in node.iptables_save(None).splitlines() if "UPROXY-SERVICES" in ln
                ] == [], "the iptables chain of the crashed run is gone"
        assert lab.probe("tcp", "10.0.0.181", "80", "--count", "5")["counts"] == {"pod1": 5}
    finally:
        node.stop(signal.SIGKILL)
    node.args = ["--interception", "iptables"]
    node.start(wait_for="default/one: cluster IP")
    try:
        assert node.nft_tables(None) == "", "the nft tables of the crashed run are gone"
        assert lab.probe("tcp", "10.0.0.181", "80", "--count", "5")["counts"] == {"pod1": 5}
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []


def test_auto_interception_without_nft_falls_back_to_the_iptables_chain(lab: Lab) -> None:
    """``--interception auto`` (the default) on a node without nft: one log line says why,
    and the iptables chain serves."""
    tools = tools_dir(lab.workdir / "bin-no-nft")
    lab.start_echo(1, tcp_ports=(9376,))
    node = NodeProxy(lab, prefix=["env", f"PATH={tools}"], args=["--interception", "auto"])
    node._nft_usable = False  # what the daemon finds on its PATH
    node.write("svc.yaml",
               service("auto", "10.0.0.184", [{"port": 80, "targetPort": 9376}]),
               endpoint_slice("auto", [lab.pod_ip(1)], [{"name": "", "port": 9376,
                                                         "protocol": "TCP"}]))
    node.start(wait_for="default/auto: cluster IP")
    try:
        assert node.log.count("interception: ") == 1
        assert ("interception: iptables chain UPROXY-SERVICES (nft not found (install the "
                "nftables package))") in node.log
        assert [r[1:4] for r in parse_rules(node.iptables_save())] == [("10.0.0.184", 80, "TCP")]
        assert node.nft_tables(None) == ""
        assert lab.probe("tcp", "10.0.0.184", "80", "--count", "5")["counts"] == {"pod1": 5}
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []


def test_resync_repairs_deleted_nft_table_and_chains(lab: Lab) -> None:
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    lab.start_echo(1, tcp_ports=(9376,))
    node = NodeProxy(lab, args=["--sync-period", "1s", "--interception", "nftables"])
    node.write("svc.yaml",
               service("fix", "10.0.0.182", [{"port": 80, "targetPort": 9376}]),
               endpoint_slice("fix", [lab.pod_ip(1)], [{"name": "", "port": 9376,
                                                        "protocol": "TCP"}]))
    node.start(wait_for="default/fix: cluster IP")
    try:
        for family in ("ip", "ip6"):
            lab.run("node", ["nft", "delete", "table", family, "uproxy"])
        assert node.nft_tables(None) == ""
        node.wait_rules(lambda t: "default/fix: cluster IP" in t, timeout=5)
        node.wait_rules(lambda t: "chain output" in t, timeout=5, family=6)
        node.wait_log("re-created the nftables tables someone removed")
        # The hooks' rules flushed and the map emptied: the next full sync puts them back.
        lab.run("node", ["nft", "flush", "chain", "ip", "uproxy", "output"])
        lab.run("node", ["nft", "flush", "map", "ip", "uproxy", "services"])
        assert "default/fix" not in node.rules_text()
        text = node.wait_rules(lambda t: "default/fix: cluster IP" in t
                               and t.count("redirect to") == 2, timeout=5)
        assert [r[1:4] for r in node.redirects()] == [("10.0.0.182", 80, "TCP")], text
        r = lab.probe("tcp", "10.0.0.182", "80", "--count", "5", ns="node")  # output hook
        assert r["counts"] == {"pod1": 5}, r
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []


def test_a_failed_nft_delta_falls_back_to_replacing_the_tables(lab: Lab) -> None:
    """Someone deleted an element: the next sync's delta (which deletes it too) is refused
    by nft as a whole, and the daemon replaces the tables instead, at once."""
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    lab.start_echo(1, tcp_ports=(9376,))
    node = NodeProxy(lab, args=["--sync-period", "10m", "--interception", "nftables"])
    sp = [{"name": "", "port": 9376, "protocol": "TCP"}]
    node.write("a.yaml", service("a", "10.0.0.185", [{"port": 80, "targetPort": 9376}]),
               endpoint_slice("a", [lab.pod_ip(1)], sp))
    node.start(wait_for="default/a: cluster IP")
    try:
        lab.run("node", ["nft", "delete", "element", "ip", "uproxy", "services",
                         "{ 10.0.0.185 . tcp . 80 }"])
        node.remove("a.yaml")
        node.write("b.yaml", service("b", "10.0.0.186", [{"port": 80, "targetPort": 9376}]),
                   endpoint_slice("b", [lab.pod_ip(1)], sp))
        text = node.wait_rules(lambda t: "default/b: cluster IP" in t, timeout=5)
        assert [r[1:4] for r in node.parse(text)] == [("10.0.0.186", 80, "TCP")], text
        assert "nftables update failed, replacing the tables" in node.log
        assert lab.probe("tcp", "10.0.0.186", "80", "--count", "5")["counts"] == {"pod1": 5}
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []


def test_resync_repairs_deleted_rules(lab: Lab) -> None:
    """The iptables interception's repair (``--interception iptables``)."""
    lab.start_echo(1, tcp_ports=(9376,))
    node = NodeProxy(lab, args=["--sync-period", "1s", "--interception", "iptables"])
    node.write("svc.yaml",
               service("fix", "10.0.0.182", [{"port": 80, "targetPort": 9376}]),
               endpoint_slice("fix", [lab.pod_ip(1)], [{"name": "", "port": 9376,
                                                        "protocol": "TCP"}]))
    node.start(wait_for="default/fix: cluster IP")
    try:
        lab.run("node", ["iptables", "-t", "nat", "-F", "UPROXY-SERVICES"])
        lab.run("node", ["iptables", "-t", "nat", "-D", "OUTPUT", "-m", "comment", "--comment",
                         "uproxy service portals", "-j", "UPROXY-SERVICES"])
        node.wait_rules(lambda t: "default/fix: cluster IP" in t and "-A OUTPUT" in t, timeout=5)
        r = lab.probe("tcp", "10.0.0.182", "80", "--count", "5", ns="node")
        assert r["counts"] == {"pod1": 5}, r
    finally:
        node.stop()


def test_bad_input_is_one_line_and_the_rest_keeps_serving(lab: Lab, node: NodeProxy) -> None:
    lab.start_echo(1, tcp_ports=(9376,))
    blocker = lab.spawn("node", ["python3", "-c",
                                 "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',30090));"
                                 "s.listen(); time.sleep(60)"], "blocker")
    lab.wait_port("node", "0.0.0.0", 30090, proc=blocker)
    sp = [{"name": "", "port": 9376, "protocol": "TCP"}]
    node.write("good.yaml", service("good", "10.0.0.183", [{"port": 80, "targetPort": 9376}]),
               endpoint_slice("good", [lab.pod_ip(1)], sp))
    node.write("taken.yaml", service("taken", "10.0.0.184",
                                     [{"port": 80, "targetPort": 9376, "nodePort": 30090}],
                                     type="NodePort"),
               endpoint_slice("taken", [lab.pod_ip(1)], sp))
    node.write_text("broken.yaml", "kind: Service\nmetadata: {name: broken\nspec: [\n")
    node.write("badport.yaml", service("badport", "10.0.0.185",
                                       [{"name": "a", "port": 70000},
                                        {"name": "b", "port": 81, "targetPort": 9376}]),
               endpoint_slice("badport", [lab.pod_ip(1)],
                              [{"name": "b", "port": 9376, "protocol": "TCP"}]))
    node.start(wait_for="default/badport:b cluster IP")
    log = node.wait_log("nodePort 30090")
    assert "broken.yaml" in log and "not valid YAML" in log
    assert "Service default/badport: spec.ports[0].port: 70000 is outside 1-65535" in log
    assert "already in use by another process" in log
    assert "Traceback" not in log
    for host in ("10.0.0.183", "10.0.0.184", "10.0.0.185"):
        port = "81" if host == "10.0.0.185" else "80"
        assert lab.probe("tcp", host, port, "--count", "3")["counts"] == {"pod1": 3}, host


def test_out_of_file_descriptors_pauses_accepting_and_recovers(lab: Lab) -> None:
    lab.start_echo(1, tcp_ports=(9376,))
    # A hard limit of 96 fds: the daemon, its status server and a few dozen relayed
    # connections (two fds each) fit; 60 held connections at once do not.
    node = NodeProxy(lab, prefix=["prlimit", "--nofile=96:96"])
    node.write("svc.yaml",
               service("fds", "10.0.0.186", [{"port": 80, "targetPort": 9376}]),
               endpoint_slice("fds", [lab.pod_ip(1)], [{"name": "", "port": 9376,
                                                        "protocol": "TCP"}]))
    node.start(wait_for="default/fds: cluster IP")
    try:
        r = lab.probe("tcp", "10.0.0.186", "80", "--count", "60", "--concurrency", "60",
                      "--hold", "1.5", "--timeout", "10", timeout=60)
        # Every connection is served in the end: the ones that waited in the backlog too.
        assert r["counts"] == {"pod1": 60}, r
        # After a quiet period (EMFILE_QUIET) the next accept closes the episode with one line.
        time.sleep(2.5)
        assert lab.probe("tcp", "10.0.0.186", "80", "--count", "5")["counts"] == {"pod1": 5}
        log = node.wait_log("accepting again", timeout=5)
        assert log.count("out of file descriptors") == 1, log
        assert "Traceback" not in log
    finally:
        assert node.stop() == 0


def test_nodeport_addresses_limit_where_nodeports_listen(lab: Lab) -> None:
    lab.start_echo(1, tcp_ports=(8080,))
    node = NodeProxy(lab, args=["--nodeport-addresses", "10.99.0.0/24"])
    node.write("np.yaml",
               service("np", "10.0.0.187", [{"port": 80, "targetPort": 8080, "nodePort": 30187}],
                       type="NodePort"),
               endpoint_slice("np", [lab.pod_ip(1)], [{"name": "", "port": 8080,
                                                       "protocol": "TCP"}]))
    node.start(wait_for="default/np: cluster IP")
    try:
        # Served on the node's address in 10.99.0.0/24 ...
        assert lab.probe("tcp", lab.node_ip, "30187", "--count", "3")["counts"] == {"pod1": 3}
        # ... and nowhere else: not on the bridge address, not on loopback.
        listening = lab.run("node", ["ss", "-ltnH", "sport = :30187"]).stdout.split()
        assert f"{lab.node_ip}:30187" in listening, listening
        assert not any(a.endswith(":30187") and a != f"{lab.node_ip}:30187" for a in listening)
        refused = lab.probe("tcp", "127.0.0.1", "30187", "--count", "1", "--timeout", "1",
                            ns="node")
        assert refused["counts"] == {} and refused["errors"]["refused"] == 1, refused
    finally:
        assert node.stop() == 0
