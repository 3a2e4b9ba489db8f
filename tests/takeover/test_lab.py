"""Upgrades in the lab: a new ``uproxy run`` takes over the running one's sockets.

The real daemon in the node namespace, real iptables, a client in the client
namespace opening new connections through a ClusterIP the whole time while
uproxy is replaced; nothing may be refused or reset, and each old process
exits 0 leaving the rules in place.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support.matrix import Flavor
from tests.support.tools import tools_dir
from uproxy.demo.lab import Lab
from uproxy.demo.node import NodeProxy, endpoint_slice, service

VIP = "10.0.0.190"
PORTS = [{"port": 80, "targetPort": 9376}]
SLICE_PORTS = [{"name": "", "port": 9376, "protocol": "TCP"}]


@pytest.fixture
def node(lab: Lab, flavor: Flavor) -> Iterator[NodeProxy]:
    proxy = NodeProxy(lab, loop=flavor.loop, native=flavor.native)
    lab.start_echo(1, tcp_ports=(9376,))
    lab.start_echo(2, tcp_ports=(9376,))
    proxy.write("svc.yaml", service("upgraded", VIP, PORTS),
                endpoint_slice("upgraded", lab.pod_ips[:2], SLICE_PORTS))
    proxy.start(wait_for="default/upgraded: cluster IP")
    yield proxy
    if proxy.proc is not None and proxy.proc.poll() is None:
        proxy.stop()


def _rules(node: NodeProxy) -> list[str]:
    return sorted(line for line in node.uproxy_lines() if VIP in line)


def _background_probe(lab: Lab, seconds: float, name: str) -> tuple[object, str]:
    argv = [sys.executable, "-m", "uproxy.demo.probe", "tcp", VIP, "80", "--count", "1000000",
            "--concurrency", "4", "--timeout", "5", "--max-time", str(seconds)]
    return lab.spawn("client", argv, name), name


def _probe_result(lab: Lab, proc: object, name: str, seconds: float) -> dict[str, object]:
    assert hasattr(proc, "wait")
    proc.wait(seconds + 30)
    lines = [line for line in lab.log(name).splitlines() if line.startswith("{")]
    assert lines, lab.log(name)
    result: dict[str, object] = json.loads(lines[-1])
    return result


def _wait_relayed(lab: Lab, count: int, timeout: float = 15.0) -> None:
    """Until the node relays ``count`` open connections older than a second (the streams'
    chatty ones: the probe's connections live milliseconds)."""
    start = time.monotonic()
    seen: list[tuple[float, int, int]] = []  # (when, open, long-lived)
    while time.monotonic() < start + timeout:
        listing = json.loads(lab.run("node", ["curl", "-sf", "-m", "5",
                                              "http://127.0.0.1:10249/api/v1/connections"]).stdout)
        items = listing["items"]
        assert isinstance(items, list)
        opened = [c for c in items if c["state"] == "open"]
        long_lived = sum(1 for c in opened if c["age"] >= 1.0)
        seen.append((round(time.monotonic() - start, 2), len(opened), long_lived))
        if long_lived >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} long-lived connections in {timeout:g}s; "
                         f"(seconds, open, long-lived): {seen}")


def test_should_work_after_restarting_kube_proxy_no_connection_refused_in_two_upgrades(
        lab: Lab, node: NodeProxy) -> None:
    rules = _rules(node)
    # one rule for the VIP to its proxy port: an iptables REDIRECT or an nftables map element
    assert len(rules) == 1 and re.search(r"(REDIRECT --to-ports |: )\d+", rules[0]), rules
    seconds = 8.0
    proc, name = _background_probe(lab, seconds, "probe-upgrades")
    time.sleep(1.0)
    pids = []
    for _ in range(2):
        assert node.proc is not None
        pids.append(node.proc.pid)
        assert node.upgrade() == 0  # the old process hands over and exits 0
        assert _rules(node) == rules  # same proxy port: the rules were never rewritten
        time.sleep(1.0)
    result = _probe_result(lab, proc, name, seconds)
    errors = result["errors"]
    assert isinstance(errors, dict) and result["counts"], result
    assert sum(errors.values()) == 0, result
    assert sum(result["counts"].values()) > 100, result  # type: ignore[union-attr]
    log = node.log
    assert "took over" in log and "keeping the rules in place" in log, log
    # SIGTERM after the takeovers still drains and removes every rule.
    assert node.stop() == 0
    assert node.uproxy_lines() == []


def test_should_work_after_restarting_kube_proxy_killed_uproxy_leaves_a_stale_socket(
        lab: Lab, node: NodeProxy) -> None:
    import signal

    assert node.proc is not None
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(10)
    assert (node.state_dir / "takeover.sock").exists()
    node.start(wait_for="default/upgraded: cluster IP")
    assert "crashed?" in node.log and "took over" not in node.log
    result = lab.probe("tcp", VIP, "80", "--count", "20")
    assert sum(result["counts"].values()) == 20, result


def test_established_connections_survive_three_upgrades_byte_for_byte(
        lab: Lab, node: NodeProxy, flavor: Flavor) -> None:
    """Both relay paths: the native engine hands each connection back with what its
    pipes held; the new process relays what came over on its own relay path (the
    engine takes them with their state)."""
    seconds = 24.0  # three upgrades must fit in it, also on a busy machine
    argv = [sys.executable, "-m", "tests.takeover.streams", VIP, "80", "--conns", "12",
            "--halfclosed", "3", "--seconds", str(seconds)]
    streams = lab.spawn("client", argv, "streams")
    probe, name = _background_probe(lab, seconds, "probe-during-streams")
    time.sleep(1.0)
    moved = []
    for _ in range(3):
        assert node.upgrade() == 0
        line = re.search(r"took over 1 listening sockets and (\d+) connections", node.log)
        assert line, node.log
        moved.append(int(line.group(1)))
        upgraded_at = time.time()
        time.sleep(1.0)
    # The connections that came over show their first accept's age and every byte so far.
    listing = json.loads(lab.run("node", ["curl", "-sf", "-m", "5",
                                          "http://127.0.0.1:10249/api/v1/connections"]).stdout)
    older = [c for c in listing["items"]
             if c["state"] == "open" and c["age"] > time.time() - upgraded_at + 2]
    assert len(older) >= 12, listing
    assert all(c["bytes_up"] > 0 and c["bytes_down"] > 0 for c in older), older
    assert all(c["native"] == flavor.native for c in older), older  # not a Python fallback
    streams.wait(seconds + 60)
    lines = [line for line in lab.log("streams").splitlines() if line.startswith("{")]
    assert lines, lab.log("streams")
    result = json.loads(lines[-1])
    assert result["broken"] == 0 and result["ok"] == 15, result
    assert result["rounds"] > 50, result
    # Every takeover moved at least the 12 chatty connections (the half-closed ones may be done).
    assert all(count >= 12 for count in moved), moved
    probed = _probe_result(lab, probe, name, seconds)
    assert sum(probed["errors"].values()) == 0, probed  # type: ignore[union-attr]
    assert node.stop() == 0
    assert node.uproxy_lines() == []


def test_a_udp_flow_and_an_affine_client_keep_their_endpoints_through_upgrades(
        lab: Lab, flavor: Flavor) -> None:
    node = NodeProxy(lab, loop=flavor.loop, native=flavor.native)
    for pod in (1, 2, 3):
        lab.start_echo(pod, tcp_ports=(9376,), udp_ports=(9377,))
    node.write("sticky.yaml",
               service("sticky", "10.0.0.191", PORTS, sessionAffinity="ClientIP"),
               endpoint_slice("sticky", lab.pod_ips[:3], SLICE_PORTS),
               service("asking", "10.0.0.192",
                       [{"port": 53, "targetPort": 9377, "protocol": "UDP"}]),
               endpoint_slice("asking", lab.pod_ips[:3],
                              [{"name": "", "port": 9377, "protocol": "UDP"}]))
    node.start(wait_for="default/asking: cluster IP")
    try:
        seconds = 9.0
        udp = lab.spawn("client", [sys.executable, "-m", "uproxy.demo.probe", "udp",
                                   "10.0.0.192", "53", "--count", "1000000", "--timeout", "5",
                                   "--max-time", str(seconds)], "probe-udp")
        tcp = lab.spawn("client", [sys.executable, "-m", "uproxy.demo.probe", "tcp",
                                   "10.0.0.191", "80", "--count", "1000000", "--concurrency",
                                   "2", "--timeout", "5", "--max-time", str(seconds)],
                        "probe-sticky")
        time.sleep(1.0)
        for _ in range(3):
            assert node.upgrade() == 0
            time.sleep(0.5)
        asked = _probe_result(lab, udp, "probe-udp", seconds)
        sticky = _probe_result(lab, tcp, "probe-sticky", seconds)
        # One socket, one flow: every reply from the same pod, none lost.
        assert sum(asked["errors"].values()) == 0, asked  # type: ignore[union-attr]
        assert len(asked["counts"]) == 1, asked  # type: ignore[arg-type]
        assert sum(asked["counts"].values()) > 100, asked  # type: ignore[union-attr]
        # One client IP with ClientIP affinity: one pod, before and after each upgrade.
        assert sum(sticky["errors"].values()) == 0, sticky  # type: ignore[union-attr]
        assert len(sticky["counts"]) == 1, sticky  # type: ignore[arg-type]
        assert "took over 1 of 1 UDP flows" in node.log, node.log
        # The affine service is set up by the flavor's path (the engine's pins, handed
        # over with the balancer's), not by a Python fallback: the last process, asked
        # after the upgrades, keeps the client on its pod and counts its set-ups.
        after = lab.probe("tcp", "10.0.0.191", "80", "--count", "20", "--timeout", "5")
        assert sum(after["errors"].values()) == 0, after  # type: ignore[union-attr]
        assert list(after["counts"]) == list(sticky["counts"]), (after, sticky)  # type: ignore[arg-type]
        metrics = lab.run("node", ["curl", "-sf", "-m", "5",
                                   "http://127.0.0.1:10249/metrics"]).stdout
        setups = {path: _sample(metrics, f'uproxy_relay_setup_total{{path="{path}"}}')
                  for path in ("native", "python")}
        want, other = ("native", "python") if flavor.native else ("python", "native")
        assert setups[want] >= 20 and setups[other] == 0, setups
        # The affine client's pin is on show (in the balancer or the engine, by path).
        assert _sample(metrics, "uproxy_affinity_pins") >= 1, metrics
    finally:
        assert node.stop() == 0


def test_a_takeover_that_fails_half_way_leaves_the_old_one_serving_everything(
        lab: Lab, node: NodeProxy) -> None:
    seconds = 8.0
    streams = lab.spawn("client", [sys.executable, "-m", "tests.takeover.streams", VIP, "80",
                                   "--conns", "8", "--halfclosed", "2", "--seconds",
                                   str(seconds)], "streams")
    probe, name = _background_probe(lab, seconds, "probe-during-failure")
    time.sleep(1.0)
    _wait_relayed(lab, 8)  # (a busy machine may take longer to start the streams' process)
    for _ in range(2):  # the paused connections resume; then it can fail again
        seen = json.loads(lab.run("node", [sys.executable, "-m", "tests.takeover.halfway",
                                           str(node.state_dir)]).stdout.splitlines()[-1])
        # The listener and at least the 8 chatty connections (a half-closed one may be done
        # already: its last bytes all in the kernel's buffers towards the slow reader).
        assert seen["offered"] >= 1 + 2 * 8 and seen["received"] >= 1, seen
        assert {"listener", "tcp"} <= set(seen["kinds"]), seen
        node.wait_log("takeover failed, serving everything again")
        time.sleep(1.0)
    assert node.proc is not None and node.proc.poll() is None
    streams.wait(seconds + 60)
    result = json.loads([line for line in lab.log("streams").splitlines()
                         if line.startswith("{")][-1])
    assert result["broken"] == 0 and result["ok"] == 10, result
    probed = _probe_result(lab, probe, name, seconds)
    assert sum(probed["errors"].values()) == 0, probed  # type: ignore[union-attr]
    assert node.upgrade() == 0  # and a real takeover still works afterwards
    assert node.stop() == 0


def test_a_refused_takeover_exits_2_in_one_line_and_leaves_the_old_one_and_its_rules(
        lab: Lab, node: NodeProxy) -> None:
    """Refused because it runs in another network namespace (a state dir shared by
    mistake): the refusal path a different handover format takes too."""
    rules = node.uproxy_lines()
    argv = [sys.executable, "-m", "uproxy", "run", "--manifests", str(node.manifests),
            "--hostname-override", "node", "--state-dir", str(node.state_dir),
            "--status-address", "127.0.0.1:10249", "--healthz-address", "127.0.0.1:10256"]
    done = lab.run("client", argv, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("uproxy: takeover refused") and "network namespace" in last, last
    assert "Traceback" not in done.stderr
    assert node.proc is not None and node.proc.poll() is None
    assert node.uproxy_lines() == rules
    result = lab.probe("tcp", VIP, "80", "--count", "20")
    assert sum(result["counts"].values()) == 20, result
    assert "takeover refused" in node.log


HC_PORT = 32191
HEALTH_POLLER = """
import json, sys, time, urllib.error, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
codes = {}
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        code = str(urllib.request.urlopen(url, timeout=2).status)
    except urllib.error.HTTPError as exc:
        code = str(exc.code)
    except OSError as exc:
        code = type(exc).__name__
    codes[code] = codes.get(code, 0) + 1
    time.sleep(0.01)
print(json.dumps(codes))
"""


def test_a_health_check_node_port_keeps_answering_through_upgrades(
        lab: Lab, node: NodeProxy) -> None:
    """kube-proxy's health-check node port (``type: LoadBalancer``, ``Local``) comes over with
    the other listening sockets: a load balancer probing it all through two upgrades gets 200
    every time, never a refused connection (the port is never closed)."""
    local = lab.pod_ips[0]
    node.write("lb.yaml",
               service("lb", "10.0.0.191", [{"port": 80, "targetPort": 9376, "nodePort": 30191}],
                       type="LoadBalancer", externalTrafficPolicy="Local",
                       healthCheckNodePort=HC_PORT),
               endpoint_slice("lb", [local], SLICE_PORTS, node_names={local: "node"}))
    url = f"http://{lab.node_ip}:{HC_PORT}/healthz"
    script = lab.workdir / "health_poller.py"
    script.write_text(HEALTH_POLLER)
    from tests.support.waiting import wait_until

    wait_until(lambda: '"localEndpoints": 1' in lab.run(
        "client", ["curl", "-s", "-m", "2", url], check=False).stdout,
        timeout=10, message="the health-check node port answering 200")
    seconds = 6.0
    poller = lab.spawn("client", [sys.executable, str(script), url, str(seconds)],
                       "health-poller")
    # kube-proxy's own liveness endpoint (a kubelet's probe), on the node: handed over too
    live = lab.spawn("node", [sys.executable, str(script), "http://127.0.0.1:10256/livez",
                              str(seconds)], "livez-poller")
    time.sleep(1.0)
    for _ in range(2):
        assert node.upgrade() == 0
        time.sleep(1.0)
    poller.wait(seconds + 30)
    live.wait(seconds + 30)
    codes = json.loads(lab.log("health-poller").strip().splitlines()[-1])
    assert set(codes) == {"200"} and codes["200"] > 50, codes
    codes = json.loads(lab.log("livez-poller").strip().splitlines()[-1])
    assert set(codes) == {"200"} and codes["200"] > 50, codes
    assert "health-check node port" in node.log


V6_VIP, V6_DUAL = "10.0.0.193", "fd00:96::193"


def test_ipv6_connections_flows_and_new_clients_survive_upgrades(
        lab: Lab, flavor: Flavor) -> None:
    """The same promises over IPv6 (a dual-stack Service, its IPv6 ClusterIP): the
    listener, established connections, a UDP flow and new clients all come through."""
    node = NodeProxy(lab, loop=flavor.loop, native=flavor.native)
    for pod in (1, 2):
        lab.start_echo(pod, tcp_ports=(9376,), udp_ports=(9377,))
    ports = [{"name": "http", "port": 80, "targetPort": 9376},
             {"name": "dns", "port": 53, "targetPort": 9377, "protocol": "UDP"}]
    slice_ports = [{"name": "http", "port": 9376, "protocol": "TCP"},
                   {"name": "dns", "port": 9377, "protocol": "UDP"}]
    node.write("dual.yaml",
               service("dual", V6_VIP, ports, clusterIPs=[V6_VIP, V6_DUAL],
                       ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"]),
               endpoint_slice("dual", lab.pod_ips[:2], slice_ports, name="dual-v4"),
               endpoint_slice("dual", [lab.pod_ip6(1), lab.pod_ip6(2)], slice_ports,
                              name="dual-v6"))
    node.start(wait_for="default/dual:dns cluster IP")
    try:
        seconds = 24.0
        streams = lab.spawn("client", [sys.executable, "-m", "tests.takeover.streams", V6_DUAL,
                                       "80", "--conns", "6", "--halfclosed", "2", "--seconds",
                                       str(seconds)], "streams6")
        tcp = lab.spawn("client", [sys.executable, "-m", "uproxy.demo.probe", "tcp", V6_DUAL,
                                   "80", "--count", "1000000", "--concurrency", "4",
                                   "--timeout", "5", "--max-time", str(seconds)], "probe6-tcp")
        udp = lab.spawn("client", [sys.executable, "-m", "uproxy.demo.probe", "udp", V6_DUAL,
                                   "53", "--count", "1000000", "--timeout", "5",
                                   "--max-time", str(seconds)], "probe6-udp")
        time.sleep(1.5)
        moved = []
        for _ in range(2):
            assert node.upgrade() == 0
            line = re.search(r"took over (\d+) listening sockets and (\d+) connections",
                             node.log)
            assert line, node.log
            moved.append(int(line.group(2)))
            time.sleep(1.0)
        streams.wait(seconds + 60)
        lines = [line for line in lab.log("streams6").splitlines() if line.startswith("{")]
        assert lines, lab.log("streams6")
        result = json.loads(lines[-1])
        assert result["broken"] == 0 and result["ok"] == 8, result
        assert all(count >= 6 for count in moved), moved  # the chatty IPv6 connections moved
        probed = _probe_result(lab, tcp, "probe6-tcp", seconds)
        assert sum(probed["errors"].values()) == 0, probed  # type: ignore[union-attr]
        assert sum(probed["counts"].values()) > 100, probed  # type: ignore[union-attr]
        asked = _probe_result(lab, udp, "probe6-udp", seconds)
        assert sum(asked["errors"].values()) == 0, asked  # type: ignore[union-attr]
        assert len(asked["counts"]) == 1, asked  # type: ignore[arg-type]  # one flow, one pod
        assert re.search(r"took over 1 of \d+ UDP flows", node.log), node.log
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []


def _sample(text: str, series: str) -> float:
    """The value of one Prometheus series in an exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_the_old_uproxys_rules_in_flight_never_land_after_the_new_ones(lab: Lab) -> None:
    """An ``nft -f`` the old uproxy started before the hello (here a slow one: the node's
    nft behind a wrapper that sleeps 2.5 s before it runs) must not land after the new
    uproxy's first sync: it would put back a Service the new one no longer has, and the
    new one's incremental syncs would never take it out (only a full sync, 30 s later).
    The old one waits for it, serving on, and only then hands over."""
    tools = tools_dir(lab.workdir / "bin-slow-nft")
    nft = shutil.which("nft")
    assert nft is not None
    slow, started = lab.workdir / "slow-nft", lab.workdir / "slow-nft-started"
    (tools / "nft").write_text(  # the next `nft -f` after `slow` appears takes 2.5 s more
        f"#!/bin/sh\nPATH=/usr/bin:/bin\n"
        f"if [ \"$1\" = -f ] && rm {slow} 2>/dev/null; then touch {started}; "
        f"sleep 2.5; fi\nexec {nft} \"$@\"\n")
    (tools / "nft").chmod(0o755)
    lab.start_echo(1, tcp_ports=(9376,))
    node = NodeProxy(lab, prefix=["env", f"PATH={tools}"])
    assert node.interception == "nftables"
    node.write("svc.yaml", service("upgraded", VIP, PORTS),
               endpoint_slice("upgraded", lab.pod_ips[:1], SLICE_PORTS))
    node.start(wait_for="default/upgraded: cluster IP")
    gone = "10.0.0.191"
    try:
        slow.touch()
        node.write("gone.yaml", service("gone", gone, PORTS),
                   endpoint_slice("gone", lab.pod_ips[:1], SLICE_PORTS))
        deadline = time.monotonic() + 10
        while not started.exists():  # the old one's nft -f adding "gone" is under way
            assert time.monotonic() < deadline, node.log
            time.sleep(0.02)
        began = time.monotonic()
        node.remove("gone.yaml")  # the new uproxy starts without it
        assert node.upgrade() == 0
        time.sleep(max(0.0, began + 3.5 - time.monotonic()))  # past the slow nft's end
        text = node.nft_tables(4)
        assert VIP in text and gone not in text, text
        old_log = lab.log(f"{node.name}-{node._starts - 1}")
        assert "takeover: waited" in old_log and "for the rules in flight" in old_log, old_log
        assert lab.probe("tcp", VIP, "80", "--count", "5")["counts"] == {"pod1": 5}
    finally:
        assert node.stop() == 0
    assert node.uproxy_lines() == []
