"""uproxy's nftables tables for real, in the lab's node namespace.

A table of 2,000 dummy Services plus the real ones is applied with
:class:`uproxy.nftables.Nftables`; a plain socket server in the node namespace
stands in for uproxy's proxy sockets and answers with the port it was reached
on and the original destination (``SO_ORIGINAL_DST``). Clients in the client
namespace (prerouting hook) and in the node namespace itself (output hook)
connect to the Service address, over TCP and UDP, IPv4 and IPv6.

The lab on this branch has no IPv6, so the test gives the client link
``fd00:99::/64`` and the node an IPv6 default route to its sink interface
itself (only when the lab has not done so already).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from uproxy import nftrules
from uproxy.demo.lab import Lab
from uproxy.model import ServicePortName
from uproxy.nftables import PROBE_TABLE, Nftables, NftablesError
from uproxy.rules import KIND_CLUSTER, Redirect

pytestmark = pytest.mark.lab

SVC4 = "10.0.0.10"
SVC6 = "fd00:10::a"
NODE6 = "fd00:99::1"
CLIENT6 = "fd00:99::2"
WEB = ServicePortName("default", "web", "http", "TCP")
DNS = ServicePortName("kube-system", "kube-dns", "dns", "UDP")
PROXY_TCP, PROXY_TCP_MOVED, PROXY_UDP = 30080, 30081, 30053

# Answers every TCP connection with "PORT ORIGINAL-DESTINATION\n" and then echoes
# lines; every UDP datagram with "PORT". Dual-stack sockets on "::".
SERVER = textwrap.dedent("""
    import socket, struct, sys, threading
    def orig(conn):
        if conn.family == socket.AF_INET6 and not conn.getsockname()[0].startswith("::ffff:"):
            raw = conn.getsockopt(socket.IPPROTO_IPV6, 80, 28)
            return "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, raw[8:24]),
                                struct.unpack("!H", raw[2:4])[0])
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)
        return "%s:%d" % (socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0])
    def serve_conn(conn, port):
        with conn:
            conn.sendall(("%d %s\\n" % (port, orig(conn))).encode())
            while data := conn.recv(4096):
                conn.sendall(data)
    def tcp(port):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port)); s.listen(64)
        while True:
            conn, _ = s.accept()
            threading.Thread(target=serve_conn, args=(conn, port), daemon=True).start()
    IP_PKTINFO = 8
    def udp_family(port, fam):
        # Replies leave from the address the datagram was sent to (pktinfo), as a
        # proxy's must: after a redirect that is what conntrack translates back.
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            s.bind(("::", port))
        else:
            s.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
            s.bind(("0.0.0.0", port))
        while True:
            _, anc, _, peer = s.recvmsg(2048, 256)
            reply = []
            for level, kind, data in anc:
                if fam == socket.AF_INET and kind == IP_PKTINFO:
                    reply = [(level, kind, struct.pack("=i4s4s", 0, data[8:12], bytes(4)))]
                elif fam == socket.AF_INET6 and kind == socket.IPV6_PKTINFO:
                    reply = [(level, kind, data[:16] + struct.pack("=i", 0))]
            s.sendmsg([str(port).encode()], reply, 0, peer)
    def udp(port):
        threading.Thread(target=udp_family, args=(port, socket.AF_INET6), daemon=True).start()
        udp_family(port, socket.AF_INET)
    kinds = {"tcp": tcp, "udp": udp}
    for spec in sys.argv[1:]:
        kind, port = spec.split(":")
        threading.Thread(target=kinds[kind], args=(int(port),), daemon=True).start()
    threading.Event().wait()
""")

# One connection (TCP) or one datagram exchange (UDP, connected socket: a reply
# from anything but the Service address is not accepted); prints one JSON line.
CLIENT = textwrap.dedent("""
    import json, socket, sys
    proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if proto == "tcp":
            with socket.create_connection((host, port), timeout=3) as s:
                f = s.makefile("rb")
                reply = f.readline().decode().split()
                s.sendall(b"ping\\n")
                echo = f.readline().decode().strip()
            print(json.dumps({"port": int(reply[0]), "orig": reply[1], "echo": echo}))
        else:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.connect((host, port))
                s.send(b"hello")
                print(json.dumps({"port": int(s.recv(2048))}))
    except (OSError, IndexError, ValueError) as exc:
        print(json.dumps({"error": repr(exc)}))
""")


def require_nft() -> None:
    if shutil.which("nft") is None:
        pytest.fail("these tests need the 'nft' command (apt-get install nftables)", pytrace=False)


def ensure_ipv6(lab: Lab) -> None:
    """Client link and node sink route for IPv6, unless the lab already has them."""
    have = lab.run("node", ["ip", "-6", "-o", "addr", "show", "dev", "vc0", "scope",
                            "global"]).stdout
    if NODE6 not in have:
        lab.run("node", ["ip", "addr", "add", f"{NODE6}/64", "dev", "vc0", "nodad"])
        lab.run("client", ["ip", "addr", "add", f"{CLIENT6}/64", "dev", "eth0", "nodad"])
    if not lab.run("client", ["ip", "-6", "route", "show", "default"]).stdout.strip():
        lab.run("client", ["ip", "-6", "route", "add", "default", "via", NODE6])
    if not lab.run("node", ["ip", "-6", "route", "show", "default"]).stdout.strip():
        lab.run("node", ["ip", "-6", "route", "add", "default", "dev", "svc0"])


def dummies(n: int, family: int) -> list[Redirect]:
    """``n`` other Services (never connected to), 10.100.0.0/16 or fd00:100::/64."""
    base = ipaddress.ip_address("10.100.0.1" if family == 4 else "fd00:100::1")
    return [Redirect(ServicePortName("bulk", f"svc{i}", "http", "TCP"), KIND_CLUSTER,
                     str(base + i), 80, "TCP", 40000 + i % 20000) for i in range(n)]


def real(tcp_port: int, family: int) -> list[Redirect]:
    svc = SVC6 if family == 6 else SVC4
    return [Redirect(WEB, KIND_CLUSTER, svc, 80, "TCP", tcp_port),
            Redirect(DNS, KIND_CLUSTER, svc, 53, "UDP", PROXY_UDP)]


def desired(tcp_port: int) -> list[Redirect]:
    return [*dummies(2000, 4), *dummies(2000, 6), *real(tcp_port, 4), *real(tcp_port, 6)]


def ask(lab: Lab, ns: str, proto: str, host: str, port: int) -> dict[str, object]:
    out = lab.run(ns, [sys.executable, "-c", CLIENT, proto, host, str(port)], timeout=15)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def orig(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_server(lab: Lab) -> None:
    proc = lab.spawn("node", [sys.executable, "-c", SERVER, f"tcp:{PROXY_TCP}",
                              f"tcp:{PROXY_TCP_MOVED}", f"udp:{PROXY_UDP}"], "proxy-stand-in")
    lab.wait_port("node", "::", PROXY_TCP, "tcp", proc=proc)
    lab.wait_port("node", "::", PROXY_TCP_MOVED, "tcp", proc=proc)
    lab.wait_port("node", "0.0.0.0", PROXY_UDP, "udp", proc=proc)
    lab.wait_port("node", "::", PROXY_UDP, "udp", proc=proc)


def node_tables(lab: Lab) -> str:
    return lab.run("node", ["nft", "list", "tables"]).stdout


async def apply_all(nft: Nftables, redirects: list[Redirect]) -> float:
    start = time.monotonic()
    await nft.restore(nftrules.render(redirects, family=4) + nftrules.render(redirects, family=6))
    return time.monotonic() - start


async def test_nft_probe_leaves_nothing_and_names_a_missing_binary(lab: Lab) -> None:
    require_nft()
    nft = Nftables(netns=lab.node)
    assert await nft.available() is None
    assert PROBE_TABLE not in node_tables(lab)
    assert node_tables(lab).strip() == ""
    reason = await Nftables(cmd="/nonexistent/nft").available()
    assert reason == "/nonexistent/nft not found (install the nftables package)"


@pytest.mark.parametrize("family", [4, 6])
async def test_nft_map_redirects_client_and_node_traffic_with_2000_services(
        lab: Lab, family: int) -> None:
    """Prerouting (client ns) and output (node itself), TCP and UDP, 4,004 elements loaded."""
    require_nft()
    ensure_ipv6(lab)
    start_server(lab)
    nft = Nftables(netns=lab.node)
    load = await apply_all(nft, desired(PROXY_TCP))
    assert load < 10, f"loading 4,004 elements took {load:.1f}s"
    listed = await nft.list()
    assert len(nftrules.parse_elements(listed)) == 2 * 2002
    svc = SVC6 if family == 6 else SVC4
    assert ("default/web:http cluster IP", svc, 80, "TCP", PROXY_TCP) in \
        nftrules.parse_elements(listed)

    for ns in ("client", "node"):
        tcp = ask(lab, ns, "tcp", svc, 80)
        assert tcp == {"port": PROXY_TCP, "orig": orig(svc, 80), "echo": "ping"}, ns
        assert ask(lab, ns, "udp", svc, 53) == {"port": PROXY_UDP}, ns
    # Not in the map: falls through untouched (to the node's sink, so nothing answers).
    miss = ask(lab, "client", "tcp", svc, 81)
    assert "error" in miss, miss


async def test_nft_replace_and_deltas_move_new_connections_and_keep_open_ones(lab: Lab) -> None:
    """Atomic replace with the Service on another proxy port, rules repaired, element deltas."""
    require_nft()
    start_server(lab)
    nft = Nftables(netns=lab.node)
    before = desired(PROXY_TCP)
    await apply_all(nft, before)
    assert ask(lab, "client", "tcp", SVC4, 80)["port"] == PROXY_TCP

    # An open connection, held across the replace.
    held = subprocess.Popen(
        ["ip", "netns", "exec", lab.resolve("client"), sys.executable, "-u", "-c",
         "import socket, sys\n"
         f"s = socket.create_connection(({SVC4!r}, 80), timeout=5); f = s.makefile('rb')\n"
         "print(f.readline().decode().strip(), flush=True)\n"
         "sys.stdin.readline(); s.sendall(b'still\\n'); print(f.readline().decode().strip())\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout is not None and held.stdin is not None
        assert held.stdout.readline().split()[0] == str(PROXY_TCP)

        after = desired(PROXY_TCP_MOVED)
        await apply_all(nft, after)
        assert ask(lab, "client", "tcp", SVC4, 80)["port"] == PROXY_TCP_MOVED
        assert ask(lab, "node", "tcp", SVC4, 80)["port"] == PROXY_TCP_MOVED

        held.stdin.write("go\n")
        held.stdin.flush()
        out, _ = held.communicate(timeout=10)
        assert out.strip() == "still"
    finally:
        if held.poll() is None:
            held.kill()
            held.wait()

    # Someone deletes uproxy's rules: the Service is no longer intercepted; the
    # next full render brings them back.
    lab.run("node", ["nft", "flush", "chain", "ip", "uproxy", "prerouting"])
    assert "error" in ask(lab, "client", "tcp", SVC4, 80)
    await apply_all(nft, after)
    assert ask(lab, "client", "tcp", SVC4, 80)["port"] == PROXY_TCP_MOVED

    # One sync's deltas: back to the first port, and the UDP Service removed.
    final = [r for r in before if r.name != DNS]
    delta = nftrules.render_changes(after, final, family=4)
    assert delta.count("\n") == 2
    await nft.restore(delta)
    assert ask(lab, "client", "tcp", SVC4, 80)["port"] == PROXY_TCP
    assert "error" in ask(lab, "client", "udp", SVC4, 53)
    assert sorted(nftrules.parse_elements(await nft.list())) == sorted(
        nftrules.parse_elements(nftrules.render(final, family=4)
                                + nftrules.render(after, family=6)))


async def test_nft_cleanup_removes_only_uproxy_tables(lab: Lab) -> None:
    require_nft()
    nft = Nftables(netns=lab.node)
    lab.run("node", ["nft", "add", "table", "ip", "someone_else"])
    await apply_all(nft, desired(PROXY_TCP))
    assert nftrules.uproxy_tables(node_tables(lab)) == [4, 6]
    assert await nft.cleanup() == 2
    tables = node_tables(lab)
    assert nftrules.uproxy_tables(tables) == []
    assert "table ip someone_else" in tables
    assert await nft.cleanup() == 0
    assert await nft.list() == ""


async def test_nft_restore_error_is_one_line_and_changes_nothing(lab: Lab) -> None:
    require_nft()
    nft = Nftables(netns=lab.node)
    await apply_all(nft, real(PROXY_TCP, 4))
    # Wrong idea of the map's content: the keys are present with other ports (and
    # one new key comes along). nft refuses the file as a whole.
    fresh = Redirect(WEB, KIND_CLUSTER, "10.0.0.11", 80, "TCP", PROXY_TCP)
    bad = nftrules.render_changes([], [*real(PROXY_TCP_MOVED, 4), fresh], family=4)
    with pytest.raises(NftablesError) as info:
        await nft.restore(bad)
    assert "\n" not in str(info.value)
    assert "File exists" in str(info.value)
    assert sorted(nftrules.parse_elements(await nft.list())) == sorted(
        nftrules.parse_elements(nftrules.render(real(PROXY_TCP, 4), family=4)))


async def test_nft_table_goes_before_iptables_nat_and_misses_fall_through(lab: Lab) -> None:
    """Priority ``dstnat - 1``: uproxy's map wins over an iptables(-nft) REDIRECT for the same
    Service; without uproxy's table (or for an address not in the map) the iptables rule acts."""
    require_nft()
    start_server(lab)
    nft = Nftables(netns=lab.node)
    for port in (80, 8080):
        lab.run("node", ["iptables", "-w", "5", "-t", "nat", "-A", "PREROUTING", "-d", SVC4,
                         "-p", "tcp", "--dport", str(port), "-j", "REDIRECT", "--to-ports",
                         str(PROXY_TCP_MOVED)])
    await apply_all(nft, real(PROXY_TCP, 4))
    assert ask(lab, "client", "tcp", SVC4, 80)["port"] == PROXY_TCP
    assert ask(lab, "client", "tcp", SVC4, 8080)["port"] == PROXY_TCP_MOVED
    assert await nft.cleanup() == 2  # ip and ip6 (empty map)
    assert ask(lab, "client", "tcp", SVC4, 80)["port"] == PROXY_TCP_MOVED


def test_an_nft_that_hangs_is_killed_at_its_timeout(tmp_path: Path) -> None:
    """The edge runs nft from a worker thread (subprocess, vfork): a hung nft still ends
    in one NftablesError line at the timeout, and the process is gone (killed, reaped)."""
    pid_file = tmp_path / "pid"
    fake = tmp_path / "nft"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 30\n")
    fake.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(NftablesError, match=r"took more than 0.3s \(killed\)"):
        asyncio.run(Nftables(cmd=str(fake), timeout=0.3).restore("table ip x\n"))
    assert time.monotonic() - started < 10
    pid = int(pid_file.read_text())
    assert not os.path.exists(f"/proc/{pid}"), "the hung nft still runs"
