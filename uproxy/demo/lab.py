"""The network-namespace lab: a client, a node and N pods, with nothing in the root namespace.

Topology (all names unique per run, interface names generic inside each namespace)::

    client ns (eth0 10.99.0.2) --veth-- node ns (vc0 10.99.0.1, br0 172.17.0.1, svc0)
                                            +--bridge br0-- pod ns i (eth0 172.17.0.{i+1})

Every link is dual-stack: the same shape over IPv6 unique local addresses
(client ``fd00:99::2``, node ``fd00:99::1`` and ``fd00:17::1``, pod i
``fd00:17::{i+1:x}``; IPv6 ClusterIPs come from ``fd00:96::/112``), with
duplicate address detection off so every address is usable at once.

Why it is shaped this way:

- Plain ``ip`` commands through :mod:`subprocess`, synchronous, so pytest fixtures,
  the demo and the benchmark can all call it from anywhere (async code uses
  :func:`asyncio.to_thread`). Every command has a bounded timeout and fails with
  the command's stderr in one line.
- Veth pairs are created directly inside the namespaces (``ip -n NODE link add vp1
  type veth peer name eth0 netns POD``), so the root namespace never holds a lab
  interface, and deleting the namespaces deletes the whole lab.
- The node has no route to the real network: only a ``default`` route (one per
  family) on ``svc0``,
  a dummy interface (an ``ifb`` one where the kernel lacks ``dummy``) that drops
  what it is given. It exists so that connections from the node itself to a
  ClusterIP find a route and reach the ``OUTPUT`` nat hook, where uproxy redirects
  them. Pods and the client route everything via the node, so nothing leaves.
- Namespace names start with ``upl<pid>x``: a later run recognises labs whose owner
  is dead (a killed test run) and removes them (:func:`remove_stale_labs`).
- Every process the lab starts is tracked (own process group, log file in the lab
  temp dir) and killed at teardown; anything else still running in a lab namespace
  is killed too before the namespaces are deleted. Teardown is idempotent and runs
  on exceptions, Ctrl-C (via the context manager) and SIGTERM
  (:func:`install_signal_teardown`).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

SERVICE_CIDR = "10.0.0.0/24"
"""Virtual ClusterIP range: no address of it is assigned anywhere."""
BRIDGE_IP = "172.17.0.1"
"""The node's address on the pod bridge (pods' default gateway)."""
POD_PREFIXLEN = 24
NODE_IP = "10.99.0.1"
"""The node's address facing the client (NodePorts are reached here)."""
CLIENT_IP = "10.99.0.2"
CLIENT_PREFIXLEN = 24
SERVICE_CIDR6 = "fd00:96::/112"
"""Virtual IPv6 ClusterIP range."""
BRIDGE_IP6 = "fd00:17::1"
POD_PREFIXLEN6 = 64
NODE_IP6 = "fd00:99::1"
CLIENT_IP6 = "fd00:99::2"
CLIENT_PREFIXLEN6 = 64
NAME_PREFIX = "upl"
"""Every lab namespace name starts with ``upl<pid>x``."""
MAX_PODS = 200

_STALE_RE = re.compile(rf"^{NAME_PREFIX}(\d+)x")
_HINT_RE = re.compile(r"[^a-z0-9]")


class LabError(RuntimeError):
    """A lab command failed or timed out; the message names the command and its stderr."""


def pod_ip(index: int) -> str:
    """Address of pod ``index`` (1-based): 172.17.0.{index+1}."""
    if not 1 <= index <= MAX_PODS:
        raise ValueError(f"pod index {index} out of range 1..{MAX_PODS}")
    return str(ipaddress.IPv4Address(BRIDGE_IP) + index)


def pod_ip6(index: int) -> str:
    """IPv6 address of pod ``index`` (1-based): fd00:17::{index+1:x}."""
    if not 1 <= index <= MAX_PODS:
        raise ValueError(f"pod index {index} out of range 1..{MAX_PODS}")
    return str(ipaddress.IPv6Address(BRIDGE_IP6) + index)


def _run_root(argv: Sequence[str], *, timeout: float = 10.0, check: bool = True,
              input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command in the current (root) namespace, e.g. ``ip -n NS ...``."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout:g}s: {' '.join(argv)}") from exc
    except FileNotFoundError as exc:
        raise LabError(f"command not found: {argv[0]}") from exc
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().replace("\n", " | ")
        raise LabError(f"exit {proc.returncode}: {' '.join(argv)}: {err}")
    return proc


def _list_netns() -> list[str]:
    out = _run_root(["ip", "netns", "list"]).stdout
    # lines look like "name" or "name (id: 3)"
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(name: str) -> list[int]:
    proc = _run_root(["ip", "netns", "pids", name], check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_processes(name: str, *, grace: float = 1.0) -> None:
    """SIGTERM everything running in namespace ``name``, SIGKILL what is left after ``grace``."""
    pids = _netns_pids(name)
    if not pids:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _netns_pids(name):
            return
        time.sleep(0.02)
    for pid in _netns_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # reaping is the parent's business; SIGKILL takes effect promptly
    deadline = time.monotonic() + 2.0
    while _netns_pids(name) and time.monotonic() < deadline:
        time.sleep(0.02)


def _delete_netns(name: str) -> None:
    _kill_netns_processes(name)
    _run_root(["ip", "netns", "del", name], check=False)


def remove_stale_labs() -> list[str]:
    """Delete lab namespaces (and temp dirs) whose owning process is dead; return their names.

    A namespace belongs to a lab when its name starts with ``upl<pid>x``; if ``pid``
    no longer exists, the lab was left behind by a killed run. Processes still
    running inside it are killed first.
    """
    removed: list[str] = []
    for name in _list_netns():
        m = _STALE_RE.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        _delete_netns(name)
        removed.append(name)
    tmp = Path(tempfile.gettempdir())
    for path in tmp.glob(f"{NAME_PREFIX}*x*"):
        m = _STALE_RE.match(path.name)
        if m is not None and path.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
    return removed


_svc_dev_kind: str | None = None
_IPV6_SYSCTLS = (
    "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
    "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
)


class Lab:
    """A running lab. Build one with :meth:`Lab.create`; always :meth:`teardown` it.

    ``ns`` arguments accept a full namespace name or a role: ``"node"``,
    ``"client"``, ``"pod1"``..``"podN"``.
    """

    def __init__(self, *, prefix: str, pods: int, workdir: Path) -> None:
        self.prefix = prefix
        self.pods = pods
        self.workdir = workdir
        self.node = f"{prefix}-node"
        self.client = f"{prefix}-client"
        self.pod_namespaces = [f"{prefix}-pod{i}" for i in range(1, pods + 1)]
        self._created: list[str] = []
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._torn_down = False

    # ------------------------------------------------------------------ build
    @classmethod
    def create(cls, pods: int = 3, name_hint: str | None = None) -> Lab:
        """Remove stale labs, then build a new one with ``pods`` pod namespaces."""
        if not 1 <= pods <= MAX_PODS:
            raise ValueError(f"pods must be within 1..{MAX_PODS}, got {pods}")
        if shutil.which("ip") is None:
            raise LabError("the 'ip' command (iproute2) is not installed")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces)")
        remove_stale_labs()
        prefix = f"{NAME_PREFIX}{os.getpid()}x{secrets.token_hex(2)}"
        if name_hint:
            hint = _HINT_RE.sub("", name_hint.lower())[:12]
            if hint:
                prefix = f"{prefix}-{hint}"
        workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
        lab = cls(prefix=prefix, pods=pods, workdir=workdir)
        atexit.register(lab.teardown)
        try:
            lab._build()
        except BaseException:
            lab.teardown()
            raise
        return lab

    def _ip(self, *args: str) -> None:
        _run_root(["ip", *args])

    def _build(self) -> None:
        for name in (self.node, self.client, *self.pod_namespaces):
            self._ip("netns", "add", name)
            self._created.append(name)
            # IPv6 on, and no duplicate address detection: links created after this
            # inherit "default", so every address is usable the moment it is added.
            self.run(name, ["sysctl", "-qw", *_IPV6_SYSCTLS])
            self._ip("-n", name, "link", "set", "lo", "up")
        node = self.node
        self._ip("-n", node, "link", "add", "br0", "type", "bridge")
        self._ip("-n", node, "addr", "add", f"{BRIDGE_IP}/{POD_PREFIXLEN}", "dev", "br0")
        self._ip("-n", node, "-6", "addr", "add", f"{BRIDGE_IP6}/{POD_PREFIXLEN6}", "dev",
                 "br0", "nodad")
        self._ip("-n", node, "link", "set", "br0", "up")
        for i, pod in enumerate(self.pod_namespaces, start=1):
            vp = f"vp{i}"
            self._ip("-n", node, "link", "add", vp, "type", "veth", "peer", "name", "eth0",
                     "netns", pod)
            self._ip("-n", node, "link", "set", vp, "master", "br0", "up")
            self._ip("-n", pod, "addr", "add", f"{pod_ip(i)}/{POD_PREFIXLEN}", "dev", "eth0")
            self._ip("-n", pod, "-6", "addr", "add", f"{pod_ip6(i)}/{POD_PREFIXLEN6}", "dev",
                     "eth0", "nodad")
            self._ip("-n", pod, "link", "set", "eth0", "up")
            self._ip("-n", pod, "route", "add", "default", "via", BRIDGE_IP)
            self._ip("-n", pod, "-6", "route", "add", "default", "via", BRIDGE_IP6)
        self._ip("-n", node, "link", "add", "vc0", "type", "veth", "peer", "name", "eth0",
                 "netns", self.client)
        self._ip("-n", node, "addr", "add", f"{NODE_IP}/{CLIENT_PREFIXLEN}", "dev", "vc0")
        self._ip("-n", node, "-6", "addr", "add", f"{NODE_IP6}/{CLIENT_PREFIXLEN6}", "dev",
                 "vc0", "nodad")
        self._ip("-n", node, "link", "set", "vc0", "up")
        self._ip("-n", self.client, "addr", "add", f"{CLIENT_IP}/{CLIENT_PREFIXLEN}",
                 "dev", "eth0")
        self._ip("-n", self.client, "-6", "addr", "add", f"{CLIENT_IP6}/{CLIENT_PREFIXLEN6}",
                 "dev", "eth0", "nodad")
        self._ip("-n", self.client, "link", "set", "eth0", "up")
        self._ip("-n", self.client, "route", "add", "default", "via", NODE_IP)
        self._ip("-n", self.client, "-6", "route", "add", "default", "via", NODE_IP6)
        self._add_svc_dev()
        self._ip("-n", node, "link", "set", "svc0", "up")
        self._ip("-n", node, "route", "add", "default", "dev", "svc0")
        self._ip("-n", node, "-6", "route", "add", "default", "dev", "svc0")
        self.run(node, ["sysctl", "-qw", "net.ipv4.ip_forward=1",
                        "net.ipv6.conf.all.forwarding=1"])

    def _add_svc_dev(self) -> None:
        """A sink interface: ``dummy`` if the kernel has it, else ``ifb`` (drops all it sends)."""
        global _svc_dev_kind
        kinds = [_svc_dev_kind] if _svc_dev_kind else ["dummy", "ifb"]
        errors = []
        for kind in kinds:
            try:
                self._ip("-n", self.node, "link", "add", "svc0", "type", kind)
            except LabError as exc:
                errors.append(str(exc))
                continue
            _svc_dev_kind = kind
            return
        raise LabError("cannot create the node's svc0 sink interface: " + "; ".join(errors))

    # ------------------------------------------------------------- addresses
    @property
    def node_ip(self) -> str:
        return NODE_IP

    @property
    def client_ip(self) -> str:
        return CLIENT_IP

    @property
    def bridge_ip(self) -> str:
        return BRIDGE_IP

    @property
    def service_cidr(self) -> str:
        return SERVICE_CIDR

    @property
    def node_ip6(self) -> str:
        return NODE_IP6

    @property
    def client_ip6(self) -> str:
        return CLIENT_IP6

    @property
    def bridge_ip6(self) -> str:
        return BRIDGE_IP6

    @property
    def service_cidr6(self) -> str:
        return SERVICE_CIDR6

    def pod_ip6(self, index: int) -> str:
        """IPv6 address of pod ``index`` (1-based)."""
        self._check_pod(index)
        return pod_ip6(index)

    @property
    def pod_ips6(self) -> list[str]:
        """IPv6 addresses of all pods, in order."""
        return [pod_ip6(i) for i in range(1, self.pods + 1)]

    def pod_ip(self, index: int) -> str:
        """Address of pod ``index`` (1-based)."""
        self._check_pod(index)
        return pod_ip(index)

    def pod_ns(self, index: int) -> str:
        """Namespace name of pod ``index`` (1-based)."""
        self._check_pod(index)
        return self.pod_namespaces[index - 1]

    @property
    def pod_ips(self) -> list[str]:
        """Addresses of all pods, in order."""
        return [pod_ip(i) for i in range(1, self.pods + 1)]

    def add_client_ip(self, ip: str) -> None:
        """Give the client one more address in 10.99.0.0/24 or fd00:99::/64 (e.g. for
        ClientIP affinity)."""
        extra: tuple[str, ...] = ()
        if ":" in ip:
            base, plen, extra = CLIENT_IP6, CLIENT_PREFIXLEN6, ("nodad",)
        else:
            base, plen = CLIENT_IP, CLIENT_PREFIXLEN
        if ipaddress.ip_address(ip) not in ipaddress.ip_network(f"{base}/{plen}", strict=False):
            raise ValueError(f"{ip} is outside the client subnet of {base}/{plen}")
        self._ip("-n", self.client, "addr", "add", f"{ip}/{plen}", "dev", "eth0", *extra)

    @property
    def pod_names(self) -> list[str]:
        """Short pod names, ``["pod1", ...]`` (what the helpers answer with by default)."""
        return [f"pod{i}" for i in range(1, self.pods + 1)]

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this lab (node, client, pods)."""
        return [self.node, self.client, *self.pod_namespaces]

    def _check_pod(self, index: int) -> None:
        if not 1 <= index <= self.pods:
            raise ValueError(f"pod index {index} out of range 1..{self.pods}")

    def resolve(self, ns: str) -> str:
        """Full namespace name for a role (``node``/``client``/``podN``) or a full name."""
        if ns in self.namespaces:
            return ns
        full = f"{self.prefix}-{ns}"
        if full in self.namespaces:
            return full
        raise ValueError(f"{ns!r} is not a namespace of lab {self.prefix}")

    # -------------------------------------------------------------- commands
    def run(self, ns: str, argv: Sequence[str], timeout: float = 10.0, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside namespace ``ns`` and wait (bounded by ``timeout``)."""
        return _run_root(["ip", "netns", "exec", self.resolve(ns), *argv],
                         timeout=timeout, check=check, input=input)

    def spawn(self, ns: str, argv: Sequence[str], log_name: str, *,
              env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``ns`` in the background; tracked and killed at teardown.

        stdout and stderr go to ``<workdir>/<log_name>.log`` (see :meth:`logs`).
        ``env`` entries are added to the current environment; ``cwd``: its directory.
        """
        if self._torn_down:
            raise LabError(f"lab {self.prefix} is torn down")
        full_env = None if env is None else {**os.environ, **env}
        log_path = self.workdir / f"{log_name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.resolve(ns), *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=full_env, cwd=cwd,
            )
        self._procs.append((log_name, proc))
        return proc

    def log(self, log_name: str) -> str:
        """Text of one log written by :meth:`spawn` (empty if none)."""
        path = self.workdir / f"{log_name}.log"
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self) -> str:
        """All logs of spawned processes, each under a ``==> name <==`` header."""
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            parts.append(f"==> {path.stem} <==\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def wait_port(self, ns: str, ip: str, port: int, proto: str = "tcp", timeout: float = 5,
                  *, proc: subprocess.Popen[bytes] | None = None, exact: bool = False) -> None:
        """Poll ``ss`` in ``ns`` until a socket listens on ``ip:port`` (or a wildcard).

        Never connects. With ``proc``, the listening socket must belong to that
        process (so an older listener on the port does not count), and if the
        process exits first this fails at once with its log. With ``exact``, only a
        socket on ``ip`` itself counts (``::`` then means the IPv6 wildcard only).
        """
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be tcp or udp, got {proto!r}")
        flag = ("-Hltn" if proto == "tcp" else "-Hlun") + ("p" if proc is not None else "")
        wanted = {ip, f"[{ip}]"} if exact else {ip, f"[{ip}]", "0.0.0.0", "*", "[::]", "::"}
        owner = f"pid={proc.pid}," if proc is not None else ""
        deadline = time.monotonic() + timeout
        while True:
            out = self.run(ns, ["ss", flag, "sport", "=", f":{port}"]).stdout
            for line in out.splitlines():
                cols = line.split()
                if len(cols) < 4:
                    continue
                host, _, _port = cols[3].rpartition(":")
                if host.split("%", 1)[0] in wanted and owner in line:
                    return
            if proc is not None and proc.poll() is not None:
                name = next((n for n, p in self._procs if p is proc), "")
                raise LabError(f"process exited ({proc.returncode}) before listening on "
                               f"{proto} {ip}:{port} in {ns}: {self.log(name).strip()[-2000:]}")
            if time.monotonic() > deadline:
                raise LabError(f"nothing listens on {proto} {ip}:{port} in {ns} "
                               f"after {timeout:g}s")
            time.sleep(0.02)

    # --------------------------------------------------------------- backends
    def start_echo(self, pod: int, tcp_ports: Iterable[int] = (), udp_ports: Iterable[int] = (),
                   name: str | None = None) -> subprocess.Popen[bytes]:
        """Start :mod:`uproxy.demo.echo` in pod ``pod`` (1-based) on both families; returns
        once listening."""
        tcp, udp = list(tcp_ports), list(udp_ports)
        if not tcp and not udp:
            raise ValueError("start_echo needs at least one TCP or UDP port")
        ns, ip = self.pod_ns(pod), self.pod_ip(pod)
        name = name or f"pod{pod}"
        argv = [sys.executable, "-m", "uproxy.demo.echo", "--name", name, "--bind", "0.0.0.0",
                "--bind", "::"]
        for p in tcp:
            argv += ["--tcp", str(p)]
        for p in udp:
            argv += ["--udp", str(p)]
        proc = self.spawn(ns, argv, f"echo-pod{pod}-{secrets.token_hex(2)}")
        for p in tcp:
            self.wait_port(ns, ip, p, "tcp", proc=proc)
            self.wait_port(ns, "::", p, "tcp", proc=proc, exact=True)
        for p in udp:
            self.wait_port(ns, ip, p, "udp", proc=proc)
            self.wait_port(ns, "::", p, "udp", proc=proc, exact=True)
        return proc

    def start_nginx(self, pod: int, port: int = 80, *,
                    workers: int = 1) -> subprocess.Popen[bytes]:
        """Start nginx in pod ``pod``: any path answers 200 ``pod<N>``; returns once listening."""
        ns, ip, name = self.pod_ns(pod), self.pod_ip(pod), f"pod{pod}"
        d = self.workdir / f"nginx-pod{pod}-{port}"
        d.mkdir()
        conf = d / "nginx.conf"
        conf.write_text(
            "daemon off;\n"
            "user root root;\n"
            f"worker_processes {workers};\n"
            "worker_rlimit_nofile 65536;\n"
            f"pid {d}/nginx.pid;\n"
            f"error_log {d}/error.log warn;\n"
            "events { worker_connections 16384; }\n"
            "http {\n"
            "  access_log off;\n"
            f"  client_body_temp_path {d}/body;\n"
            f"  proxy_temp_path {d}/proxy;\n"
            f"  fastcgi_temp_path {d}/fastcgi;\n"
            f"  uwsgi_temp_path {d}/uwsgi;\n"
            f"  scgi_temp_path {d}/scgi;\n"
            "  keepalive_requests 1000000;\n"
            "  server {\n"
            f"    listen {ip}:{port} backlog=4096;\n"
            f"    listen [{pod_ip6(pod)}]:{port} backlog=4096;\n"
            "    location / {\n"
            "      default_type text/plain;\n"
            f'      return 200 "{name}\\n";\n'
            "    }\n"
            "  }\n"
            "}\n"
        )
        proc = self.spawn(ns, ["nginx", "-p", str(d), "-e", f"{d}/error.log", "-c", str(conf)],
                          f"nginx-pod{pod}-{port}")
        try:
            self.wait_port(ns, ip, port, "tcp", proc=proc)
        except LabError as exc:
            err = (d / "error.log").read_text(errors="replace") if (d / "error.log").exists() \
                else ""
            raise LabError(f"{exc} {err.strip()[-1000:]}") from exc
        return proc

    def start_dnsmasq(self, pod: int, records: Mapping[str, str] | None = None,
                      port: int = 53) -> subprocess.Popen[bytes]:
        """Start dnsmasq in pod ``pod`` (both families) serving ``records`` (name -> IPv4)
        and TXT whoami.

        ``whoami.uproxy.test`` answers a TXT record with the pod's short name.
        """
        ns, ip, name = self.pod_ns(pod), self.pod_ip(pod), f"pod{pod}"
        records = {"name.example": "1.2.3.4"} if records is None else records
        pidfile = self.workdir / f"dnsmasq-pod{pod}-{port}.pid"
        argv = [
            "dnsmasq", "--no-daemon", "--keep-in-foreground", "--conf-file=/dev/null",
            "--no-resolv", "--no-hosts", "--bind-interfaces", f"--listen-address={ip}",
            f"--listen-address={pod_ip6(pod)}",
            f"--port={port}", "--user=root", "--group=root", f"--pid-file={pidfile}",
            f"--txt-record=whoami.uproxy.test,{name}",
        ]
        for host, addr in records.items():
            argv.append(f"--address=/{host}/{addr}")
        proc = self.spawn(ns, argv, f"dnsmasq-pod{pod}-{port}")
        self.wait_port(ns, ip, port, "udp", proc=proc)
        return proc

    def probe(self, *args: str, ns: str = "client", timeout: float = 60.0) -> dict[str, Any]:
        """Run ``python -m uproxy.demo.probe ARGS`` in ``ns`` and return its JSON line."""
        proc = self.run(ns, [sys.executable, "-m", "uproxy.demo.probe", *args],
                        timeout=timeout, check=False)
        lines = proc.stdout.strip().splitlines()
        if not lines:
            raise LabError(f"probe {' '.join(args)} printed nothing (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    # --------------------------------------------------------------- teardown
    def teardown(self) -> None:
        """Kill every lab process, delete every lab namespace and the temp dir. Idempotent."""
        if self._torn_down:
            return
        # Items are popped as they are handled, so a re-entrant call (SIGTERM during
        # teardown) finishes the remaining work instead of repeating it.
        procs = self._procs
        for _, proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        while procs:
            _, proc = procs[-1]
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            else:  # the group may still hold children (e.g. nginx workers)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            procs.pop()
        while self._created:
            _delete_netns(self._created[-1])
            self._created.pop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._torn_down = True
        atexit.unregister(self.teardown)

    @property
    def torn_down(self) -> bool:
        return self._torn_down

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.teardown()

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} pods={self.pods}{' torn down' if self._torn_down else ''}>"


def terminate(proc: subprocess.Popen[Any], grace: float) -> int:
    """SIGTERM ``proc`` if it still runs, SIGKILL it after ``grace`` s; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


def install_signal_teardown(lab: Lab) -> Callable[[], None]:
    """Make SIGTERM (and SIGHUP) tear ``lab`` down and exit 128+signum; returns an undo.

    Must be called from the main thread. Ctrl-C needs nothing: KeyboardInterrupt
    passes through the ``with`` block, which tears down.
    """
    signums = (signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.getsignal(s) for s in signums}

    def handler(signum: int, frame: FrameType | None) -> None:
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        lab.teardown()
        raise SystemExit(128 + signum)

    for s in signums:
        signal.signal(s, handler)

    def undo() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return undo
