"""The five data paths compared, each started and stopped in the lab's node namespace.

Every peer is reached by the client at the same addresses (the ClusterIPs
:data:`VIP` and :data:`VIP_BULK`, and for the IPv6 rows (issue 13) the web/DNS
Service's second ClusterIP :data:`VIP6`), so the load tools run unchanged:

- kernel DNAT: kube-proxy's iptables mode, written the way kube-proxy writes it
  (``KUBE-SERVICES`` -> ``KUBE-SVC-*`` with ``-m statistic --mode random`` ->
  ``KUBE-SEP-*`` with ``-j DNAT --to-destination``), in ``iptables`` and, for
  the IPv6 ClusterIP and the pods' IPv6 addresses, ``ip6tables``;
- uproxy (native splice engine, and its pure-Python twin): the real daemon via
  :class:`uproxy.demo.node.NodeProxy` and manifests for the same ClusterIPs;
  it intercepts with ``REDIRECT`` (``ip6tables`` too: the web/DNS Service is
  PreferDualStack with IPv6 EndpointSlices) into its own sockets. It connects to the
  backends from the client's address (transparent mode, the default); the native
  engine also runs with ``--masquerade-all`` (from the node's address, TCP rows
  only) to show what transparent mode costs;
- nginx stream and HAProxy: listening on local ports in the node namespace,
  reached through ``REDIRECT`` rules for the ClusterIPs -- the same
  interception uproxy uses, so the comparison is of the proxies, not of how
  packets reach them;
- the C UDP relay (DNS only): ``native/udp_reference.c``, the smallest relay of
  uproxy's UDP design (the same batching code, no Python), built at run time:
  how close any userspace relay of that shape gets to kernel DNAT here;
- the C TCP relay: ``native/tcp_reference.c``, uproxy's TCP engine without Python;
- the minimal splice relay (bulk only): ``native/splice_minimal.c``, a thread per
  direction doing nothing but blocking splices, none of uproxy's code: how close any
  relay through a second TCP connection gets to kernel DNAT's single stream here.

A peer's :meth:`Peer.pids` are the processes whose CPU, RSS and fds we measure
(all of nginx's or HAProxy's processes; none for the kernel).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from uproxy.demo.lab import Lab, LabError
from uproxy.demo.node import NodeProxy, endpoint_slice, service
from uproxy.proxy.relay import engine_threads

VIP = "10.0.0.10"
"""ClusterIP of the balanced services: HTTP :80 (2 nginx pods) and DNS :53/udp (2 dnsmasq pods)."""
VIP6 = "fd00:96::a"
"""The balanced service's IPv6 ClusterIP (in the lab's SERVICE_CIDR6): the same
HTTP :80 and DNS :53/udp, to the pods' IPv6 addresses (issue 13's rows)."""
VIP_BULK = "10.0.0.11"
"""ClusterIP of the bulk service :5201, one endpoint (iperf3's control and data
connections must reach the same server)."""
HTTP_PORT, BULK_PORT, DNS_PORT, HOLD_PORT = 80, 5201, 53, 8080
# where nginx/HAProxy listen in the node namespace (REDIRECT targets)
LOCAL_PORTS = {HTTP_PORT: 18080, BULK_PORT: 15201, DNS_PORT: 10053}

KERNEL, NATIVE, PYTHON, NGINX, HAPROXY, C_UDP = (
    "kernel DNAT", "uproxy native", "uproxy python", "nginx stream", "HAProxy", "C UDP relay")
NATIVE_MASQ = "uproxy native masquerade-all"
C_TCP = "C TCP relay"
C_SPLICE = "minimal splice relay"
ALL_PEERS = (KERNEL, NATIVE, NATIVE_MASQ, PYTHON, NGINX, HAPROXY, C_UDP, C_TCP, C_SPLICE)
C_SPLICE_CUBIC = "minimal splice relay cubic"
OPTIONAL_PEERS = (C_SPLICE_CUBIC,)
"""Peers only ``--peers`` names (not in a default run): the minimal splice relay with
``cubic`` on both of its sockets, which does not pace (what the second sender's pacing
costs where the node's default is BBR without the fq qdisc)."""
BASELINE = "uproxy baseline"
"""uproxy native at the commit ``--baseline REV`` names (added to the run only then)."""
UPROXY_PEERS = (NATIVE, NATIVE_MASQ, PYTHON)
IPV6_PEERS = (KERNEL, NATIVE)
"""The peers with IPv6 rows (issue 13: uproxy native against kernel DNAT over IPv6)."""
NATIVE_SRC = Path(__file__).resolve().parent.parent / "native"


@dataclass(frozen=True, slots=True)
class Backends:
    http: tuple[str, ...]   # pod IPs serving HTTP on :80
    bulk: tuple[str, ...]   # pod IPs running iperf3 -s on :5201
    dns: tuple[str, ...]    # pod IPs running dnsmasq on :53
    http6: tuple[str, ...] = ()  # the pods' IPv6 addresses, HTTP on :80
    dns6: tuple[str, ...] = ()   # the pods' IPv6 addresses, dnsmasq on :53


class Peer(Protocol):
    name: str
    udp: bool  # proxies DNS
    tcp: bool  # proxies HTTP and bulk (every peer but the C UDP relay)
    bulk_only: bool  # proxies the bulk Service only (the minimal splice relay)
    ipv6: bool  # proxies HTTP and DNS on the IPv6 ClusterIP VIP6 too

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def pids(self) -> list[int]: ...


def group_pids(pgid: int) -> list[int]:
    """Every live process in process group ``pgid`` (nginx master + worker, ...)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text.rpartition(")")[2].split()
        if len(fields) > 3 and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return sorted(out)


def _chain(prefix: str, name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


def kube_proxy_rules(services: list[tuple[str, str, int, str, tuple[str, ...]]]) -> str:
    """iptables-restore text as kube-proxy's iptables mode writes it (nat table part).

    ``services``: (name "ns/svc:port", cluster IP, port, protocol, endpoint IPs),
    endpoints serve the same port number. IPv6 services (for ``ip6tables-restore``;
    a table holds one family) get ``/128`` and ``--to-destination [addr]:port``.
    """
    chains = ["KUBE-SERVICES"]
    rules = []
    for name, ip, port, proto, eps in services:
        svc = _chain("KUBE-SVC-", name)
        chains.append(svc)
        six = ":" in ip
        plen = 128 if six else 32
        rules.append(f'-A KUBE-SERVICES -d {ip}/{plen} -p {proto} -m comment --comment '
                     f'"{name} cluster IP" -m {proto} --dport {port} -j {svc}')
        seps = [_chain("KUBE-SEP-", f"{name}/{ep}") for ep in eps]
        chains += seps
        n = len(eps)
        for i, (ep, sep) in enumerate(zip(eps, seps, strict=True)):
            stat = "" if i == n - 1 else \
                f"-m statistic --mode random --probability {1 / (n - i):.11f} "
            rules.append(f'-A {svc} -m comment --comment "{name}" {stat}-j {sep}')
            rules.append(f'-A {sep} -p {proto} -m comment --comment "{name}" -m {proto} '
                         f'-j DNAT --to-destination {f"[{ep}]" if six else ep}:{port}')
    head = ["*nat", *(f":{c} - [0:0]" for c in chains)]
    hooks = [f'-A {h} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
             for h in ("PREROUTING", "OUTPUT")]
    return "\n".join([*head, *hooks, *rules, "COMMIT", ""])


def _restore(lab: Lab, text: str, tool: str = "iptables", timeout: float = 60.0) -> None:
    lab.run("node", [f"{tool}-restore", "--noflush"], input=text, timeout=timeout)


def _remove_chains(lab: Lab, chains: list[str], hooks: list[list[str]],
                   tool: str = "iptables") -> None:
    for hook in hooks:
        while lab.run("node", [tool, "-t", "nat", "-D", *hook], check=False).returncode == 0:
            pass
    for chain in chains:
        lab.run("node", [tool, "-t", "nat", "-F", chain], check=False)
    for chain in chains:
        lab.run("node", [tool, "-t", "nat", "-X", chain], check=False)


def flush_conntrack(lab: Lab) -> None:
    lab.run("node", ["conntrack", "-F"], check=False)
    lab.run("node", ["conntrack", "-F", "-f", "ipv6"], check=False)


def clean_slate(lab: Lab) -> None:
    """Before a peer starts: no conntrack entries and no TIME_WAIT sockets left by the one
    before it, in any of the lab's namespaces.

    A transparent-mode uproxy that closed first toward a pod leaves a TIME_WAIT socket in
    the node ns whose local address is the client's (60 s). The next peer's connection with
    the same 4-tuple (the client's own port to the pod, as kernel DNAT makes it) then loses
    its SYN-ACK in the node: early demux attaches the TIME_WAIT socket to the forwarded
    reply and ``ip_forward`` drops it (2-7 of 20 curls timed out right after the scale
    test; bench/ANALYSIS.md, "Transparent mode's TIME_WAIT sockets"). ``ss -K`` destroys
    them (inet_diag SOCK_DESTROY)."""
    flush_conntrack(lab)
    for ns in ("node", "client", *(f"pod{i}" for i in range(1, lab.pods + 1))):
        lab.run(ns, ["sh", "-c", "ss -K -t -n state time-wait >/dev/null"], check=False,
                timeout=60)


class KernelDnat:
    udp = tcp = ipv6 = True
    bulk_only = False

    def __init__(self, lab: Lab, backends: Backends, *,
                 others: Sequence[tuple[str, str, int, str, tuple[str, ...]]] = (),
                 restore_timeout: float = 60.0) -> None:
        self.name = KERNEL
        self.lab = lab
        self.tools = ("iptables", "ip6tables")
        # The scale-conn test's 30,000 chains take iptables-nft 1.8.9 minutes to restore
        # here (its time grows with the square of the chain count: 6,000 Services took
        # 28 s). Not iptables-legacy: a legacy nat table beside the nft one in the same
        # namespace makes NAT depend on which hook binds a connection first.
        self.restore_timeout = restore_timeout
        self.services = [  # ``others`` (the scale-conn test's) come first in KUBE-SERVICES
            *others,
            ("bench/web:http", VIP, HTTP_PORT, "tcp", backends.http),
            ("bench/dns:dns", VIP, DNS_PORT, "udp", backends.dns),
            ("bench/bulk:iperf", VIP_BULK, BULK_PORT, "tcp", backends.bulk),
        ]
        self.text = kube_proxy_rules(self.services)
        self.services6 = [
            ("bench/web:http", VIP6, HTTP_PORT, "tcp", backends.http6),
            ("bench/dns:dns", VIP6, DNS_PORT, "udp", backends.dns6),
        ]
        self.text6 = kube_proxy_rules([s for s in self.services6 if s[4]])

    def start(self) -> None:
        _restore(self.lab, self.text, self.tools[0], self.restore_timeout)
        _restore(self.lab, self.text6, self.tools[1], self.restore_timeout)

    def stop(self) -> None:
        hooks = [[h, "-m", "comment", "--comment", "kubernetes service portals", "-j",
                  "KUBE-SERVICES"] for h in ("PREROUTING", "OUTPUT")]
        for text, tool in zip((self.text, self.text6), self.tools, strict=True):
            chains = [line[1:].split()[0] for line in text.splitlines() if line.startswith(":")]
            _remove_chains(self.lab, [], hooks, tool)
            # All chains in one restore: declared (flushed), then deleted (30,000 with others).
            _restore(self.lab, "\n".join(["*nat", *(f":{c} - [0:0]" for c in chains),
                                          *(f"-X {c}" for c in chains), "COMMIT", ""]), tool,
                     self.restore_timeout)
        flush_conntrack(self.lab)

    def pids(self) -> list[int]:
        return []


class Uproxy:
    udp = tcp = True
    bulk_only = False

    def __init__(self, lab: Lab, backends: Backends, *, native: bool,
                 args: tuple[str, ...] = (), masquerade_all: bool = False,
                 source: Path | None = None) -> None:
        """``source``: a tree from :func:`build_baseline` (the peer "uproxy baseline")."""
        self.name = BASELINE if source is not None else \
            NATIVE_MASQ if masquerade_all else NATIVE if native else PYTHON
        self.udp = not masquerade_all  # its TCP rows are the comparison; DNS is the same
        self.ipv6 = self.name in IPV6_PEERS and bool(backends.http6)
        self.lab = lab
        if masquerade_all:
            args = (*args, "--masquerade-all")
        self.node = NodeProxy(lab, native=native, loop="uvloop", args=args,
                              name=self.name.replace(" ", "-"), source=source)
        self.node.write(
            "bench.yaml",
            service("web", VIP, [{"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT},
                                 {"name": "dns", "port": DNS_PORT, "targetPort": DNS_PORT,
                                  "protocol": "UDP"}], namespace="bench",
                    **(dict(clusterIPs=[VIP, VIP6], ipFamilyPolicy="PreferDualStack",
                            ipFamilies=["IPv4", "IPv6"]) if self.ipv6 else {})),
            endpoint_slice("web", backends.http,
                           [{"name": "http", "port": HTTP_PORT, "protocol": "TCP"}],
                           namespace="bench", name="web-http"),
            endpoint_slice("web", backends.dns,
                           [{"name": "dns", "port": DNS_PORT, "protocol": "UDP"}],
                           namespace="bench", name="web-dns"),
            *((endpoint_slice("web", backends.http6,
                              [{"name": "http", "port": HTTP_PORT, "protocol": "TCP"}],
                              namespace="bench", name="web-http6"),
               endpoint_slice("web", backends.dns6,
                              [{"name": "dns", "port": DNS_PORT, "protocol": "UDP"}],
                              namespace="bench", name="web-dns6")) if self.ipv6 else ()),
            service("bulk", VIP_BULK, [{"name": "iperf", "port": BULK_PORT,
                                        "targetPort": BULK_PORT}], namespace="bench"),
            endpoint_slice("bulk", backends.bulk,
                           [{"name": "iperf", "port": BULK_PORT, "protocol": "TCP"}],
                           namespace="bench"),
        )

    def start(self) -> None:
        if self.node.source is not None:
            # /readyz: first sync done, rules applied (how an earlier uproxy shows its rules
            # is its own; the run checks the path with a request before measuring)
            self.node.start(timeout=30)
            return
        self.node.start(wait_for="bench/bulk:iperf cluster IP", timeout=30)
        self.node.wait_rules(lambda t: "bench/web:dns cluster IP" in t
                             and "bench/web:http cluster IP" in t, timeout=10)
        if self.ipv6:
            # two IPv6 redirects (http, dns): iptables "-d VIP6/128" lines or nftables map
            # elements "VIP6 . tcp . 80" (the default interception)
            self.node.wait_rules(lambda t: t.count(VIP6) >= 2, timeout=10, family=6)

    def stop(self) -> None:
        if self.node.proc is not None and self.node.proc.poll() is None:
            self.node.stop()
        flush_conntrack(self.lab)

    def pids(self) -> list[int]:
        proc = self.node.proc
        return [proc.pid] if proc is not None and proc.poll() is None else []

    @property
    def pid(self) -> int | None:
        proc = self.node.proc
        return proc.pid if proc is not None else None


class _Redirected:
    """Base of nginx/HAProxy: a process group in the node ns plus REDIRECT rules."""

    chain = "BENCH-REDIRECT"
    udp = False
    tcp = True
    ipv6 = False  # issue 13's IPv6 rows compare uproxy with kernel DNAT only
    bulk_only = False
    name = ""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.proc: subprocess.Popen[bytes] | None = None

    def _redirect_rules(self) -> str:
        lines = ["*nat", f":{self.chain} - [0:0]",
                 f"-A PREROUTING -j {self.chain}", f"-A OUTPUT -j {self.chain}"]
        for port, local in LOCAL_PORTS.items():
            ip = VIP_BULK if port == BULK_PORT else VIP
            protos = ["udp"] if port == DNS_PORT else ["tcp"]
            if (port == DNS_PORT and not self.udp) or (port != DNS_PORT and not self.tcp) \
                    or (self.bulk_only and port != BULK_PORT):
                continue
            for proto in protos:
                lines.append(f"-A {self.chain} -d {ip}/32 -p {proto} -m {proto} --dport {port} "
                             f"-j REDIRECT --to-ports {local}")
        return "\n".join([*lines, "COMMIT", ""])

    def _argv(self, d: Path) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        d = self.lab.workdir / self.name.replace(" ", "-").lower()
        d.mkdir(exist_ok=True)
        self.proc = self.lab.spawn("node", self._argv(d), d.name)
        try:
            tcp_ports = (LOCAL_PORTS[BULK_PORT],) if self.bulk_only else \
                (LOCAL_PORTS[HTTP_PORT], LOCAL_PORTS[BULK_PORT])
            for port in tcp_ports if self.tcp else ():
                self.lab.wait_port("node", "0.0.0.0", port, "tcp", proc=None)
            if self.udp:
                self.lab.wait_port("node", "0.0.0.0", LOCAL_PORTS[DNS_PORT], "udp", proc=None)
        except LabError as exc:
            raise LabError(f"{self.name}: {exc}: {self.lab.log(d.name).strip()[-1500:]}") from None
        _restore(self.lab, self._redirect_rules())

    def stop(self) -> None:
        _remove_chains(self.lab, [self.chain],
                       [[h, "-j", self.chain] for h in ("PREROUTING", "OUTPUT")])
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        flush_conntrack(self.lab)

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return group_pids(self.proc.pid)


class NginxStream(_Redirected):
    udp = True

    def __init__(self, lab: Lab, backends: Backends) -> None:
        super().__init__(lab)
        self.name = NGINX
        self.backends = backends

    def config(self, d: Path) -> str:
        def ups(name: str, ips: tuple[str, ...], port: int) -> str:
            servers = " ".join(f"server {ip}:{port};" for ip in ips)
            return f"  upstream {name} {{ random; {servers} }}\n"

        b = self.backends
        return (
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
            "daemon off;\nuser root root;\nworker_processes 1;\n"
            "worker_rlimit_nofile 20000;\n"
            f"pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
            "events { worker_connections 19000; }\n"
            "stream {\n"
            + ups("http", b.http, HTTP_PORT) + ups("bulk", b.bulk, BULK_PORT)
            + ups("dns", b.dns, DNS_PORT)
            + f"  server {{ listen {LOCAL_PORTS[HTTP_PORT]} backlog=4096; proxy_pass http; }}\n"
            f"  server {{ listen {LOCAL_PORTS[BULK_PORT]}; proxy_pass bulk; }}\n"
            f"  server {{ listen {LOCAL_PORTS[DNS_PORT]} udp; proxy_pass dns; "
            "proxy_responses 1; proxy_timeout 5s; }\n"
            "}\n"
        )

    def _argv(self, d: Path) -> list[str]:
        conf = d / "nginx.conf"
        conf.write_text(self.config(d))
        return ["nginx", "-p", str(d), "-e", f"{d}/error.log", "-c", str(conf)]


class Haproxy(_Redirected):
    udp = False  # HAProxy (community) has no UDP proxying

    def __init__(self, lab: Lab, backends: Backends) -> None:
        super().__init__(lab)
        self.name = HAPROXY
        self.backends = backends

    def config(self) -> str:
        def section(name: str, local: int, ips: tuple[str, ...], port: int) -> str:
            servers = "".join(f"  server s{i} {ip}:{port}\n" for i, ip in enumerate(ips, 1))
            return (f"frontend {name}\n  bind :{local} backlog 4096\n  default_backend {name}\n"
                    f"backend {name}\n  balance random\n{servers}")

        b = self.backends
        return (
            "global\n  nbthread 1\n  maxconn 9500\n  maxpipes 200\n  ulimit-n 20000\n"
            "defaults\n  mode tcp\n  option splice-auto\n  maxconn 9500\n"
            "  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n"
            + section("http", LOCAL_PORTS[HTTP_PORT], b.http, HTTP_PORT)
            + section("bulk", LOCAL_PORTS[BULK_PORT], b.bulk, BULK_PORT)
        )

    def _argv(self, d: Path) -> list[str]:
        conf = d / "haproxy.cfg"
        conf.write_text(self.config())
        return ["haproxy", "-db", "-f", str(conf)]


class CUdpRelay(_Redirected):
    """``native/udp_reference.c``: uproxy's UDP design in plain C, DNS only (see the file)."""

    udp = True
    tcp = False

    def __init__(self, lab: Lab, backends: Backends) -> None:
        super().__init__(lab)
        self.name = C_UDP
        self.backends = backends

    def _argv(self, d: Path) -> list[str]:
        binary = build_udp_reference(d)
        return [str(binary), str(LOCAL_PORTS[DNS_PORT]),
                *(f"{ip}:{DNS_PORT}" for ip in self.backends.dns)]


class CTcpRelay(_Redirected):
    """``native/tcp_reference.c``: uproxy's TCP engine (set-up and relay) without Python,
    from the node's address (as ``--masquerade-all``)."""

    def __init__(self, lab: Lab, backends: Backends) -> None:
        super().__init__(lab)
        self.name = C_TCP
        self.backends = backends

    def _argv(self, d: Path) -> list[str]:
        binary = build_tcp_reference(d)
        b = self.backends
        return [str(binary), "-t", str(bench_engine_threads()), str(LOCAL_PORTS[HTTP_PORT]),
                *(f"{ip}:{HTTP_PORT}" for ip in b.http), "--", str(LOCAL_PORTS[BULK_PORT]),
                *(f"{ip}:{BULK_PORT}" for ip in b.bulk)]


class MinimalSplice(_Redirected):
    """``native/splice_minimal.c``: the smallest splice relay (not uproxy's code), bulk only,
    from the node's address."""

    bulk_only = True

    def __init__(self, lab: Lab, backends: Backends, congestion: str = "") -> None:
        super().__init__(lab)
        self.name = f"{C_SPLICE} {congestion}" if congestion else C_SPLICE
        self.backends = backends
        self.congestion = congestion

    def _argv(self, d: Path) -> list[str]:
        binary = build_splice_minimal(d)
        return [str(binary), *(["-c", self.congestion] if self.congestion else []),
                str(LOCAL_PORTS[BULK_PORT]), f"{self.backends.bulk[0]}:{BULK_PORT}"]


def bench_engine_threads() -> int:
    """The engine threads uproxy's daemon runs with in this bench (``--engine-threads``
    from ``UPROXY_ENGINE_THREADS``, else auto): the C TCP relay runs with as many."""
    value = os.environ.get("UPROXY_ENGINE_THREADS", "").strip()
    return engine_threads(int(value) if value.isdigit() else 0)


def _build(d: Path, name: str, sources: list[str], flags: list[str]) -> Path:
    """Compile ``sources`` (in native/) into ``d/name``, once."""
    out = d / name
    if not out.exists():
        argv = ["cc", "-O2", "-std=gnu11", "-Wall", "-Wextra", *flags, "-o", str(out),
                *(str(NATIVE_SRC / s) for s in sources), f"-I{NATIVE_SRC}"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LabError(f"building {NATIVE_SRC / sources[0]}: {exc}") from None
        if proc.returncode != 0:
            raise LabError(f"building {NATIVE_SRC / sources[0]} failed: "
                           f"{proc.stderr.strip()[-800:]}")
    return out


def build_tcp_reference(d: Path) -> Path:
    """Compile ``native/tcp_reference.c`` (with the engine) into ``d``, once."""
    return _build(d, "tcp_reference", ["tcp_reference.c", "relay.c", "transparent.c",
                                      "affinity.c"],
                  ["-pthread"])


def build_splice_minimal(d: Path) -> Path:
    """Compile ``native/splice_minimal.c`` into ``d``, once."""
    return _build(d, "splice_minimal", ["splice_minimal.c"], ["-pthread"])


def build_baseline(rev: str, d: Path) -> Path:
    """uproxy at commit ``rev`` of this repository, unpacked into ``d/baseline-REV`` with its
    native module built and its modules byte-compiled (as this checkout's are for the run):
    the tree the peer "uproxy baseline" runs (``-m uproxy`` from there)."""
    tree = d / f"baseline-{rev[:12]}"
    done = tree / ".built"
    if done.exists():
        return tree
    tree.mkdir(parents=True, exist_ok=True)
    q = shlex.quote
    steps = (("git archive", f"git -C {q(str(NATIVE_SRC.parent))} archive --format=tar "
                             f"{q(rev)} | tar -x -C {q(str(tree))}"),
             ("its native module",
              f"cd {q(str(tree))} && exec {q(sys.executable)} uproxy/_native_build.py"),
             ("byte-compiling it",
              f"exec {q(sys.executable)} -m compileall -q {q(str(tree / 'uproxy'))}"))
    for what, command in steps:
        try:
            proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                                  timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LabError(f"baseline {rev[:12]}: {what}: {exc}") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["?"]
            raise LabError(f"baseline {rev[:12]}: {what} failed: {last[0]}")
    done.touch()
    return tree


def build_udp_reference(d: Path) -> Path:
    """Compile ``native/udp_reference.c`` (with ``native/udp.c``) into ``d``, once."""
    return _build(d, "udp_reference", ["udp_reference.c", "udp.c"], [])
