"""The side-by-side run: one lab, every peer, every figure, a few rounds; medians.

Shape: one lab for the whole run (client -> node -> 2 pods) with the backends
started once; for each round, each peer in turn is started in the node
namespace, measured with the real load tools from the client namespace, and
stopped (its rules removed, conntrack flushed) before the next peer starts, so
peers never see each other's rules. Rounds interleave peers to spread the noise
of a shared machine over all of them. The idle-connections figure runs in the
first round only (memory is not noisy; 10,000 connections per peer per round
would double the run time). The scale figures (issue 6) come first, uproxy runs
of their own on a node the load tests have not touched yet. The IPv6 rows
(``conn6``, ``keepalive6``, ``dns6``; issue 13) repeat the conn, keep-alive and
DNS tests on the web/DNS Service's IPv6 ClusterIP for the peers that serve it
(:data:`bench.peers.IPV6_PEERS`).

Every external command has a timeout; the lab is torn down on any exit (the
``with`` block, plus SIGTERM via :func:`install_signal_teardown`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import parse, takeover
from bench.changes import churn_objects
from bench.changes import write as write_churn
from bench.parse import Figure
from bench.peers import (
    ALL_PEERS,
    BASELINE,
    BULK_PORT,
    C_SPLICE,
    C_SPLICE_CUBIC,
    C_TCP,
    C_UDP,
    DNS_PORT,
    HAPROXY,
    HTTP_PORT,
    KERNEL,
    LOCAL_PORTS,
    NATIVE,
    NATIVE_MASQ,
    NGINX,
    PYTHON,
    UPROXY_PEERS,
    VIP,
    VIP6,
    VIP_BULK,
    Backends,
    CTcpRelay,
    CUdpRelay,
    Haproxy,
    KernelDnat,
    MinimalSplice,
    NginxStream,
    Peer,
    Uproxy,
    build_baseline,
    clean_slate,
    flush_conntrack,
)
from uproxy.demo.lab import Lab, LabError, install_signal_teardown, terminate
from uproxy.demo.node import endpoint_slice, service

ROOT = Path(__file__).resolve().parent.parent
TESTS = ("bulk", "conn", "keepalive", "status", "dns", "conn6", "keepalive6", "dns6", "idle",
         "scale", "scale-api", "scale-conn")
IPV6_TESTS = ("conn6", "keepalive6", "dns6")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class Options:
    rounds: int = 3
    seconds: float = 5.0
    only: tuple[str, ...] = TESTS
    peers: tuple[str, ...] = ALL_PEERS
    baseline: str = ""  # the commit the peer "uproxy baseline" runs (``--baseline``)
    idle_count: int = 9000
    scale_services: int = 10000
    takeover_conns: int = 10000  # idle connections held through the takeover (if fds allow)
    scale_starts: int = 3  # daemon starts timed per source; the median is reported
    rest_seconds: float = 31.0  # one default --sync-period (its full resync) and a second
    changes: int = 40
    wrk_conns: int = 50
    conn_conns: int = 32
    log: Callable[[str], None] = print


@dataclass(slots=True)
class Results:
    figures: dict[str, Figure] = field(default_factory=dict)
    scale: dict[str, dict[str, Any]] = field(default_factory=dict)  # by source
    errors: list[str] = field(default_factory=list)
    extra: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def fig(self, key: str) -> Figure:
        return self.figures[key]


def new_results() -> Results:
    r = Results()
    for f in (
        Figure("bulk", "single-stream bulk", "Gbit/s"),
        Figure("cpu_gb", "proxy CPU per GB moved", "CPU s/GB", higher_is_better=False),
        Figure("machine_gb", "machine CPU per GB moved (both cores: load tools, pods, proxy, "
               "softirq)", "CPU s/GB", higher_is_better=False),
        Figure("machine_busy", "machine busy during bulk", "%"),
        Figure("cpu_conn", "proxy CPU per new connection", "us", higher_is_better=False),
        Figure("conn", "new connections (1 HTTP request each)", "conn/s"),
        Figure("ka", "keep-alive HTTP", "req/s"),
        Figure("ka_p50", "keep-alive p50 latency", "ms", higher_is_better=False),
        Figure("ka_p99", "keep-alive p99 latency", "ms", higher_is_better=False),
        Figure("conn_watch", "new connections, status stream open", "conn/s"),
        Figure("ka_watch", "keep-alive HTTP, status stream open", "req/s"),
        Figure("conn_nowatch", "new connections, the status test's run without the stream",
               "conn/s"),
        Figure("ka_nowatch", "keep-alive HTTP, the status test's run without the stream",
               "req/s"),
        Figure("dns", "DNS over UDP", "queries/s"),
        Figure("dns_lost", "DNS queries lost", "queries", higher_is_better=False),
        Figure("conn6", "IPv6: new connections (1 HTTP request each)", "conn/s"),
        Figure("ka6", "IPv6: keep-alive HTTP", "req/s"),
        Figure("ka6_p50", "IPv6: keep-alive p50 latency", "ms", higher_is_better=False),
        Figure("ka6_p99", "IPv6: keep-alive p99 latency", "ms", higher_is_better=False),
        Figure("dns6", "IPv6: DNS over UDP", "queries/s"),
        Figure("dns6_lost", "IPv6: DNS queries lost", "queries", higher_is_better=False),
        Figure("idle_rss", "RSS per idle connection", "KiB", higher_is_better=False),
        Figure("idle_fds", "fds per idle connection", "fds", higher_is_better=False),
        Figure("conn_scale", "new connections, the scale test's other Services present",
               "conn/s"),
        Figure("conn_scale_ratio", "new conn/s with the other Services / with one Service",
               "x"),
    ):
        r.figures[f.key] = f
    return r


# ------------------------------------------------------------------------- /proc probes
def cpu_seconds(pids: Sequence[int], *, children: bool = False) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += parse.parse_proc_stat_cpu(Path(f"/proc/{pid}/stat").read_text(), ticks=TICKS,
                                               children=children)
    return total


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += parse.parse_vmrss_kib(Path(f"/proc/{pid}/status").read_text())
    return total


def fd_count(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


# ---------------------------------------------------------------------------- the lab
def prepare_lab(lab: Lab) -> Backends:
    for ns in ("client", "node"):
        lab.run(ns, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])
        lab.run(ns, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
    # The proxies' own outgoing connections (to the pods) take ephemeral ports in the node
    # ns; keep them off the ports nginx/HAProxy listen on, or a peer started after a busy
    # one fails to bind while the earlier one's closed connections linger.
    # The daemon's status and health ports too: with the widened range a client socket
    # (the readiness poller's own, say) could get 10256 as its source port and then
    # connect to itself while nothing listens there yet.
    reserved = ",".join(str(p) for p in sorted({*LOCAL_PORTS.values(), *DAEMON_PORTS}))
    lab.run("node", ["sysctl", "-qw", f"net.ipv4.ip_local_reserved_ports={reserved}"])
    for i in (1, 2):
        lab.run(f"pod{i}", ["sysctl", "-qw", "net.core.somaxconn=8192"])
    # conntrack entries of closed connections would otherwise pile up over the run
    lab.run("node", ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1"],
            check=False)
    for i in (1, 2):
        lab.start_nginx(i, HTTP_PORT)
        lab.start_dnsmasq(i, {"bench.example": "1.2.3.4"}, port=DNS_PORT)
    iperf = lab.spawn("pod1", ["iperf3", "-s", "-p", str(BULK_PORT)], "iperf3-pod1")
    lab.wait_port("pod1", lab.pod_ip(1), BULK_PORT, "tcp", proc=iperf)
    (lab.workdir / "queries.txt").write_text("bench.example A\n" * 200)
    for i in (1, 2):  # nginx and dnsmasq listen on both families; fail early if not
        lab.wait_port(f"pod{i}", lab.pod_ip6(i), HTTP_PORT, "tcp", proc=None)
    pods6 = (lab.pod_ip6(1), lab.pod_ip6(2))
    return Backends(http=(lab.pod_ip(1), lab.pod_ip(2)), bulk=(lab.pod_ip(1),),
                    dns=(lab.pod_ip(1), lab.pod_ip(2)), http6=pods6, dns6=pods6)


def make_peer(name: str, lab: Lab, backends: Backends, baseline: Path | None = None) -> Peer:
    """``baseline``: the tree the peer "uproxy baseline" runs (:func:`build_baseline`)."""
    if name == BASELINE:
        if baseline is None:
            raise ValueError("the peer 'uproxy baseline' needs --baseline REV")
        return Uproxy(lab, backends, native=True, source=baseline)
    if name == KERNEL:
        return KernelDnat(lab, backends)
    if name == NATIVE:
        return Uproxy(lab, backends, native=True)
    if name == NATIVE_MASQ:
        return Uproxy(lab, backends, native=True, masquerade_all=True)
    if name == PYTHON:
        return Uproxy(lab, backends, native=False)
    if name == NGINX:
        return NginxStream(lab, backends)
    if name == HAPROXY:
        return Haproxy(lab, backends)
    if name == C_UDP:
        return CUdpRelay(lab, backends)
    if name == C_TCP:
        return CTcpRelay(lab, backends)
    if name == C_SPLICE:
        return MinimalSplice(lab, backends)
    if name == C_SPLICE_CUBIC:
        return MinimalSplice(lab, backends, congestion="cubic")
    raise ValueError(f"unknown peer {name!r}")


def url(vip: str) -> str:
    return f"http://[{vip}]:{HTTP_PORT}/" if ":" in vip else f"http://{vip}:{HTTP_PORT}/"


def check_path(lab: Lab, peer: Peer, vip: str = VIP) -> None:
    """One request through the peer before measuring it: fail with a clear line if broken."""
    seen = set()
    for _ in range(6):
        out = lab.run("client", ["curl", "-gsS", "-m", "3", url(vip)], check=False)
        if out.returncode != 0:
            raise LabError(f"{peer.name}: HTTP through {url(vip)} failed: "
                           f"{out.stderr.strip()}")
        seen.add(out.stdout.strip())
    if not seen <= {"pod1", "pod2"}:
        raise LabError(f"{peer.name}: unexpected answers {sorted(seen)}")


# ---------------------------------------------------------------------------- tests
def machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far (:func:`parse.parse_machine_cpu`)."""
    return parse.parse_machine_cpu(Path("/proc/stat").read_text(), ticks=TICKS)


def run_bulk(lab: Lab, peer: Peer, opts: Options, res: Results) -> None:
    """iperf3's single stream; besides the rate, the proxy's CPU per GB and the whole
    machine's (the load tools, the pods and the kernel's softirq work included: on this
    2-core box a relay's second TCP connection is paid for in that figure)."""
    pids = peer.pids()
    cpu0 = cpu_seconds(pids)
    busy0, all0 = machine_cpu()
    out = lab.run("client", ["iperf3", "-c", VIP_BULK, "-p", str(BULK_PORT),
                             "-t", f"{opts.seconds:g}", "-J"],
                  timeout=opts.seconds + 20, check=False)
    busy1, all1 = machine_cpu()
    cpu1 = cpu_seconds(pids)
    result = parse.parse_iperf3(out.stdout)
    res.fig("bulk").add(peer.name, result.bits_per_second / 1e9)
    line = f"    bulk: {result.bits_per_second / 1e9:.2f} Gbit/s"
    gb = result.bytes / 1e9
    if pids and gb:
        per_gb = (cpu1 - cpu0) / gb
        res.fig("cpu_gb").add(peer.name, per_gb)
        line += f", {per_gb:.3f} CPU s/GB"
    if gb and all1 > all0:
        machine_gb, busy = (busy1 - busy0) / gb, 100 * (busy1 - busy0) / (all1 - all0)
        res.fig("machine_gb").add(peer.name, machine_gb)
        res.fig("machine_busy").add(peer.name, busy)
        line += f", machine {machine_gb:.3f} CPU s/GB, {busy:.0f}% busy"
    opts.log(line)


def _wrk(lab: Lab, opts: Options, args: list[str], vip: str = VIP) -> parse.WrkResult:
    out = lab.run("client", ["wrk", "-t", "2", "-d", f"{opts.seconds:g}s", "--timeout", "2s",
                             *args, url(vip)],
                  timeout=opts.seconds + 20, check=False)
    return parse.parse_wrk(out.stdout)


def run_conn(lab: Lab, peer: Peer, opts: Options, res: Results, six: bool = False) -> None:
    pids = peer.pids()
    cpu0 = cpu_seconds(pids)
    r = _wrk(lab, opts, ["-c", str(opts.conn_conns), "-H", "Connection: close"],
             VIP6 if six else VIP)
    cpu1 = cpu_seconds(pids)
    key = "conn6" if six else "conn"
    res.fig(key).add(peer.name, r.requests_per_sec)
    res.extra.setdefault(f"{key}_errors", {}).setdefault(peer.name, []).append(r.errors)
    per_conn = ""
    if pids and r.requests and not six:
        res.fig("cpu_conn").add(peer.name, (cpu1 - cpu0) / r.requests * 1e6)
        per_conn = f", {(cpu1 - cpu0) / r.requests * 1e6:.0f} us proxy CPU each"
    opts.log(f"    {key}: {r.requests_per_sec:,.0f}/s ({r.errors} socket errors{per_conn})")


def run_keepalive(lab: Lab, peer: Peer, opts: Options, res: Results, six: bool = False) -> None:
    r = _wrk(lab, opts, ["-c", str(opts.wrk_conns), "--latency"], VIP6 if six else VIP)
    key = "ka6" if six else "ka"
    res.fig(key).add(peer.name, r.requests_per_sec)
    res.fig(f"{key}_p50").add(peer.name, None if r.p50 is None else r.p50 * 1000)
    res.fig(f"{key}_p99").add(peer.name, None if r.p99 is None else r.p99 * 1000)
    opts.log(f"    keep-alive{'6' if six else ''}: {r.requests_per_sec:,.0f} req/s, "
             f"p50 {fmt_ms(r.p50)}, "
             f"p99 {fmt_ms(r.p99)} ({r.errors} socket errors)")


# What an open status page polls besides the stream: the charts, bars and events every 2 s,
# the tables every 5 s (uproxy/status/static/app.js).
PAGE_POLLS = ("i=0; while :; do for p in 'series?only=total' 'endpoints?sort=traffic&limit=10' "
              "'events?limit=200&since=0'; do curl -s -o /dev/null "
              "\"http://127.0.0.1:10249/api/v1/$p\"; done; "
              "if [ $((i % 5)) = 0 ]; then for p in info 'services?limit=50' "
              "'endpoints?limit=50' rules; do curl -s -o /dev/null "
              "\"http://127.0.0.1:10249/api/v1/$p\"; done; fi; i=$((i + 2)); sleep 2; done")


def run_status(lab: Lab, peer: Peer, opts: Options, res: Results) -> None:
    """Issue 7: the data path with the status page's live stream open (uproxy only).

    One ``curl -N`` on /api/v1/connections/watch and the page's polls (:data:`PAGE_POLLS`)
    are what an open page costs: it gets its rows, batched events and periodic snapshots
    over that stream, and its charts, bars, event log and tables by polling.

    Paired: the same two tests without the page, right before or right after the ones with
    it (the order alternates by round), so the pair shares the node's state (the earlier
    tests' TIME_WAIT sockets and conntrack entries) and the host's moment; the loss is the
    median of the per-round ratios. Against the round's ``conn``/``ka`` figures, which run
    earlier in the round after other tests, the comparison also held whatever running
    later in the round changes.
    """
    if peer.name not in UPROXY_PEERS:
        return
    nth = len(res.fig("conn_watch").samples.get(peer.name, []))
    for streaming in (False, True) if nth % 2 == 0 else (True, False):
        c, k = _status_pair(lab, opts, streaming)
        res.fig("conn_watch" if streaming else "conn_nowatch").add(peer.name,
                                                                   c.requests_per_sec)
        res.fig("ka_watch" if streaming else "ka_nowatch").add(peer.name, k.requests_per_sec)
        opts.log(f"    {'with' if streaming else 'without'} the status stream open: "
                 f"{c.requests_per_sec:,.0f} conn/s, {k.requests_per_sec:,.0f} keep-alive req/s")


def _status_pair(lab: Lab, opts: Options,
                 streaming: bool) -> tuple[parse.WrkResult, parse.WrkResult]:
    """The new-connections and keep-alive tests, with the page open if ``streaming``."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if streaming:
            procs.append(lab.spawn("node", ["curl", "-sN", "-o", "/dev/null",
                                            "http://127.0.0.1:10249/api/v1/connections/watch"],
                                   "watch"))
            procs.append(lab.spawn("node", ["sh", "-c", PAGE_POLLS], "page-polls"))
            time.sleep(0.3)
            if procs[0].poll() is not None:
                raise LabError("the status stream did not stay open")
        c = _wrk(lab, opts, ["-c", str(opts.conn_conns), "-H", "Connection: close"])
        k = _wrk(lab, opts, ["-c", str(opts.wrk_conns), "--latency"])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(5)
    return c, k


def fmt_ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.2f} ms"


def run_dns(lab: Lab, peer: Peer, opts: Options, res: Results, six: bool = False) -> None:
    if not peer.udp:
        return
    out = lab.run("client", ["dnsperf", "-s", VIP6 if six else VIP, "-p", str(DNS_PORT), "-d",
                             str(lab.workdir / "queries.txt"), "-l", f"{opts.seconds:g}",
                             "-c", "1", "-q", "100", "-t", "2"],
                  timeout=opts.seconds + 20, check=False)
    r = parse.parse_dnsperf(out.stdout)
    key = "dns6" if six else "dns"
    res.fig(key).add(peer.name, r.qps)
    res.fig(f"{key}_lost").add(peer.name, r.lost)
    opts.log(f"    {key}: {r.qps:,.0f} q/s, {r.lost} lost of {r.sent}")


def run_idle(lab: Lab, peer: Peer, opts: Options, res: Results) -> None:
    pids = peer.pids()
    if not pids:
        return
    time.sleep(0.5)
    rss0, fds0 = rss_kib(pids), fd_count(pids)
    name = f"hold-{secrets.token_hex(2)}"
    proc = lab.spawn("client", [sys.executable, "-m", "bench.hold", VIP, str(HTTP_PORT),
                                "--count", str(opts.idle_count), "--hold", "90",
                                "--max-time", "40"], name, env={"PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while not lab.log(name).strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"{peer.name}: the idle-connection client gave up: "
                               f"{lab.log(name)[-500:]}")
            time.sleep(0.2)
        held = json.loads(lab.log(name).strip().splitlines()[-1])
        opened = int(held["open"])
        time.sleep(1.5)  # let the proxy finish its upstream connects
        pids = peer.pids()
        rss1, fds1 = rss_kib(pids), fd_count(pids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)
    if opened == 0:
        res.errors.append(f"{peer.name}: no idle connection opened ({held})")
        return
    res.fig("idle_rss").add(peer.name, (rss1 - rss0) / opened)
    res.fig("idle_fds").add(peer.name, (fds1 - fds0) / opened)
    res.extra.setdefault("idle_open", {}).setdefault(peer.name, []).append(opened)
    opts.log(f"    idle: {opened} held ({held['failed']} failed): RSS {rss0}->{rss1} KiB "
             f"({(rss1 - rss0) / opened:.2f} KiB/conn), fds {fds0}->{fds1} "
             f"({(fds1 - fds0) / opened:.2f}/conn)")
    time.sleep(1.0)  # closes propagate before the next test


def run_conn6(lab: Lab, peer: Peer, opts: Options, res: Results) -> None:
    run_conn(lab, peer, opts, res, six=True)


def run_keepalive6(lab: Lab, peer: Peer, opts: Options, res: Results) -> None:
    run_keepalive(lab, peer, opts, res, six=True)


def run_dns6(lab: Lab, peer: Peer, opts: Options, res: Results) -> None:
    run_dns(lab, peer, opts, res, six=True)


TEST_FUNCS = {"bulk": run_bulk, "conn": run_conn, "keepalive": run_keepalive,
              "status": run_status, "dns": run_dns, "conn6": run_conn6,
              "keepalive6": run_keepalive6, "dns6": run_dns6}
# Each IPv6 test right after its IPv4 twin: issue 13's row compares their ratios, and
# uproxy's status pairs and DNS between them took ~40 s (its IPv6 conn/s came out at 0.84x
# its IPv4 ratio in two runs, 0.89-1.0x alternated in one start).
DATA_TESTS = ("bulk", "conn", "conn6", "keepalive", "keepalive6", "status", "dns", "dns6")


def applies(test: str, peer: Peer) -> bool:
    """Whether ``test`` runs on ``peer``: TCP tests on TCP peers, DNS on UDP ones, and the
    IPv6 tests only on the peers with an IPv6 path."""
    if test in IPV6_TESTS and not peer.ipv6:
        return False
    if peer.bulk_only:
        return test == "bulk"
    return peer.udp if test.startswith("dns") else peer.tcp


def run_peer(lab: Lab, peer: Peer, opts: Options, res: Results, *, first_round: bool) -> None:
    clean_slate(lab)
    peer.start()
    try:
        if peer.tcp and not peer.bulk_only:
            check_path(lab, peer)
        if peer.tcp and peer.ipv6 and any(t in opts.only for t in IPV6_TESTS):
            check_path(lab, peer, VIP6)
        for test in DATA_TESTS:
            if test in opts.only and applies(test, peer):
                try:
                    TEST_FUNCS[test](lab, peer, opts, res)
                except (LabError, parse.ParseError) as exc:
                    res.errors.append(f"{peer.name} {test}: {exc}")
                    opts.log(f"    {test}: FAILED: {exc}")
        if first_round and "idle" in opts.only and peer.tcp and not peer.bulk_only:
            try:
                run_idle(lab, peer, opts, res)
            except (LabError, ValueError, KeyError) as exc:
                res.errors.append(f"{peer.name} idle: {exc}")
                opts.log(f"    idle: FAILED: {exc}")
    finally:
        peer.stop()


# ---------------------------------------------------------------------------- scale
def scale_objects(n: int, endpoints: Sequence[str]) -> list[dict[str, Any]]:
    """``n`` Services (ClusterIPs in 10.1.0.0/16, port 80) with one 2-endpoint slice each."""
    items: list[dict[str, Any]] = []
    for i in range(n):
        ip = f"10.1.{i // 250}.{i % 250 + 1}"
        name = f"svc-{i}"
        items.append(service(name, ip, [{"name": "http", "port": 80, "targetPort": 80}],
                             namespace="scale"))
        items.append(endpoint_slice(name, endpoints,
                                    [{"name": "http", "port": 80, "protocol": "TCP"}],
                                    namespace="scale"))
    return items


def write_list(path: Path, items: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def metrics_text(lab: Lab) -> str:
    out = lab.run("node", ["curl", "-sf", "-m", "5", "http://127.0.0.1:10249/metrics"],
                  check=False)
    return out.stdout


DAEMON_PORTS = (10249, 10256)  # status, health (kube-proxy's)
DAEMON_FLAGS = ("--loop", "uvloop", "--hostname-override", "node",
                "--status-address", f"127.0.0.1:{DAEMON_PORTS[0]}",
                "--healthz-address", f"127.0.0.1:{DAEMON_PORTS[1]}",
                "--proxy-port-range", "20000-39999")
CHURN_VIP = "10.0.0.20"


READY_URL = f"http://127.0.0.1:{DAEMON_PORTS[1]}/readyz"
# Polls /readyz from inside the node namespace: one process started before the daemon,
# a cheap connect every 10 ms, instead of an `ip netns exec ... curl` process pair per
# poll, which took a good part of a core from the daemon it was timing. Prints the
# CLOCK_MONOTONIC time of the first 200 (the same clock as the harness's).
READY_POLLER = """\
import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
print("polling", flush=True)
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            if reply.status == 200:
                print(f"ready {time.monotonic():.6f}", flush=True)
                sys.exit(0)
    except Exception:  # refused until the server is up, then HTTPError 503 until ready
        pass
    time.sleep(0.01)
sys.exit(1)
"""


def _start_ready_poller(lab: Lab, log_name: str, timeout: float) -> subprocess.Popen[bytes]:
    poller = lab.spawn("node", [sys.executable, "-c", READY_POLLER, READY_URL, f"{timeout:g}"],
                       log_name)
    deadline = time.monotonic() + 30
    while "polling" not in lab.log(log_name):
        if poller.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"the readiness poller did not start: {lab.log(log_name)[-500:]}")
        time.sleep(0.01)
    return poller


def _wait_ready(lab: Lab, proc: subprocess.Popen[bytes], log_name: str,
                poller: subprocess.Popen[bytes], poller_log: str, timeout: float) -> float:
    """The monotonic time the poller first saw /readyz answer 200."""
    deadline = time.monotonic() + timeout + 5
    while poller.poll() is None:
        if proc.poll() is not None:
            raise LabError(f"uproxy exited with {proc.returncode}: {lab.log(log_name)[-1500:]}")
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for line in lab.log(poller_log).splitlines():
        if line.startswith("ready "):
            return float(line.split()[1])
    raise LabError(f"uproxy not ready after {timeout:g}s: {lab.log(log_name)[-1500:]}; the "
                   f"readiness poller said: {lab.log(poller_log)[-800:]}")


def _start_api_server(lab: Lab,
                      objects_file: Path) -> tuple[Path, Path, subprocess.Popen[bytes]]:
    """The fake API server (tests/k8s/apiserver.py) in the node ns, loaded with the objects."""
    kubeconfig = lab.workdir / "scale-kubeconfig"
    control = lab.workdir / "scale-control.sock"
    proc = lab.spawn("node", [sys.executable, "-m", "tests.k8s.apiserver", "--kubeconfig",
                              str(kubeconfig), "--load", str(objects_file), "--control",
                              str(control), "--history-size", "100000"],
                     "apiserver", env={"PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 180
    while not kubeconfig.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"the fake API server did not come up: {lab.log('apiserver')[-1500:]}")
        time.sleep(0.1)
    return kubeconfig, control, proc


def _daemon_argv(lab: Lab, src_flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "uproxy", "run", *src_flags, *DAEMON_FLAGS,
            "--state-dir", str(lab.workdir / "uproxy-state")]


def _start_daemon(lab: Lab, src_flags: list[str],
                  log_name: str) -> tuple[subprocess.Popen[bytes], float]:
    """A fresh uproxy (native) in the node ns; returns it and its seconds to /readyz."""
    poller = _start_ready_poller(lab, f"{log_name}-ready", 180)
    t0 = time.monotonic()
    proc = lab.spawn("node", _daemon_argv(lab, src_flags), log_name)
    try:
        return proc, _wait_ready(lab, proc, log_name, poller, f"{log_name}-ready", 180) - t0
    except BaseException:
        terminate(proc, 60)
        raise


def run_scale(lab: Lab, opts: Options, res: Results, source: str) -> None:
    """Issue 6 figures for one source (``files`` or ``api``) of a fresh uproxy (native)."""
    n = opts.scale_services
    s: dict[str, Any] = {"services": n}
    res.scale[source] = s
    clean_slate(lab)  # (the files source's takeover leaves the API source's start its sockets)
    pods = (lab.pod_ip(1), lab.pod_ip(2))
    items = scale_objects(n, pods)
    d = lab.workdir / f"scale-{source}"
    d.mkdir()
    log_name = f"uproxy-scale-{source}"
    change_args: list[str]
    server: subprocess.Popen[bytes] | None = None
    if source == "files":
        write_list(d / "scale.json", items)
        churn = d / "churn.yaml"
        write_churn(churn, CHURN_VIP, HTTP_PORT, lab.pod_ip(1), stamp=False)
        src_flags = ["--manifests", str(d)]
        change_args = [str(churn)]
    else:
        objects = lab.workdir / "scale-api-objects.json"
        write_list(objects, items + churn_objects(CHURN_VIP, HTTP_PORT, lab.pod_ip(1),
                                                  stamp=False))
        kubeconfig, control, server = _start_api_server(lab, objects)
        src_flags = ["--kubeconfig", str(kubeconfig)]
        change_args = ["-", "--control", str(control)]
    try:
        _scale_measure(lab, opts, s, source, src_flags, change_args, log_name)
    finally:
        if server is not None:  # the data tests that follow share the node's CPUs
            terminate(server, 10)


def _scale_measure(lab: Lab, opts: Options, s: dict[str, Any], source: str,
                   src_flags: list[str], change_args: list[str], log_name: str) -> None:
    n = opts.scale_services
    readies: list[float] = []
    for i in range(1, opts.scale_starts):  # earlier starts: timed, then stopped
        proc, ready = _start_daemon(lab, src_flags, f"{log_name}-{i}")
        terminate(proc, 60)
        readies.append(ready)
    proc, ready = _start_daemon(lab, src_flags, log_name)
    readies.append(ready)
    try:
        s["ready_s"] = parse.median(readies)
        s["ready_all"] = readies
        pid = proc.pid
        rules = lab.run("node", ["iptables-save", "-t", "nat"], timeout=30).stdout
        rules += lab.run("node", ["nft", "list", "table", "ip", "uproxy"], timeout=30,
                         check=False).stdout  # (the default nftables interception)
        s["rules"] = sum(1 for line in rules.splitlines() if '"scale/svc-' in line)
        ss = lab.run("node", ["ss", "-Hltnp"], timeout=30).stdout
        s["listeners"] = sum(1 for line in ss.splitlines() if f"pid={pid}," in line)
        for line in lab.log(log_name).splitlines():
            if "synced" in line and "service ports" in line:
                s["first_sync_log"] = line.split("synced", 1)[1].strip()
                break
        opts.log(f"  scale ({source}): {n} services ready in {s['ready_s']:.2f} s "
                 f"(median of {', '.join(f'{r:.2f}' for r in readies)}) "
                 f"({s['rules']} rules, {s['listeners']} listening sockets; "
                 f"daemon: {s.get('first_sync_log', '?')})")
        time.sleep(2.0)
        s["rss_mib"] = rss_kib([pid]) / 1024
        c0 = cpu_seconds([pid], children=True)
        time.sleep(opts.rest_seconds)
        s["cpu_rest_pct"] = (cpu_seconds([pid], children=True) - c0) / opts.rest_seconds * 100
        s["rest_seconds"] = opts.rest_seconds
        opts.log(f"  scale ({source}): RSS at rest {s['rss_mib']:.1f} MiB, CPU at rest "
                 f"{s['cpu_rest_pct']:.1f}% over {opts.rest_seconds:g} s")
        out = lab.run("client", ["env", f"PYTHONPATH={ROOT}", sys.executable, "-m",
                                 "bench.changes", *change_args[:1], CHURN_VIP, str(HTTP_PORT),
                                 *change_args[1:],
                                 "--pods", f"{lab.pod_ip(1)}=pod1,{lab.pod_ip(2)}=pod2",
                                 "--count", str(opts.changes), "--gap", "0.2"],
                      timeout=opts.changes * 6 + 30, check=False)
        lines = out.stdout.strip().splitlines()
        if not lines:
            raise LabError(f"bench.changes printed nothing: {out.stderr.strip()[-800:]}")
        doc = json.loads(lines[-1])
        lat = [float(v) for v in doc["latencies"]]
        s["change_timeouts"] = int(doc["timeouts"])
        s["change_count"] = len(lat)
        s["change_p50_ms"] = (parse.percentile(lat, 0.5) or 0) * 1000 if lat else None
        s["change_p99_ms"] = (parse.percentile(lat, 0.99) or 0) * 1000 if lat else None
        text = metrics_text(lab)
        for key, name in (("sync", "kubeproxy_sync_proxy_rules_duration_seconds"),
                          ("prog", "kubeproxy_network_programming_duration_seconds")):
            buckets = parse.parse_histogram(text, name)
            s[f"{key}_p50_le"] = parse.histogram_quantile(buckets, 0.5)
            s[f"{key}_p99_le"] = parse.histogram_quantile(buckets, 0.99)
            s[f"{key}_count"] = buckets[-1][1] if buckets else 0
        opts.log(f"  scale ({source}): endpoint change -> applied (client view) p50 "
                 f"{parse.fmt_num(s['change_p50_ms'])} ms, p99 "
                 f"{parse.fmt_num(s['change_p99_ms'])} ms over {len(lat)} changes "
                 f"({s['change_timeouts']} timeouts); /metrics: sync p99 <= "
                 f"{s['sync_p99_le']} s, network programming p99 <= {s['prog_p99_le']} s")
        if source == "files":  # issue 15: an upgrade of this daemon, under load
            count = takeover.connections_that_fit(n, opts.takeover_conns)
            if count < opts.takeover_conns:
                opts.log(f"  takeover: {count} connections, not {opts.takeover_conns}: each "
                         f"process holds {n} listeners + 2 fds per connection within the hard "
                         f"open-files limit ({takeover.nofile_hard()}, no CAP_SYS_RESOURCE "
                         f"to raise it)")
            proc = takeover.measure(lab, s, root=ROOT, vip=CHURN_VIP, port=HTTP_PORT,
                                    count=count,
                                    argv=_daemon_argv(lab, src_flags), old=proc,
                                    old_log=log_name, log=opts.log)
    finally:
        terminate(proc, 60)


# ------------------------------------------------------------------ scale-conn (issue 16)
SCALE_CONN_PEERS = (KERNEL, NATIVE)


def run_scale_conn(lab: Lab, opts: Options, res: Results, backends: Backends) -> None:
    """New conn/s through one Service alone, then with ``scale_services`` others present.

    Kernel DNAT gets the others as kube-proxy's iptables mode writes them, ahead of the
    measured Service in ``KUBE-SERVICES`` (its linear walk), loaded once for all rounds
    (iptables-nft takes minutes to restore them): every round alone first, then every
    round with the others. uproxy (its default interception, the nftables map) gets them
    as one more manifest, both counts in the same start of the daemon, each round.
    """
    n = opts.scale_services
    others = [(f"scale/svc-{i}:http", f"10.1.{i // 250}.{i % 250 + 1}", HTTP_PORT, "tcp",
               backends.http) for i in range(n)]
    conns = ["-c", str(opts.conn_conns), "-H", "Connection: close"]
    if KERNEL in SCALE_CONN_PEERS and KERNEL in opts.peers:
        _scale_conn_kernel(lab, opts, res, backends, others, conns)
    if NATIVE not in SCALE_CONN_PEERS or NATIVE not in opts.peers:
        return
    for rnd in range(1, opts.rounds + 1):
        opts.log(f"  scale-conn round {rnd}/{opts.rounds}: {NATIVE}")
        peer = Uproxy(lab, backends, native=True, args=("--proxy-port-range", "20000-39999"))
        try:
            clean_slate(lab)
            peer.start()
            check_path(lab, peer)
            before = _wrk(lab, opts, conns).requests_per_sec
            scale_file = peer.node.manifests / "scale.json"
            write_list(scale_file, scale_objects(n, backends.http))
            peer.node.wait_rules(lambda t: t.count('"scale/svc-') >= n, timeout=120)
            check_path(lab, peer)
            with_others = _wrk(lab, opts, conns).requests_per_sec
            # ... and alone again: the reference is the mean of the runs on either side,
            # so a steady drift of the host over the three runs cancels
            scale_file.unlink()
            peer.node.wait_rules(lambda t: '"scale/svc-' not in t, timeout=120)
            check_path(lab, peer)
            after = _wrk(lab, opts, conns).requests_per_sec
            opts.log(f"    {NATIVE} alone: {before:,.0f} conn/s before the others, "
                     f"{after:,.0f} after they were removed")
            one = (before + after) / 2
        except (LabError, parse.ParseError) as exc:
            res.errors.append(f"scale-conn {NATIVE}: {exc}")
            opts.log(f"    FAILED: {str(exc)[:2000]}")
            continue
        finally:
            peer.stop()
            (peer.node.manifests / "scale.json").unlink(missing_ok=True)
        _scale_conn_row(opts, res, NATIVE, one, with_others, n,
                        f" ({peer.node.interception})")


def _scale_conn_kernel(lab: Lab, opts: Options, res: Results, backends: Backends,
                       others: list[tuple[str, str, int, str, tuple[str, ...]]],
                       conns: list[str]) -> None:
    alone: list[float] = []
    with_others: list[float] = []
    for count, into in ((0, alone), (len(others), with_others)):
        peer = KernelDnat(lab, backends, others=others[:count], restore_timeout=900.0)
        started = time.monotonic()
        try:
            clean_slate(lab)
            peer.start()
            if count:
                opts.log(f"  scale-conn: {KERNEL} loaded {count} other Services in "
                         f"{time.monotonic() - started:.1f} s")
            check_path(lab, peer)
            for rnd in range(1, opts.rounds + 1):
                opts.log(f"  scale-conn round {rnd}/{opts.rounds}: {KERNEL}"
                         f"{' with the others' if count else ' alone'}")
                flush_conntrack(lab)
                into.append(_wrk(lab, opts, conns).requests_per_sec)
        except (LabError, parse.ParseError) as exc:
            res.errors.append(f"scale-conn {KERNEL}: {exc}")
            opts.log(f"    FAILED: {str(exc)[:2000]}")
            return
        finally:
            peer.stop()
    for one, many in zip(alone, with_others, strict=False):
        _scale_conn_row(opts, res, KERNEL, one, many, len(others), "")


def _scale_conn_row(opts: Options, res: Results, name: str, one: float, with_others: float,
                    n: int, how: str) -> None:
    res.fig("conn_scale").add(name, with_others)
    res.fig("conn_scale_ratio").add(name, with_others / one if one else None)
    opts.log(f"    {name}: {one:,.0f} conn/s alone, {with_others:,.0f} conn/s with {n} other "
             f"Services{how}: {with_others / one if one else 0:.2f}x")


# ---------------------------------------------------------------------------- driver
def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard one (inherited by every lab process); returns it.

    Raising the hard limit needs CAP_SYS_RESOURCE, which this environment may lack.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def machine() -> dict[str, str]:
    def sh(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = os.environ.get("BENCH_COMMIT") or sh("git", "-C", str(ROOT), "describe", "--always",
                                                   "--dirty", "--abbrev=10")
    return {"commit": commit or "?", "nproc": sh("nproc"), "kernel": sh("uname", "-r"), "cpu": cpu,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "python": sys.version.split()[0],
            "nginx": sh("nginx", "-v") or subprocess.run(
                ["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
            "haproxy": sh("haproxy", "-v").splitlines()[0] if sh("haproxy", "-v") else "?",
            "iperf3": sh("iperf3", "--version").splitlines()[0] if sh("iperf3", "--version")
            else "?",
            "dnsperf": "dnsperf " + dnsperf_version()}


def dnsperf_version() -> str:
    try:
        out = subprocess.run(["dnsperf", "-h"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(r"Version ([0-9.]+)", out.stdout + out.stderr)
    return m.group(1) if m else "?"


def byte_compile() -> None:
    """Byte-compile uproxy once, as an installed package or a container image has it: a
    tree without ``__pycache__`` (``PYTHONDONTWRITEBYTECODE`` set) would make every timed
    start compile ~70 modules again (0.2 s of each start here)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "uproxy"),
                    str(ROOT / "bench")], check=False, capture_output=True, timeout=300)


def run(opts: Options) -> Results:
    raise_nofile()
    byte_compile()
    res = new_results()
    with Lab.create(pods=2, name_hint="bench") as lab:
        undo = install_signal_teardown(lab)
        try:
            backends = prepare_lab(lab)
            # Scale first, on a quiet node: after the data tests the node ns holds tens
            # of thousands of TIME_WAIT sockets (many in the proxy port range) and the
            # load's leftovers; in one full run the start took 2.16 s against 1.39 s for
            # the same code on a fresh lab (the cause not pinned down; right after one
            # round of conn tests it was 1.47 s).
            for source in ("files", "api"):
                if ("scale" if source == "files" else "scale-api") not in opts.only:
                    continue
                opts.log(f"scale (issue 6): uproxy native, {source} source")
                try:
                    run_scale(lab, opts, res, source)
                except (LabError, ValueError, KeyError) as exc:
                    res.errors.append(f"scale ({source}): {exc}")
                    opts.log(f"  scale ({source}): FAILED: {str(exc)[:2000]}")
            if "scale-conn" in opts.only:
                opts.log("scale-conn (issue 16): new conn/s with other Services present")
                run_scale_conn(lab, opts, res, backends)
            data_tests = [t for t in opts.only if not t.startswith("scale")]
            tree = None
            if data_tests and BASELINE in opts.peers:
                opts.log(f"baseline: uproxy at {opts.baseline[:12]}")
                try:
                    tree = build_baseline(opts.baseline, lab.workdir)
                except LabError as exc:
                    res.errors.append(f"{BASELINE}: {exc}")
                    opts.log(f"  FAILED: {exc}")
            if data_tests:
                for rnd in range(1, opts.rounds + 1):
                    opts.log(f"round {rnd}/{opts.rounds}")
                    for name in opts.peers:
                        if name == BASELINE and tree is None:
                            continue
                        opts.log(f"  {name}")
                        peer = make_peer(name, lab, backends, tree)
                        try:
                            run_peer(lab, peer, opts, res, first_round=rnd == 1)
                        except LabError as exc:
                            res.errors.append(f"{name}: {exc}")
                            opts.log(f"    FAILED: {str(exc)[:2000]}")
        finally:
            undo()
    return res

