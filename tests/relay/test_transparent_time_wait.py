"""Transparent mode's TIME_WAIT sockets must not swallow other connections.

A backend connection from the client's address that uproxy closes first (the client
closed first) leaves a TIME_WAIT socket ``clientIP:E <-> podIP:port`` in the node. The
same client reaching the pod directly (a headless Service, a pod IP) from port E passes
through the node: without uproxy's sweep, the pod's SYN-ACK is delivered to that
TIME_WAIT socket (uproxy's ``-m socket --transparent`` mark) or dropped by
``ip_forward`` (early demux found it, with uproxy stopped), and the connection hangs for
60 s. Here it must succeed within 3 s (one SYN retry).

The real daemon in the lab's node namespace, both relay paths and loops (``flavor``),
both families (a dual-stack Service, its endpoint pod1 on this node); a pod server that
tells each client the address and port it saw and closes only after the client did.
Cases: uproxy running (``tcp_rfc1337`` off and on), a close during the shutdown drain, a
connection handed over by a takeover and closed in the new uproxy; then the sweep alone
(what it destroys and keeps, a refusal).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.matrix import Flavor
from tests.support.waiting import wait_until
from uproxy.demo.lab import Lab
from uproxy.demo.node import NodeProxy, endpoint_slice, service

pytestmark = pytest.mark.lab

V4, V6 = "10.0.0.40", "fd00:96::41"
POD_PORT = 7000
PORTS = [{"name": "tcp", "port": 80, "targetPort": POD_PORT, "protocol": "TCP"}]
SLICE_PORTS = [{"name": "tcp", "port": POD_PORT, "protocol": "TCP"}]

POD_SERVER = """
import socket, threading
def handle(c, peer):
    c.sendall(f"{peer[0]} {peer[1]}\\n".encode())
    while c.recv(100):  # the client closes first
        pass
    c.close()
def serve(family, host):
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, PORT)); s.listen(64)
    while True:
        c, peer = s.accept()
        threading.Thread(target=handle, args=(c, peer), daemon=True).start()
threading.Thread(target=serve, args=(socket.AF_INET, "0.0.0.0"), daemon=True).start()
serve(socket.AF_INET6, "::")
""".replace("PORT", str(POD_PORT))

CLIENT = """
import os, socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET

def line(s):
    got = b""
    while not got.endswith(b"\\n"):
        part = s.recv(100)
        if not part:
            break
        got += part
    return got.decode().strip()

if mode == "via":  # through the Service; the client closes first (after the trigger file)
    # (SO_REUSEADDR: should the node give the backend connection this socket's own port,
    # 1 in ~14,000, the direct connection below can still bind it beside our TIME_WAIT)
    c = socket.socket(family)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.settimeout(5)
    c.connect((host, port))
    print(line(c), flush=True)
    if len(sys.argv) > 4:
        for _ in range(300):
            if os.path.exists(sys.argv[4]):
                break
            time.sleep(0.05)
    c.shutdown(socket.SHUT_WR)
    while c.recv(100):  # the pod's close, relayed back: uproxy's backend socket is closed
        pass
    c.close()
    print("closed", flush=True)
else:  # directly to the pod, from the given source address and port
    source, sport = sys.argv[4], int(sys.argv[5])
    time.sleep(float(sys.argv[6]))
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((source, sport))
    s.settimeout(3)
    start = time.monotonic()
    try:
        s.connect((host, port))
        print("ok", line(s), f"{time.monotonic() - start:.2f}")
    except OSError as exc:
        print("failed", exc, f"{time.monotonic() - start:.2f}")
"""


def _objects(lab: Lab) -> list[dict[str, object]]:
    here = {lab.pod_ip(1): "node", lab.pod_ip6(1): "node"}
    return [service("tw", V4, PORTS, clusterIPs=[V4, V6], ipFamilyPolicy="PreferDualStack",
                    ipFamilies=["IPv4", "IPv6"]),
            endpoint_slice("tw", [lab.pod_ip(1)], SLICE_PORTS, name="tw-v4",
                           node_names=here),
            endpoint_slice("tw", [lab.pod_ip6(1)], SLICE_PORTS, name="tw-v6",
                           node_names=here)]


def _start(lab: Lab, flavor: Flavor) -> NodeProxy:
    server = lab.spawn("pod1", [sys.executable, "-c", POD_SERVER], "tw-server")
    lab.wait_port("pod1", "::", POD_PORT, "tcp", proc=server)
    node = NodeProxy(lab, loop=flavor.loop, native=flavor.native)
    node.write("tw.yaml", *_objects(lab))
    node.start(wait_for="default/tw:tcp cluster IP")
    assert "transparent backend connections on:" in node.log
    return node


def _addresses(lab: Lab, family: int) -> tuple[str, str, str]:
    """(client, service, pod) addresses of ``family``."""
    if family == 6:
        return lab.client_ip6, V6, lab.pod_ip6(1)
    return lab.client_ip, V4, lab.pod_ip(1)


def _direct(lab: Lab, client: str, pod: str, port: int, after: float = 0.0) -> list[str]:
    """The client straight to the pod from ``client:port``, ``after`` seconds: what it
    printed, as words (``ok``, the address and port the pod saw, seconds to connect)."""
    done = lab.run("client", [sys.executable, "-c", CLIENT, "direct", pod, str(POD_PORT),
                              client, str(port), str(after)])
    return done.stdout.split()


def _leftover_time_wait(lab: Lab, client: str) -> list[str]:
    shown = lab.run("node", ["ss", "-Htan", "state", "time-wait"]).stdout
    return [ln for ln in shown.splitlines() if client in ln]


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("rfc1337", [0, 1], ids=["rfc1337_off", "rfc1337_on"])
def test_a_client_reusing_the_backend_port_reaches_the_pod_directly(
        lab: Lab, flavor: Flavor, family: int, rfc1337: int) -> None:
    """With ``tcp_rfc1337`` off (the default) the TIME_WAIT socket answers the pod's
    SYN-ACK with an ACK, the pod resets, the reset kills the TIME_WAIT socket and the
    client's first SYN retry (1 s) gets through; with it on the TIME_WAIT socket ignores
    the reset and the client times out. The relay destroys the socket the moment it
    exists (it read the pod's FIN), by its exact address: a client that comes at once
    loses no SYN, and no sweep was needed (the sweep comes half a second after a close)."""
    lab.run("node", ["sysctl", "-qw", f"net.ipv4.tcp_rfc1337={rfc1337}"])
    node = _start(lab, flavor)
    try:
        client, svc, pod = _addresses(lab, family)
        done = lab.run("client", [sys.executable, "-c", CLIENT, "via", svc, "80"])
        seen, closed = done.stdout.splitlines()
        peer, port = seen.split()
        assert (peer, closed) == (client, "closed"), done.stdout  # transparent, client first
        words = _direct(lab, client, pod, int(port))
        assert words[:3] == ["ok", client, port], words
        assert float(words[3]) < 0.9, words  # (no SYN retry)
        assert _leftover_time_wait(lab, client) == []
        destroyed = _time_wait_destroyed(lab)
        assert destroyed == {"at_close": 1.0, "sweep": 0.0}, destroyed
    finally:
        assert node.stop() == 0


def _time_wait_destroyed(lab: Lab) -> dict[str, float]:
    """``uproxy_transparent_time_wait_destroyed_total`` by ``how``, from /metrics."""
    text = lab.run("node", ["curl", "-sf", "-m", "5", "http://127.0.0.1:10249/metrics"]).stdout
    name = "uproxy_transparent_time_wait_destroyed_total{how=\""
    return {line[len(name):].split('"', 1)[0]: float(line.split()[-1])
            for line in text.splitlines() if line.startswith(name)}


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_connections_closed_while_uproxy_stops_leave_nothing_in_the_way(
        lab: Lab, flavor: Flavor, family: int) -> None:
    """The client closes first during the shutdown drain: after uproxy exits, the same
    4-tuple straight to the pod works."""
    node = _start(lab, flavor)
    try:
        _stop_during_a_close(lab, node, family)
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop()


def _stop_during_a_close(lab: Lab, node: NodeProxy, family: int) -> None:
    client, svc, pod = _addresses(lab, family)
    trigger = Path(lab.workdir) / f"tw-close-{family}"
    holder = lab.spawn("client", [sys.executable, "-c", CLIENT, "via", svc, "80", str(trigger)],
                       "tw-holder")
    wait_until(lambda: lab.log("tw-holder").strip() != "", timeout=5,
               message="the held connection did not open")
    peer, port = lab.log("tw-holder").split()[:2]
    assert peer == client
    assert node.proc is not None
    node.proc.send_signal(15)
    node.wait_log("letting 1 open connections finish")
    trigger.touch()
    assert holder.wait(5) == 0
    assert "closed" in lab.log("tw-holder")
    assert node.proc.wait(10) == 0
    words = _direct(lab, client, pod, int(port))
    assert words[:3] == ["ok", client, port], (words, node.log)
    assert _leftover_time_wait(lab, client) == []


# --- the sweep alone: what it destroys, and a refusal ---------------------------------

SWEEP = """
import asyncio, logging, os, socket, subprocess, sys
from uproxy.model import Endpoint
from uproxy.proxy import sockdiag
from uproxy.proxy.transparent import Transparent, backend_socket
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
mode, pods = sys.argv[1], sys.argv[2:]

def time_wait():
    shown = subprocess.run(["ss", "-Htan", "state", "time-wait"], capture_output=True,
                           text=True, check=True).stdout
    return sorted(line.split()[2].rsplit(":", 1)[0].strip("[]") for line in shown.splitlines())

async def closed_first(t, client, pod, transparent, family=None):
    family = family or (socket.AF_INET6 if ":" in pod else socket.AF_INET)
    source = t.source_for(client, Endpoint(pod, 7000, node_name="node"), external=False,
                          external_local=False) if transparent else None
    s = backend_socket(family, socket.SOCK_STREAM, source)
    s.setblocking(True); s.settimeout(3)
    s.connect((pod, 7000))
    s.recv(100)
    s.shutdown(socket.SHUT_WR)  # uproxy's side closes first
    while s.recv(100):
        pass
    s.close()

async def main():
    t = Transparent("node")
    await t.start(wanted=True)
    for client, pod in zip(pods[::2], pods[1::2]):
        for transparent in (True, False):
            await closed_first(t, client, pod, transparent)
    # the node's own, from an IPv6 socket to an IPv4 pod: a v4-mapped local address
    await closed_first(t, None, "::ffff:" + pods[1], False, socket.AF_INET6)
    print("before", time_wait())
    if mode == "nobody":
        os.setgid(65534); os.setuid(65534)
        print("swept", await t.sweep(t.links.local), await t.sweep(t.links.local))
        return
    local = t.links.local
    if mode == "peers":  # only sockets whose peer is one of uproxy's endpoints
        t.backends = lambda: {(pods[1], 7000)}
    if mode == "many":  # more addresses than a kernel filter takes: filtered in Python
        local = local | {f"10.200.{i // 250}.{i % 250 + 1}" for i in range(3100)}
    print("swept", await t.sweep(local))
    print("after", time_wait())
    await closed_first(t, pods[0], pods[1], True)
    await t.cleanup(sweep=True)
    print("cleanup", time_wait())

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["root", "many", "peers"],
                         ids=["kernel_filter", "python_filter", "endpoints_only"])
def test_the_sweep_destroys_only_sockets_bound_to_addresses_not_the_nodes(
        lab: Lab, mode: str) -> None:
    """TIME_WAIT sockets of connections closed first by the node, both families: the
    transparent ones (bound to the client's address) go, the node's own stay; cleanup
    (stop, ``uproxy cleanup``) sweeps too. The node's addresses are filtered by the kernel,
    or here when there are too many for its filter. Given the endpoints (the daemon's
    table), only sockets whose peer is one of them go: here the IPv4 pod's, not the IPv6
    pod's.

    ``tcp_rfc1337`` on: the listings count on every TIME_WAIT socket living its 60 s, and
    with it off a reset kills one. The pod's stack sends one now and then: its delayed ACK
    of our FIN (sent as it closes, from another CPU) can reach the node after its FIN|ACK;
    the TIME_WAIT socket answers that old segment with an ACK, the pod's socket is gone by
    then, and the pod resets."""
    lab.run("node", ["sysctl", "-qw", "net.ipv4.tcp_rfc1337=1"])
    server = lab.spawn("pod1", [sys.executable, "-c", POD_SERVER], "tw-server")
    lab.wait_port("pod1", "::", POD_PORT, "tcp", proc=server)
    pairs = [lab.client_ip, lab.pod_ip(1), lab.client_ip6, lab.pod_ip6(1)]
    done = lab.run("node", [sys.executable, "-c", SWEEP, mode, *pairs])
    out = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    node_own = sorted([lab.bridge_ip, lab.bridge_ip6, "::ffff:" + lab.bridge_ip])
    assert out["before"] == str(sorted([*node_own, lab.client_ip, lab.client_ip6])), done
    kept = sorted([*node_own, lab.client_ip6]) if mode == "peers" else node_own
    assert out["swept"] == ("1" if mode == "peers" else "2"), done
    assert out["after"] == str(kept), done
    assert out["cleanup"] == str(kept), done
    assert "destroyed 1 closing transparent sockets" in done.stderr


def test_a_refused_sweep_says_so_once_and_carries_on(lab: Lab) -> None:
    """Without CAP_NET_ADMIN the kernel refuses SOCK_DESTROY (as a kernel without it
    would, EOPNOTSUPP): one warning line, and no sweep after it."""
    server = lab.spawn("pod1", [sys.executable, "-c", POD_SERVER], "tw-server")
    lab.wait_port("pod1", "::", POD_PORT, "tcp", proc=server)
    done = lab.run("node", [sys.executable, "-c", SWEEP, "nobody", lab.client_ip,
                            lab.pod_ip(1)])
    assert "swept 0 0" in done.stdout, (done.stdout, done.stderr)
    said = [ln for ln in done.stderr.splitlines() if ln.startswith("WARNING")]
    assert said == ["WARNING uproxy.transparent cannot destroy transparent TIME_WAIT sockets "
                    "(SOCK_DESTROY: Operation not permitted): a client that reuses one's "
                    "address and port to reach the pod directly waits up to 60s"], done.stderr


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_a_connection_handed_over_and_then_closed_is_swept_by_the_new_uproxy(
        lab: Lab, flavor: Flavor, family: int) -> None:
    """A transparent connection the old uproxy handed over, closed by its client in the new
    one: the new uproxy sweeps its TIME_WAIT socket (the old one sweeps nothing at exit)."""
    lab.run("node", ["sysctl", "-qw", "net.ipv4.tcp_rfc1337=1"])  # (no 1 s recovery)
    node = _start(lab, flavor)
    try:
        client, svc, pod = _addresses(lab, family)
        trigger = Path(lab.workdir) / f"tw-close-{family}"
        holder = lab.spawn("client", [sys.executable, "-c", CLIENT, "via", svc, "80",
                                      str(trigger)], "tw-holder")
        wait_until(lambda: lab.log("tw-holder").strip() != "", timeout=5,
                   message="the held connection did not open")
        peer, port = lab.log("tw-holder").split()[:2]
        assert peer == client
        assert node.upgrade() == 0
        assert "handed over 1 connections" in lab.log("uproxy-1")
        trigger.touch()
        assert holder.wait(5) == 0
        assert "closed" in lab.log("tw-holder")
        words = _direct(lab, client, pod, int(port), after=1.0)
        assert words[:3] == ["ok", client, port], (words, node.log)
        assert float(words[3]) < 0.9, words  # no SYN lost: swept before
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop()
