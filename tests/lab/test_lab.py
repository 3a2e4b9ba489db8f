"""The namespace lab itself: reachability through the node, backends, isolation, teardown.

Everything here runs real programs (our echo server, nginx, dnsmasq, curl, dig)
inside namespaces the test created; nothing is sent outside them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from uproxy.demo.lab import (
    BRIDGE_IP,
    BRIDGE_IP6,
    CLIENT_IP,
    CLIENT_IP6,
    NODE_IP,
    NODE_IP6,
    Lab,
    LabError,
    remove_stale_labs,
)

pytestmark = pytest.mark.lab

NO_ERRORS = {"refused": 0, "timeout": 0, "reset": 0, "other": 0}


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


# ------------------------------------------------------------------ reachability
def test_client_reaches_each_pod_over_tcp_and_udp(lab: Lab) -> None:
    for i in (1, 2, 3):
        lab.start_echo(i, tcp_ports=(6789, 9876), udp_ports=(5353,))
    for i in (1, 2, 3):
        tcp = lab.probe("tcp", lab.pod_ip(i), "9876", "--count", "30", "--concurrency", "5")
        assert tcp["counts"] == {f"pod{i}": 30}, tcp
        assert tcp["errors"] == NO_ERRORS
        udp = lab.probe("udp", lab.pod_ip(i), "5353", "--count", "10")
        assert udp["counts"] == {f"pod{i}": 10}, udp
        assert udp["errors"] == NO_ERRORS
    # the node forwards without NAT: the pod sees the client's own address
    body = lab.run("client", ["curl", "-sS", "--max-time", "5",
                              f"http://{lab.pod_ip(2)}:6789/anything"]).stdout
    doc = json.loads(body)
    assert doc["pod"] == "pod2" and doc["port"] == 6789
    assert doc["client"].split(":")[0] == CLIENT_IP


def test_every_link_is_dual_stack_client_reaches_each_pod_over_ipv6(lab: Lab) -> None:
    for i in (1, 2, 3):
        lab.start_echo(i, tcp_ports=(6789,), udp_ports=(5353,))
    for i in (1, 2, 3):
        tcp = lab.probe("tcp", lab.pod_ip6(i), "6789", "--count", "20", "--concurrency", "5")
        assert tcp["counts"] == {f"pod{i}": 20}, tcp
        udp = lab.probe("udp", lab.pod_ip6(i), "5353", "--count", "10")
        assert udp["counts"] == {f"pod{i}": 10}, udp
    body = lab.run("client", ["curl", "-sS", "--max-time", "5",
                              f"http://[{lab.pod_ip6(2)}]:6789/anything"]).stdout
    doc = json.loads(body)
    assert doc["pod"] == "pod2" and doc["client"].rsplit(":", 1)[0] == CLIENT_IP6
    # no duplicate address detection: nothing is left tentative
    for ns in ("client", "node", "pod1"):
        assert "tentative" not in lab.run(ns, ["ip", "-6", "addr"]).stdout
    # nginx and dnsmasq answer over IPv6 too
    lab.start_nginx(1, port=8080)
    lab.start_dnsmasq(3)
    out = lab.run("client", ["curl", "-sS", "--max-time", "5",
                             f"http://[{lab.pod_ip6(1)}]:8080/"]).stdout
    assert out == "pod1\n"
    txt = lab.run("client", ["dig", "+short", "+time=2", "+tries=1", f"@{lab.pod_ip6(3)}",
                             "whoami.uproxy.test", "TXT"]).stdout
    assert txt.split() == ['"pod3"']


def test_probe_reports_refused_and_timeout(lab: Lab) -> None:
    refused = lab.probe("tcp", lab.pod_ip(1), "6789", "--count", "3", "--timeout", "1")
    assert refused["counts"] == {} and refused["errors"]["refused"] == 3
    # 10.0.0.0/24 has no address: the node routes it into svc0, which drops it
    lost = lab.probe("tcp", "10.0.0.10", "80", "--count", "2", "--timeout", "0.3")
    assert lost["counts"] == {} and lost["errors"]["timeout"] == 2
    lost_udp = lab.probe("udp", "10.0.0.10", "53", "--count", "2", "--timeout", "0.3")
    assert lost_udp["counts"] == {} and lost_udp["errors"]["timeout"] == 2


def test_echo_serves_thousands_of_connections(lab: Lab) -> None:
    lab.start_echo(1, tcp_ports=(6789,))
    held = lab.probe("tcp", lab.pod_ip(1), "6789", "--count", "2000", "--concurrency", "500",
                     "--hold", "0.3", "--timeout", "5")
    assert held["counts"] == {"pod1": 2000}, held
    assert held["errors"] == NO_ERRORS


def test_probe_source_ip_binds_before_connecting(lab: Lab) -> None:
    lab.start_echo(1, tcp_ports=(6789,), udp_ports=(5353,))
    lab.add_client_ip("10.99.0.50")
    with pytest.raises(ValueError, match="outside the client subnet"):
        lab.add_client_ip("192.0.2.1")
    for proto in ("tcp", "udp"):
        ok = lab.probe(proto, lab.pod_ip(1), "6789" if proto == "tcp" else "5353",
                       "--count", "20", "--source-ip", "10.99.0.50")
        assert ok["counts"] == {"pod1": 20} and ok["errors"] == NO_ERRORS, ok
    # an address the client does not own cannot be bound: proof the option is used
    for proto, port in (("tcp", "6789"), ("udp", "5353")):
        bad = lab.probe(proto, lab.pod_ip(1), port, "--count", "2", "--source-ip", "10.99.0.51")
        assert bad["counts"] == {} and bad["errors"]["other"] == 2, bad
        assert "Cannot assign requested address" in bad["samples"][0]


def test_echo_modes_whoami_bulk_half_close_and_big_datagrams(lab: Lab) -> None:
    lab.start_echo(1, tcp_ports=(6789,), udp_ports=(5353,), name="alpha")
    ip = lab.pod_ip(1)
    out = lab.run("client", ["socat", "-t", "2", "-", f"TCP:{ip}:6789"],
                  input="whoami\nhello\n").stdout
    assert out == "alpha 6789\nhello\n"
    out = lab.run("client", ["socat", "-t", "2", "-", f"TCP:{ip}:6789"],
                  input="who are you?\n").stdout
    assert out == "who are you?\n"
    bulk = lab.probe("echo", ip, "6789", "--bytes", str(8 * 1024 * 1024))
    assert bulk == {**bulk, "ok": True, "sent": 8 * 1024 * 1024, "received": 8 * 1024 * 1024}
    big = lab.probe("udp", ip, "5353", "--count", "3", "--size", "65507")
    assert big["counts"] == {"echo": 3} and big["errors"] == NO_ERRORS
    head = lab.run("client", ["curl", "-sS", "-I", "--max-time", "5", f"http://{ip}:6789/"])
    assert head.stdout.startswith("HTTP/1.1 200 OK")
    assert "connection: close" in head.stdout.lower()


def test_nginx_and_dnsmasq_backends(lab: Lab) -> None:
    lab.start_nginx(2)
    lab.start_nginx(3, port=8080)
    lab.start_dnsmasq(1, records={"web.uproxy.test": "10.0.0.42"})
    lab.start_dnsmasq(3)
    curl = ["curl", "-sS", "--max-time", "5"]
    assert lab.run("client", [*curl, f"http://{lab.pod_ip(2)}/"]).stdout == "pod2\n"
    assert lab.run("client", [*curl, f"http://{lab.pod_ip(3)}:8080/x/y"]).stdout == "pod3\n"
    dig = ["dig", "+short", "+time=2", "+tries=1"]
    a = lab.run("client", [*dig, f"@{lab.pod_ip(1)}", "web.uproxy.test", "A"]).stdout
    assert a.split() == ["10.0.0.42"]
    a = lab.run("client", [*dig, f"@{lab.pod_ip(3)}", "name.example", "A"]).stdout
    assert a.split() == ["1.2.3.4"]
    for i in (1, 3):
        txt = lab.run("client", [*dig, f"@{lab.pod_ip(i)}", "whoami.uproxy.test", "TXT"]).stdout
        assert txt.split() == [f'"pod{i}"']


def test_helper_fails_with_the_backend_error(lab: Lab) -> None:
    lab.start_echo(1, tcp_ports=(6789,))
    with pytest.raises(LabError, match=r"(?i)exited .*address already in use"):
        lab.start_echo(1, tcp_ports=(6789,))
    with pytest.raises(LabError, match=r"exit \d+: ip netns exec .*false"):
        lab.run("node", ["false"])


# ------------------------------------------------------------------ isolation
def test_namespaces_have_no_route_out(lab: Lab) -> None:
    # Only route lookups: no packet is sent anywhere.
    client = lab.run("client", ["ip", "route", "get", "8.8.8.8"]).stdout
    assert f"via {NODE_IP} dev eth0" in client
    pod = lab.run("pod2", ["ip", "route", "get", "8.8.8.8"]).stdout
    assert f"via {BRIDGE_IP} dev eth0" in pod
    node = lab.run("node", ["ip", "route", "get", "8.8.8.8"]).stdout
    assert "dev svc0" in node and " via " not in node
    routes = lab.run("node", ["ip", "-4", "route", "show"]).stdout.splitlines()
    assert sorted(r.split()[0] + " " + r.split()[2] for r in routes) == [
        "10.99.0.0/24 vc0", "172.17.0.0/24 br0", "default svc0"]
    links = lab.run("node", ["ip", "-o", "link", "show"]).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
    assert names == {"lo", "br0", "vp1", "vp2", "vp3", "vc0", "svc0"}
    forwarding = lab.run("node", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    assert forwarding == "1"
    # the same over IPv6
    assert f"via {NODE_IP6} dev eth0" in lab.run(
        "client", ["ip", "-6", "route", "get", "2001:db8::1"]).stdout
    assert f"via {BRIDGE_IP6} dev eth0" in lab.run(
        "pod2", ["ip", "-6", "route", "get", "2001:db8::1"]).stdout
    node6 = lab.run("node", ["ip", "-6", "route", "get", "2001:db8::1"]).stdout
    assert "dev svc0" in node6 and " via " not in node6
    routes6 = [r.split() for r in lab.run("node", ["ip", "-6", "route", "show"]).stdout
               .splitlines() if not r.startswith(("fe80", "multicast", "local"))]
    assert sorted(f"{r[0]} {r[2]}" for r in routes6) == [
        "default svc0", "fd00:17::/64 br0", "fd00:99::/64 vc0"]
    assert lab.run("node", ["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout.strip() \
        == "1"
    assert lab.run("client", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"


def test_nothing_is_created_in_the_root_namespace(lab_factory: Callable[..., Lab]) -> None:
    before = root_links()
    lab = lab_factory(pods=2)
    assert root_links() - before == set()
    assert set(lab.namespaces) <= netns_names()
    assert lab.pod_names == ["pod1", "pod2"]
    assert [lab.pod_ip(1), lab.pod_ip(2)] == ["172.17.0.2", "172.17.0.3"]


# ------------------------------------------------------------------ teardown
def test_teardown_kills_processes_and_deletes_everything(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(pods=2)
    echo = lab.start_echo(1, tcp_ports=(6789,))
    nginx = lab.start_nginx(2)
    workdir = lab.workdir
    names = set(lab.namespaces)
    lab.teardown()
    assert echo.returncode == 0  # SIGTERM is a clean stop for the echo server
    assert nginx.returncode is not None
    assert not names & netns_names()
    assert not workdir.exists()
    lab.teardown()  # idempotent
    with pytest.raises(LabError, match="torn down"):
        lab.spawn("node", ["true"], "late")


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_teardown_runs_when_the_with_block_raises(exc_type: type[BaseException]) -> None:
    names: set[str] = set()
    with pytest.raises(exc_type), Lab.create(pods=1) as lab:
        names = set(lab.namespaces)
        lab.start_echo(1, udp_ports=(5353,))
        raise exc_type("boom")
    assert names and not names & netns_names()


def test_sigterm_tears_the_lab_down(tmp_path: Path) -> None:
    script = tmp_path / "hold_lab.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from uproxy.demo.lab import Lab, install_signal_teardown
        with Lab.create(pods=1) as lab:
            install_signal_teardown(lab)
            lab.start_echo(1, tcp_ports=(6789,))
            print(" ".join(lab.namespaces), flush=True)
            time.sleep(60)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        names = set(proc.stdout.readline().split())
        assert len(names) == 3 and names <= netns_names()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert not names & netns_names()


def test_stale_lab_of_a_dead_run_is_removed_at_next_create(
        lab_factory: Callable[..., Lab]) -> None:
    stale = f"upl{dead_pid()}x0000-node"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        lab_factory(pods=1)
        assert stale not in netns_names()
        assert sleeper.wait(timeout=5) != 0  # killed by the cleanup
        assert remove_stale_labs() == []
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)


def test_live_labs_are_not_stale(lab_factory: Callable[..., Lab]) -> None:
    first = lab_factory(pods=1)
    second = lab_factory(pods=1, name_hint="Second Lab!")
    assert second.prefix.endswith("-secondlab")
    assert set(first.namespaces) | set(second.namespaces) <= netns_names()
