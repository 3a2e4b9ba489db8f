"""DNS through the UDP proxy, side by side with kernel DNAT, in the namespace lab.

    .venv/bin/python native/bench_udp.py [--rounds N] [--seconds S] [--peers a,b,...]
        [--clients C] [--outstanding Q]

Peers: ``kernel`` (iptables DNAT + statistic random, as kube-proxy writes it),
``native`` and ``python`` (the real daemon, ``uproxy run``, in the node namespace,
uvloop; ``python`` sets UPROXY_NO_NATIVE=1), ``reference`` (``udp_reference.c``: the
same design and batching code in a bare C loop, behind a REDIRECT rule) and
``reference-c`` (the same with a connected socket per client, ``-c``). One lab for the
whole run: client -> node -> two dnsmasq pods; dnsperf runs in the client namespace
against the ClusterIP for S seconds per peer per round, peers interleaved per round (the
box is shared: interleaving spreads its noise). Printed per run: queries/s, lost
queries, and for uproxy its CPU microseconds per query (user + system of the daemon's
process, from /proc). All traffic stays inside the lab; the lab is torn down on any
exit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import parse  # noqa: E402
from bench.peers import build_udp_reference, kube_proxy_rules  # noqa: E402
from uproxy.demo.lab import Lab, install_signal_teardown  # noqa: E402
from uproxy.demo.node import NodeProxy, endpoint_slice, service  # noqa: E402

VIP, PORT = "10.0.0.10", 53
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def dnsperf(lab: Lab, seconds: float, clients: int, outstanding: int) -> parse.DnsperfResult:
    out = lab.run("client", ["dnsperf", "-s", VIP, "-p", str(PORT), "-d",
                             str(lab.workdir / "queries.txt"), "-l", f"{seconds:g}",
                             "-c", str(clients), "-q", str(outstanding), "-t", "2"],
                  timeout=seconds + 20, check=False)
    return parse.parse_dnsperf(out.stdout)


def kernel(lab: Lab, backends: list[str], seconds: float, clients: int,
           outstanding: int) -> tuple[parse.DnsperfResult, float | None]:
    text = kube_proxy_rules([("bench/dns:dns", VIP, PORT, "udp", tuple(backends))])
    lab.run("node", ["iptables-restore", "--noflush"], input=text, timeout=30)
    try:
        return dnsperf(lab, seconds, clients, outstanding), None
    finally:
        chains = [line[1:].split()[0] for line in text.splitlines() if line.startswith(":")]
        hook = ["-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]
        for h in ("PREROUTING", "OUTPUT"):
            lab.run("node", ["iptables", "-t", "nat", "-D", h, *hook], check=False)
        for flag in ("-F", "-X"):
            for chain in chains:
                lab.run("node", ["iptables", "-t", "nat", flag, chain], check=False)
        lab.run("node", ["conntrack", "-F"], check=False)


def uproxy(lab: Lab, backends: list[str], seconds: float, clients: int, outstanding: int, *,
           native: bool) -> tuple[parse.DnsperfResult, float | None]:
    node = NodeProxy(lab, loop="uvloop", native=native,
                     name="uproxy-native" if native else "uproxy-python")
    node.write("dns.yaml",
               service("dns", VIP, [{"name": "dns", "port": PORT, "protocol": "UDP",
                                     "targetPort": PORT}], namespace="bench"),
               endpoint_slice("dns", backends, [{"name": "dns", "port": PORT,
                                                 "protocol": "UDP"}], namespace="bench"))
    node.start(wait_for="bench/dns:dns cluster IP", timeout=30)
    try:
        assert node.proc is not None
        cpu0 = cpu_seconds(node.proc.pid)
        result = dnsperf(lab, seconds, clients, outstanding)
        cpu1 = cpu_seconds(node.proc.pid)
        per_query = (cpu1 - cpu0) / result.completed * 1e6 if result.completed else None
        return result, per_query
    finally:
        node.stop()
        lab.run("node", ["conntrack", "-F"], check=False)


def reference(lab: Lab, backends: list[str], seconds: float, clients: int, outstanding: int,
              *, connected: bool) -> tuple[parse.DnsperfResult, float | None]:
    local = 10053
    rule = ["-d", VIP, "-p", "udp", "--dport", str(PORT), "-j", "REDIRECT", "--to-ports",
            str(local)]
    binary = build_udp_reference(lab.workdir)
    argv = [str(binary), *(["-c"] if connected else []), str(local),
            *(f"{ip}:{PORT}" for ip in backends)]
    proc = lab.spawn("node", argv, "udp-reference")
    lab.wait_port("node", "0.0.0.0", local, "udp", proc=proc)
    lab.run("node", ["iptables", "-t", "nat", "-A", "PREROUTING", *rule])
    try:
        cpu0 = cpu_seconds(proc.pid)
        result = dnsperf(lab, seconds, clients, outstanding)
        cpu1 = cpu_seconds(proc.pid)
        return result, (cpu1 - cpu0) / result.completed * 1e6 if result.completed else None
    finally:
        lab.run("node", ["iptables", "-t", "nat", "-D", "PREROUTING", *rule], check=False)
        proc.kill()
        proc.wait(5)
        lab.run("node", ["conntrack", "-F"], check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--peers", default="kernel,native,python")
    p.add_argument("--clients", type=int, default=1, help="dnsperf -c (source ports)")
    p.add_argument("--outstanding", type=int, default=100, help="dnsperf -q")
    args = p.parse_args()
    peers = args.peers.split(",")
    figures: dict[str, list[float]] = {peer: [] for peer in peers}
    lost: dict[str, list[int]] = {peer: [] for peer in peers}
    with Lab.create(pods=2, name_hint="benchudp") as lab:
        undo = install_signal_teardown(lab)
        try:
            for i in (1, 2):
                lab.start_dnsmasq(i, {"bench.example": "1.2.3.4"}, port=PORT)
            (lab.workdir / "queries.txt").write_text("bench.example A\n" * 200)
            backends = [lab.pod_ip(1), lab.pod_ip(2)]
            for round_ in range(1, args.rounds + 1):
                print(f"round {round_}/{args.rounds}", flush=True)
                for peer in peers:
                    if peer == "kernel":
                        r, cpu = kernel(lab, backends, args.seconds, args.clients,
                                        args.outstanding)
                    elif peer.startswith("reference"):
                        r, cpu = reference(lab, backends, args.seconds, args.clients,
                                           args.outstanding, connected=peer == "reference-c")
                    else:
                        r, cpu = uproxy(lab, backends, args.seconds, args.clients,
                                        args.outstanding, native=peer == "native")
                    figures[peer].append(r.qps)
                    lost[peer].append(r.lost)
                    extra = "" if cpu is None else f", {cpu:.1f} us CPU/query"
                    print(f"  {peer:7} {r.qps:9,.0f} q/s, {r.lost} lost of {r.sent}{extra}",
                          flush=True)
                    time.sleep(0.5)
        finally:
            undo()
    base = statistics.median(figures["kernel"]) if "kernel" in figures else None
    for peer in peers:
        med = statistics.median(figures[peer])
        ratio = f" ({med / base:.2f}x kernel)" if base else ""
        print(f"median {peer:7} {med:9,.0f} q/s{ratio}, lost {lost[peer]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
