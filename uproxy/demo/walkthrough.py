"""``uproxy demo``: how a Kubernetes Service works, shown by uproxy doing it in a namespace lab.

The walkthrough is a script a newcomer reads while it runs: every step prints a
heading, one or two sentences on what to look at and how kube-proxy would do
the same, then real commands as ``ns$ command`` followed by their real output
(``node$`` runs in the node namespace, ``client$`` in the client namespace).
Nothing is canned: the tables come from ``uproxy get`` against the running
daemon, the rules (``nft list table ip uproxy``; ``iptables-save`` with
``--interception iptables``) in the node namespace, the traffic from curl, dig
and the lab's probe in the client namespace.

Why it is shaped this way:

- One straight function per step, sharing a small :class:`Demo` object that
  holds the lab, the daemon and the output helpers; no framework. Steps read
  top to bottom like the seeds' tutorials they mirror.
- The manifests are files in ``uproxy/demo/manifests`` (one Service per file,
  endpoints in ``lab-endpoints.yaml``), copied into the directory the daemon
  watches; scaling rewrites the endpoints file exactly as the EndpointSlice
  controller would update the slice. The docker-compose stack mounts the same
  Service files with its own ``compose-endpoints.yaml``.
- The status server listens on the node's client-facing address (10.99.0.1),
  inside the lab. While the demo keeps running, a small forwarder makes it
  reachable from the host's loopback: the listening socket is created here in
  the root namespace (127.0.0.1 only) and inherited by a child process that
  runs in the node namespace and connects from there. No packet leaves the
  lab or loopback.
- Teardown: the lab's context manager on exceptions and Ctrl-C,
  :func:`~uproxy.demo.lab.install_signal_teardown` for SIGTERM/SIGHUP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from uproxy.demo.lab import NODE_IP, Lab, LabError, install_signal_teardown
from uproxy.demo.node import NodeProxy

MANIFESTS_DIR = Path(__file__).resolve().parent / "manifests"
SERVICE_FILES = ("multi-port.yaml", "simpleservice.yaml", "k8s-nginx-node.yaml",
                 "kube-dns.yaml", "sticky.yaml")
"""The Service manifests the demo runs (shared with the docker-compose stack)."""
LAB_ENDPOINTS = "lab-endpoints.yaml"
"""EndpointSlices naming the lab's pods (172.17.0.2 ..)."""
COMPOSE_ENDPOINTS = "compose-endpoints.yaml"
"""EndpointSlices naming the compose stack's backends (only used by docker-compose.yml)."""

STATUS_PORT = 10249
STATUS_URL = f"http://{NODE_IP}:{STATUS_PORT}"
HOST_FORWARD = ("127.0.0.1", STATUS_PORT)

REQUIRED_TOOLS: tuple[tuple[str, str], ...] = (
    ("ip", "iproute2"), ("ss", "iproute2"), ("iptables", "iptables"),
    ("iptables-save", "iptables"), ("iptables-restore", "iptables"),
    ("conntrack", "conntrack"), ("nginx", "nginx"), ("dnsmasq", "dnsmasq-base"),
    ("dig", "dnsutils"), ("curl", "curl"),
)
"""Programs the demo runs, with the Debian package that provides each."""

PODS: dict[int, tuple[str, str]] = {
    1: ("echo", "python -m uproxy.demo.echo --name pod1 --tcp 6789 --tcp 9876"),
    2: ("echo", "python -m uproxy.demo.echo --name pod2 --tcp 6789 --tcp 9876"),
    3: ("nginx", "nginx (port 80, answers its pod name)"),
    4: ("nginx", "nginx (port 80, answers its pod name)"),
    5: ("dnsmasq", "dnsmasq (port 53 UDP+TCP)"),
    6: ("dnsmasq", "dnsmasq (port 53 UDP+TCP)"),
    7: ("dnsmasq", "dnsmasq (port 53 UDP+TCP)"),
}
"""What runs in each pod; lab-endpoints.yaml names the same pods."""

DNS_RECORDS = {
    "multi-port.default.svc.cluster.local": "10.0.0.180",
    "simpleservice.namingthings.svc.cluster.local": "10.0.0.155",
    "k8s-nginx-node.default.svc.cluster.local": "10.0.0.157",
}
"""What the dnsmasq pods answer, as kube-dns would for the demo's services."""

AFFINITY_CLIENTS = tuple(f"10.99.0.{i}" for i in range(10, 16))
WIDTH = 92


def requirements_problem(*, euid: int | None = None, path: str | None = None) -> str | None:
    """One line saying why the demo cannot run here (not root, a tool missing), or None.

    ``euid`` and ``path`` default to this process's; tests pass others.
    """
    if (os.geteuid() if euid is None else euid) != 0:
        return ("uproxy demo needs root: it builds network namespaces and iptables rules "
                "(run it as root, e.g. sudo make demo)")
    for tool, package in REQUIRED_TOOLS:
        if shutil.which(tool, path=path) is None:
            return f"{tool} not found: install the Debian package {package} " \
                   f"(apt-get install {package})"
    return None


def main(once: bool) -> int:
    """Run the walkthrough; with ``once`` exit after it, else keep running until Ctrl-C."""
    problem = requirements_problem()
    if problem is not None:
        print(f"uproxy demo: {problem}", file=sys.stderr)
        return 2
    for name in (*SERVICE_FILES, LAB_ENDPOINTS):
        if not (MANIFESTS_DIR / name).is_file():
            print(f"uproxy demo: {MANIFESTS_DIR / name}: missing (a broken installation)",
                  file=sys.stderr)
            return 2
    started = time.monotonic()
    demo: Demo | None = None
    undo = None
    # Ctrl-C must stop the demo even when started with SIGINT ignored (e.g. from a script).
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        lab = Lab.create(pods=len(PODS), name_hint="demo")
        undo = install_signal_teardown(lab)
        with lab:
            demo = Demo(lab)
            demo.run_steps()
            demo.out(f"\n(the walkthrough took {time.monotonic() - started:.0f} s)")
            if once:
                demo.status_hint(forwarded=None)
            else:
                demo.keep_running()
            demo.stop()
    except KeyboardInterrupt:
        print("\nstopped (Ctrl-C)", flush=True)
    except SystemExit:  # SIGTERM/SIGHUP: the handler has already torn the lab down
        print("\nstopped by a signal; the lab is removed", flush=True)
        raise
    except LabError as exc:
        print(f"\nuproxy demo: a step failed: {exc}", file=sys.stderr)
        if demo is not None and demo.node.proc is not None:
            tail = "\n".join(demo.node.log.splitlines()[-15:])
            print(f"last lines of uproxy's log:\n{tail}", file=sys.stderr)
        return 1
    finally:
        if undo is not None:
            undo()
        signal.signal(signal.SIGINT, previous_sigint)
    if demo is not None:
        demo.report_teardown()
    return 0


class Demo:
    """The lab, the daemon in its node namespace, and the printing helpers the steps share."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.node = NodeProxy(lab, args=["--status-address", f"{NODE_IP}:{STATUS_PORT}"])
        self.step_no = 0
        self.forwarder: subprocess.Popen[bytes] | None = None
        self._after_heading = False

    # ------------------------------------------------------------------ output
    def out(self, text: str = "") -> None:
        print(text, flush=True)
        self._after_heading = False

    def heading(self, title: str) -> None:
        self.step_no += 1
        line = f"{self.step_no}. {title}"
        self.out(f"\n{line}\n{'=' * len(line)}")
        self._after_heading = True

    def explain(self, text: str) -> None:
        """A paragraph of prose, after a blank line."""
        gap = "" if self._after_heading else "\n"
        self.out(gap + textwrap.fill(" ".join(text.split()), width=WIDTH,
                                     break_on_hyphens=False))

    def show(self, ns: str, command: str, *, argv: Sequence[str] | None = None,
             timeout: float = 30.0) -> str:
        """Print ``ns$ command``, run it in namespace ``ns`` and print its real output.

        ``command`` runs through ``sh -c`` unless ``argv`` gives the exact program
        to run (e.g. ``sys.executable -m uproxy`` for the ``uproxy`` shown).
        """
        self.out(f"\n{ns}$ {command}")
        run = list(argv) if argv is not None else ["sh", "-c", command]
        proc = self.lab.run(ns, run, timeout=timeout, check=False)
        text = proc.stdout.rstrip("\n")
        if text:
            self.out(text)
        if proc.returncode != 0 and proc.stderr.strip():
            self.out(proc.stderr.rstrip("\n"))
        return proc.stdout

    def uproxy_get(self, what: str) -> str:
        return self.show("node", f"uproxy get {what} --status {STATUS_URL}",
                         argv=[sys.executable, "-m", "uproxy", "get", what,
                               "--status", STATUS_URL])

    def probe(self, host: str, port: int, *, count: int, source_ip: str | None = None) -> str:
        args = ["tcp", host, str(port), "--count", str(count), "--concurrency", "1"]
        if source_ip:
            args += ["--source-ip", source_ip]
        shown = "python -m uproxy.demo.probe " + " ".join(args)
        output = self.show("client", shown,
                           argv=[sys.executable, "-m", "uproxy.demo.probe", *args])
        lines = output.strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            result = {}
        counts: dict[str, int] = result.get("counts", {})
        errors = sum(result.get("errors", {}).values())
        spread = ", ".join(f"{pod}: {n}" for pod, n in counts.items()) or "nothing"
        self.out(f"   -> connections per pod: {spread}; errors: {errors}")
        return spread

    # ------------------------------------------------------------------- steps
    def run_steps(self) -> None:
        self.step_lab()
        self.step_start()
        self.step_tables()
        self.step_multi_port()
        self.step_scaling()
        self.step_nodeport()
        self.step_dns()
        self.step_affinity()

    def step_lab(self) -> None:
        lab = self.lab
        self.out("uproxy demo: a Kubernetes Service, shown by uproxy doing kube-proxy's job")
        self.heading("The lab: a node, seven pods and a client, each a network namespace")
        self.explain(
            f"No cluster is needed: network namespaces play the machines. The pods sit on a "
            f"bridge behind the node (172.17.0.0/24, like docker0 in the tutorials); the client "
            f"reaches the node at {lab.node_ip} and has no other way out. Commands below show "
            f"their namespace as a prompt: node$ is `ip netns exec {lab.node}`, client$ is "
            f"`ip netns exec {lab.client}`.")
        for pod, (kind, _) in PODS.items():
            if kind == "echo":
                lab.start_echo(pod, tcp_ports=(6789, 9876))
            elif kind == "nginx":
                lab.start_nginx(pod, 80)
            else:
                lab.start_dnsmasq(pod, DNS_RECORDS)
        rows = [("NAME", "IP", "NAMESPACE", "RUNS")]
        rows += [(f"pod{i}", lab.pod_ip(i), lab.pod_ns(i), what)
                 for i, (_, what) in PODS.items()]
        widths = [max(len(r[c]) for r in rows) + 3 for c in range(3)]
        self.out("")
        for row in rows:
            self.out("".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
                     + row[3])

    def step_start(self) -> None:
        self.heading("Start uproxy on the node with the demo's manifests")
        self.explain(
            "kube-proxy learns Services and EndpointSlices from the API server; uproxy can "
            "also read them from a directory of manifests and follows edits to it. These "
            "are the files (the pods' addresses are in lab-endpoints.yaml):")
        for name in (*SERVICE_FILES, LAB_ENDPOINTS):
            shutil.copyfile(MANIFESTS_DIR / name, self.node.manifests / name)
        self.out(f"\n$ cat {MANIFESTS_DIR / 'multi-port.yaml'}")
        self.out((MANIFESTS_DIR / "multi-port.yaml").read_text().rstrip())
        endpoints = (MANIFESTS_DIR / LAB_ENDPOINTS).read_text().splitlines()
        first_doc = endpoints.index("---") if "---" in endpoints else len(endpoints)
        self.out(f"\n$ head -n {first_doc} {MANIFESTS_DIR / LAB_ENDPOINTS}")
        self.out("\n".join(endpoints[:first_doc]))
        self.out(f"\n$ ls {self.node.manifests}")
        self.out("  ".join(sorted(p.name for p in self.node.manifests.iterdir())))
        self.node.start(wait_for="default/sticky: cluster IP")
        self.out(f"\nnode$ {self._daemon_command()} &")
        self.out("uproxy is ready (its /readyz answers 200: the first sync is applied)")

    def step_tables(self) -> None:
        self.heading("Services and endpoints, as uproxy sees them")
        self.explain(
            "The same tables `kubectl get services` and `kubectl get endpoints` print, read "
            "from the running uproxy's status API. Each Service has a virtual ClusterIP that "
            "no interface owns; its endpoints are the pods' real addresses.")
        self.uproxy_get("services")
        self.uproxy_get("endpoints")
        if self.nft:
            self.explain(
                "uproxy keeps its rules in its own nftables tables, `ip uproxy` and `ip6 "
                "uproxy`: one map, services, from address . protocol . port to the port of "
                "uproxy's socket, and one rule on each nat hook -- prerouting (traffic from "
                "pods and other hosts) and output (traffic from the node itself) -- that "
                "looks the first packet of a new connection up in it. A map lookup costs the "
                "same with 10 or 10,000 Services, where kube-proxy's iptables mode walks "
                "KUBE-SERVICES one rule per service port. Priority dstnat - 1 (-101) runs "
                "just before iptables' nat table and kube-proxy's:")
            self.show("node", "nft list table ip uproxy | grep -A2 'chain '")
        else:
            self.explain(
                "uproxy hooks one chain, UPROXY-SERVICES, into the nat table's PREROUTING "
                "(traffic from pods and other hosts) and OUTPUT (traffic from the node "
                "itself), where kube-proxy hooks KUBE-SERVICES:")
            self.show("node", "iptables-save -t nat | grep -- '-j UPROXY-SERVICES'")

    def step_multi_port(self) -> None:
        self.heading("A two-port service over two pods (seed 000: multi-port)")
        self.explain(
            ("One map element per service port (commented like kube-proxy's rules). "
             if self.nft else "One rule per service port. ") +
            "kube-proxy would jump from KUBE-SERVICES to a "
            "KUBE-SVC chain that picks a KUBE-SEP chain at random (statistic --probability "
            "0.5), which DNATs to one pod. uproxy instead REDIRECTs the ClusterIP:port to "
            "its own socket on the node and picks the pod itself, per connection.")
        self.show("node", self.rules_cmd("10.0.0.180"))
        self.explain(
            "Real traffic from the client: each HTTP request is a new connection and lands "
            "on either pod; the echo server answers with its pod name and port.")
        self.show("client", "for i in 1 2 3 4; do curl -s http://10.0.0.180:6789/; done")
        self.show("client", "for i in 1 2 3 4; do curl -s http://10.0.0.180:9876/; done")
        self.explain(
            "Note the \"client\" the pod sees: 172.17.0.1, the node. uproxy opens a new "
            "connection to the pod (a proxy), where kube-proxy's DNAT keeps the client's "
            "address (unless it has to masquerade). Counting 100 connections per port:")
        self.probe("10.0.0.180", 6789, count=100)
        self.probe("10.0.0.180", 9876, count=100)

    def step_scaling(self) -> None:
        self.heading("Scaling a service while it runs (seed 001: simpleservice)")
        self.explain(
            "namingthings/simpleservice sends port 80 to the app's port 9876 and has one "
            "endpoint, pod1 (172.17.0.2). Every connection goes there:")
        self.show("node", self.rules_cmd("simpleservice"))
        self.probe("10.0.0.155", 80, count=40)
        self.explain(
            "`kubectl scale --replicas=2` would start a second pod and the EndpointSlice "
            "controller would add it to the slice. Here we do the controller's part: add "
            "pod2 (172.17.0.3) to simpleservice's slice in lab-endpoints.yaml. uproxy "
            "notices the file changed and updates its endpoints without a restart:")
        docs = [d for d in yaml.safe_load_all((MANIFESTS_DIR / LAB_ENDPOINTS).read_text()) if d]
        for doc in docs:
            if doc["metadata"]["name"] == "simpleservice-lab":
                doc["endpoints"].append({"addresses": [self.lab.pod_ip(2)],
                                         "conditions": {"ready": True}})
                self.out("\n$ # simpleservice-lab endpoints are now:")
                self.out(yaml.safe_dump(doc["endpoints"], default_flow_style=None).rstrip())
        rules_before = self._rules_of("simpleservice")
        self.node.write(LAB_ENDPOINTS, *docs)
        self._wait_endpoints("simpleservice", f"{self.lab.pod_ip(2)}:9876")
        self.uproxy_get("endpoints")
        self.show("node", self.rules_cmd("simpleservice"))
        same = self._rules_of("simpleservice") == rules_before
        self.explain(
            "The redirect is " + ("exactly the same as before" if same else
                                         "different from before (unexpected!)") +
            ": kube-proxy would now add a second KUBE-SEP chain and a "
            "`statistic --mode random --probability 0.5` rule (see seed 001), while uproxy "
            "keeps one REDIRECT and changes only its own list of endpoints. The spread now:")
        self.probe("10.0.0.155", 80, count=40)

    def step_nodeport(self) -> None:
        self.heading("A NodePort service (seeds 002/004: k8s-nginx-node 80:32293)")
        self.explain(
            "A NodePort service is also a ClusterIP service, plus a port on every node "
            "address. kube-proxy DNATs that port from its KUBE-NODEPORTS chain; uproxy "
            "simply listens on it, so the only redirect is the ClusterIP one:")
        self.show("node", self.rules_cmd("k8s-nginx-node"))
        self.show("node", "ss -Hltnp 'sport = :32293'")
        self.explain(f"From the client, through the node's address {NODE_IP}; nginx in "
                     "pod3 and pod4 answers with its pod name:")
        self.show("client", f"curl -s http://{NODE_IP}:32293/")
        self.explain("Twenty requests, counted per answer:")
        self.show("client", f"for i in $(seq 20); do curl -s http://{NODE_IP}:32293/; done "
                            "| sort | uniq -c")

    def step_dns(self) -> None:
        self.heading("A DNS service on UDP 53 with three endpoints (seed 003: kube-dns)")
        self.explain(
            "kube-system/kube-dns at 10.0.0.10 has a UDP port (dns) and a TCP port "
            "(dns-tcp) over three dnsmasq pods. kube-proxy spreads it with probabilities "
            "0.333 and 0.5 over three KUBE-SEP chains; uproxy keeps one UDP socket per "
            "service port, a flow per client address and port, and answers from the socket "
            "the query arrived on, so the reply comes back from 10.0.0.10.")
        self.show("node", self.rules_cmd("kube-dns"))
        self.show("client",
                  "dig @10.0.0.10 +short +time=2 +tries=1 k8s-nginx-node.default.svc.cluster.local")
        self.show("client", "curl -s http://10.0.0.157/")
        self.explain(
            "Each dnsmasq pod answers the TXT record whoami.uproxy.test with its own name. "
            "Every dig uses a new source port, so every query is a new flow; thirty of them, "
            "counted per answer:")
        self.show("client", "dig @10.0.0.10 +short +time=2 +tries=1 whoami.uproxy.test TXT")
        self.show("client", "for i in $(seq 30); do "
                            "dig @10.0.0.10 +short +time=2 +tries=1 whoami.uproxy.test TXT; done "
                            "| sort | uniq -c")
        self.show("client", "dig +tcp @10.0.0.10 +short +time=2 +tries=1 "
                            "multi-port.default.svc.cluster.local")
        self.explain(
            "kube-dns is dual-stack (ipFamilyPolicy: PreferDualStack): its second ClusterIP "
            "fd00:96::10 is served over IPv6 with the same kind of rule ("
            + ("in the ip6 uproxy table" if self.nft else "by ip6tables") + "), and "
            "chooses among the pods' IPv6 endpoints. dig accepts only replies from the "
            "address it asked, so these answers also show that replies leave from "
            "fd00:96::10 (IPV6_PKTINFO):")
        self.show("node", self.rules_cmd("kube-dns", family=6))
        self.show("client", "for i in $(seq 30); do "
                            "dig @fd00:96::10 +short +time=2 +tries=1 whoami.uproxy.test TXT; "
                            "done | sort | uniq -c")
        self.show("client", "dig +tcp @fd00:96::10 +short +time=2 +tries=1 "
                            "multi-port.default.svc.cluster.local")

    def step_affinity(self) -> None:
        self.heading("Session affinity: ClientIP (default/sticky)")
        self.explain(
            "With sessionAffinity: ClientIP every connection from one client address goes to "
            "the same pod while the client keeps using it (3 h idle by default). kube-proxy "
            "does it with `-m recent --rcheck --seconds 10800` rules in the KUBE-SVC chain "
            "(and `-m recent --set` in each KUBE-SEP chain); uproxy keeps a table of client "
            "address -> pod. The rule is a plain REDIRECT again:")
        self.show("node", self.rules_cmd("sticky"))
        self.probe("10.0.0.176", 80, count=20)
        self.explain("Other client addresses (added to the client namespace) each stick to "
                     "their own choice:")
        for ip in AFFINITY_CLIENTS:
            self.lab.add_client_ip(ip)
        for ip in AFFINITY_CLIENTS:
            self.probe("10.0.0.176", 80, count=5, source_ip=ip)

    # ------------------------------------------------------------- after steps
    def status_hint(self, *, forwarded: tuple[str, int] | None) -> None:
        self.heading("The status page")
        self.explain(
            f"uproxy serves its status page, JSON API and metrics on {STATUS_URL}, the node's "
            "address facing the client, inside the lab. From the client namespace:")
        self.out(f"\n  sudo ip netns exec {self.lab.client} curl -s {STATUS_URL}/api/v1/services")
        if forwarded is None:
            self.out("\n(--once: the walkthrough ends here and the lab is removed)")
            return
        host, port = forwarded
        url = f"http://{host}:{port}/"
        self.explain(
            "While the demo runs, it is also forwarded to this machine's loopback, so a "
            "browser here can open it (the live connection table fills as you send traffic):")
        self.out(f"\n  {url}")
        self.out(f"  uproxy get connections --status http://{host}:{port}")
        self.out(f"  sudo ip netns exec {self.lab.client} curl -s http://10.0.0.180:6789/")
        self.out("\nPress Ctrl-C to stop; the lab and its rules are removed on exit.")

    def keep_running(self) -> None:
        forwarded = self.start_forwarder()
        self.status_hint(forwarded=forwarded)
        while True:
            proc = self.node.proc
            if proc is not None and proc.poll() is not None:
                raise LabError(f"uproxy exited with status {proc.returncode}")
            time.sleep(0.5)

    def start_forwarder(self) -> tuple[str, int]:
        """Listen on the host's loopback; a child in the node namespace connects to uproxy."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind(HOST_FORWARD)
            except OSError:  # 10249 is taken (e.g. a uproxy on this host): any free port
                listener.bind((HOST_FORWARD[0], 0))
            listener.listen(64)
            host, port = listener.getsockname()[:2]
            fd = listener.fileno()
            with open(self.lab.workdir / "forward.log", "ab") as log:
                self.forwarder = subprocess.Popen(
                    ["ip", "netns", "exec", self.lab.node, sys.executable, "-m",
                     "uproxy.demo.walkthrough", "forward", "--fd", str(fd),
                     "--to", f"{NODE_IP}:{STATUS_PORT}"],
                    pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            listener.close()  # the child holds its own copy
        return str(host), int(port)

    def stop(self) -> None:
        """Stop the forwarder and uproxy (which removes its rules); the lab goes next."""
        if self.forwarder is not None and self.forwarder.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.forwarder.pid, signal.SIGTERM)
            try:
                self.forwarder.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.forwarder.pid, signal.SIGKILL)
                self.forwarder.wait()
        if self.node.proc is not None and self.node.proc.poll() is None:
            self.node.stop()

    def report_teardown(self) -> None:
        left = [ns for ns in _netns_names() if ns.startswith(self.lab.prefix)]
        self.out(f"\nlab {self.lab.prefix} removed: "
                 + ("no namespace left" if not left else f"STILL THERE: {' '.join(left)}"))

    # ---------------------------------------------------------------- helpers
    def _daemon_command(self) -> str:
        """The running daemon's real command line, with ``uproxy`` for ``python -m uproxy``."""
        assert self.node.proc is not None
        try:
            raw = Path(f"/proc/{self.node.proc.pid}/cmdline").read_bytes()
        except OSError:
            return "uproxy run ..."
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if "run" not in argv:
            return shlex.join(argv)
        flags = argv[argv.index("run") + 1:]
        # Every flag here takes a value and the last one wins: show each once.
        last: dict[str, str] = {}
        for flag, value in zip(flags[::2], flags[1::2], strict=False):
            last.pop(flag, None)
            last[flag] = value
        return shlex.join(["uproxy", "run", *[x for kv in last.items() for x in kv]])

    def _rules_of(self, name: str) -> list[str]:
        return [line for line in self.node.rules_text().splitlines() if name in line]

    @property
    def nft(self) -> bool:
        """The daemon intercepts with its nftables map (its default where nft works)."""
        return self.node.interception == "nftables"

    def rules_cmd(self, pattern: str, *, family: int = 4) -> str:
        """The command that shows the redirects of ``pattern`` (nft or iptables-save)."""
        if self.nft:
            return f"nft list table {'ip6' if family == 6 else 'ip'} uproxy | grep {pattern}"
        return f"{'ip6tables' if family == 6 else 'iptables'}-save | grep {pattern}"

    def _wait_endpoints(self, name: str, address: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.lab.run("node", ["curl", "-sf", "-m", "2",
                                         f"{STATUS_URL}/api/v1/endpoints"], check=False)
            if proc.returncode == 0 and _has_endpoint(proc.stdout, name, address):
                return
            if time.monotonic() > deadline:
                raise LabError(f"uproxy did not pick up {address} for {name} in {timeout:g}s")
            time.sleep(0.1)


def _has_endpoint(api_text: str, name: str, address: str) -> bool:
    try:
        data = json.loads(api_text)
    except json.JSONDecodeError:
        return False
    items: list[dict[str, Any]] = data.get("items", []) if isinstance(data, dict) else []
    return any(item.get("name") == name and address in json.dumps(item) for item in items)


def _netns_names() -> list[str]:
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10,
                          check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


# ------------------------------------------------------------------------ forwarder
async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        pass


async def forward(listen_fd: int, host: str, port: int) -> None:
    """Accept on an inherited listening socket; relay each connection to ``host:port``."""
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(False)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                up_reader, up_writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(handle, sock=listener)
    async with server:
        await stop.wait()


def _forward_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m uproxy.demo.walkthrough forward",
                                description="the demo's status page forwarder (internal)")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--to", required=True, metavar="HOST:PORT")
    args = p.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    asyncio.run(forward(args.fd, host, int(port)))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["forward"]:
        sys.exit(_forward_main(sys.argv[2:]))
    print("usage: uproxy demo [--once]  (this module's own entry point is internal)",
          file=sys.stderr)
    sys.exit(2)
