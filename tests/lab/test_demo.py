"""``uproxy demo`` for real: the walkthrough as a subprocess, as a newcomer runs it.

The output is read like a user reads it: the tables, the rules with their
comments, traffic that reached every backend, the DNS answers, the scaling
change. Afterwards nothing of the demo is left: no namespace, no uproxy rule
in the root namespace, no listener on the loopback forward. The keep-running
mode is driven like a user does: open the forwarded status page, press
Ctrl-C (SIGINT); and SIGTERM in the middle of the walkthrough.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from uproxy.demo.lab import terminate
from uproxy.demo.walkthrough import REQUIRED_TOOLS, requirements_problem

pytestmark = pytest.mark.lab

DEMO = [sys.executable, "-m", "uproxy", "demo"]
PREFIX_RE = re.compile(r"\b(upl\d+x[0-9a-f]+-demo)-pod1\b")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the demo tests need root (run the lab tests as root, as CI does)",
                    pytrace=False)


def netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_uproxy_rules() -> list[str]:
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True,
                         timeout=10).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                            timeout=10).stdout if shutil.which("nft") else ""
    return [line for line in out.splitlines() if "UPROXY" in line] + [
        line for line in tables.splitlines() if line.split()[-1:] == ["uproxy"]]


def assert_gone(output: str, pid: int) -> None:
    """No namespace of the demo run ``pid`` is left, nor a uproxy rule in the root namespace.

    Lab namespaces are named ``upl<pid>x...`` after the process that built them.
    """
    m = PREFIX_RE.search(output)
    assert m is not None and m.group(1).startswith(f"upl{pid}x"), output[-2000:]
    assert {ns for ns in netns() if ns.startswith(f"upl{pid}x")} == set()
    assert root_uproxy_rules() == []


def probes(output: str) -> list[tuple[str, dict[str, Any]]]:
    """(command, JSON result) of every probe the walkthrough ran from the client."""
    lines = output.splitlines()
    found = []
    for i, line in enumerate(lines[:-1]):
        if line.startswith("client$ python -m uproxy.demo.probe "):
            found.append((line.split("$ ", 1)[1], json.loads(lines[i + 1])))
    return found


def block_after(output: str, command_start: str) -> str:
    """The output printed right after the first command line that starts with this text."""
    _, _, rest = output.partition(command_start)
    assert rest, f"{command_start!r} not in the output"
    return rest.split("\n\n", 1)[0]


def uniq_counts(block: str) -> Counter[str]:
    return Counter({m.group(2).strip('"'): int(m.group(1))
                    for m in re.finditer(r"^\s+(\d+) (\S+)$", block, flags=re.M)})


def test_demo_once_walks_through_every_step_for_real() -> None:
    require_root()
    with subprocess.Popen([*DEMO, "--once"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, stdin=subprocess.DEVNULL) as proc:
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.terminate()
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"

    # The tables, from the running daemon.
    assert re.search(r"NAME\s+TYPE\s+CLUSTER-IP\s+EXTERNAL-IP\s+PORT\(S\)\s+AGE", out)
    assert re.search(r"multi-port\s+ClusterIP\s+10\.0\.0\.180\s+<none>\s+6789/TCP,9876/TCP", out)
    assert re.search(r"k8s-nginx-node\s+NodePort\s+10\.0\.0\.157\s+<none>\s+80:32293/TCP", out)
    assert re.search(r"NAME\s+ENDPOINTS\s+AGE", out)

    # The redirects with kube-proxy-style comments, one per service port: map elements of
    # uproxy's nftables table (the default where nft works), else REDIRECT rules.
    nft = "node$ nft list table ip uproxy | grep " in out
    assert nft == (shutil.which("nft") is not None), out[:3000]
    if nft:
        assert "hook prerouting priority dstnat - 1" in out and "map @services" in out
        redirects = [
            f'--comment "{m[4]}" -d {m[1]}/{128 if ":" in m[1] else 32} -p {m[2]}'
            for m in re.finditer(r'([0-9a-fA-F:.]+) \. (tcp|udp) \. (\d+) comment "([^"]*)" '
                                 r': \d+', out)]
    else:
        redirects = [line for line in out.splitlines() if line.startswith("-A UPROXY-SERVICES")
                     and "-j REDIRECT --to-ports" in line]
    for comment, dest in [
        ("default/multi-port:port1 cluster IP", "-d 10.0.0.180/32 -p tcp"),
        ("default/multi-port:port2 cluster IP", "-d 10.0.0.180/32 -p tcp"),
        ("namingthings/simpleservice: cluster IP", "-d 10.0.0.155/32 -p tcp"),
        ("default/k8s-nginx-node: cluster IP", "-d 10.0.0.157/32 -p tcp"),
        ("kube-system/kube-dns:dns cluster IP", "-d 10.0.0.10/32 -p udp"),
        ("kube-system/kube-dns:dns-tcp cluster IP", "-d 10.0.0.10/32 -p tcp"),
        ("default/sticky: cluster IP", "-d 10.0.0.176/32 -p tcp"),
    ]:
        assert any(f'--comment "{comment}"' in r and dest in r for r in redirects), \
            (comment, redirects)

    # Traffic reached every backend: echo pods through multi-port...
    results = probes(out)
    for port in (6789, 9876):
        (multi,) = [r for c, r in results if f"10.0.0.180 {port} " in c]
        assert set(multi["counts"]) == {"pod1", "pod2"}, multi
        assert sum(multi["counts"].values()) == 100 and sum(multi["errors"].values()) == 0
    # ... nginx pods through the NodePort ...
    nginx = uniq_counts(block_after(out, "client$ for i in $(seq 20); do curl -s "
                                         "http://10.99.0.1:32293/"))
    assert set(nginx) == {"pod3", "pod4"} and sum(nginx.values()) == 20, nginx
    # ... and the dnsmasq pods through the DNS ClusterIP, with real answers.
    assert block_after(out, "client$ dig @10.0.0.10 +short +time=2 +tries=1 "
                            "k8s-nginx-node.default.svc.cluster.local").splitlines()[1] \
        == "10.0.0.157"
    assert block_after(out, "client$ dig +tcp @10.0.0.10").splitlines()[1] == "10.0.0.180"
    dns = uniq_counts(block_after(out, "client$ for i in $(seq 30); do dig @10.0.0.10"))
    assert set(dns) == {"pod5", "pod6", "pod7"} and sum(dns.values()) == 30, dns
    # ... and over IPv6, through kube-dns's second ClusterIP (ip6tables, IPv6 endpoints).
    assert any('--comment "kube-system/kube-dns:dns cluster IP"' in r and
               "-d fd00:96::10/128 -p udp" in r for r in redirects)
    dns6 = uniq_counts(block_after(out, "client$ for i in $(seq 30); do dig @fd00:96::10"))
    assert set(dns6) == {"pod5", "pod6", "pod7"} and sum(dns6.values()) == 30, dns6
    assert block_after(out, "client$ dig +tcp @fd00:96::10").splitlines()[1] == "10.0.0.180"

    # Scaling: one endpoint, then two, with the rule unchanged.
    sise = [r for c, r in results if "10.0.0.155 80 " in c]
    assert len(sise) == 2
    assert sise[0]["counts"] == {"pod1": 40}, sise[0]
    assert set(sise[1]["counts"]) == {"pod1", "pod2"}, sise[1]
    assert re.search(r"simpleservice\s+172\.17\.0\.2:9876\s", out)
    assert re.search(r"simpleservice\s+172\.17\.0\.2:9876,172\.17\.0\.3:9876\s", out)
    assert "The redirect is exactly the same as before" in out

    # Affinity: every client address sticks to one pod; all connections succeed.
    sticky = [r for c, r in results if "10.0.0.176 80 " in c]
    assert len(sticky) >= 3
    for r in sticky:
        assert len(r["counts"]) == 1 and sum(r["errors"].values()) == 0, r

    # Nothing is left behind.
    assert "no namespace left" in out
    assert_gone(out, proc.pid)


class Reader:
    """Lines of a child's stdout, readable with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.text = ""
        assert proc.stdout is not None
        self.stream = proc.stdout
        self.thread = threading.Thread(target=self._pump, args=(self.stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not printed; output so far:\n{self.text}")
            self.text += line
        return self.text

    def rest(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.text += line
        self.thread.join(timeout)
        self.stream.close()
        return self.text


def start_demo(*args: str) -> tuple[subprocess.Popen[str], Reader]:
    proc = subprocess.Popen([*DEMO, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    return proc, Reader(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    terminate(proc, 30)


def test_demo_keeps_running_with_the_status_page_on_loopback_until_ctrl_c() -> None:
    require_root()
    proc, reader = start_demo()
    try:
        text = reader.until("Press Ctrl-C", timeout=90)
        m = re.search(r"^\s+(http://127\.0\.0\.1:(\d+)/)$", text, flags=re.M)
        assert m is not None, text
        url, port = m.group(1), int(m.group(2))
        with urllib.request.urlopen(url, timeout=5) as resp:
            page = resp.read().decode()
        assert resp.status == 200 and "<html" in page.lower()
        with urllib.request.urlopen(url + "api/v1/services", timeout=5) as resp:
            names = {item["name"] for item in json.load(resp)["items"]}
        assert {"multi-port", "simpleservice", "k8s-nginx-node", "kube-dns", "sticky"} <= names
        assert proc.poll() is None  # still running after the walkthrough
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        stop(proc)
    text = reader.rest(timeout=5)
    assert "stopped (Ctrl-C)" in text and "no namespace left" in text, text[-2000:]
    assert_gone(text, proc.pid)
    with socket.socket() as sock:  # the loopback forward is gone too
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_sigterm_in_the_middle_of_the_walkthrough_tears_everything_down() -> None:
    require_root()
    proc, reader = start_demo("--once")
    try:
        reader.until("uproxy is ready", timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        stop(proc)
    text = reader.rest(timeout=5)
    assert "stopped by a signal" in text
    assert_gone(text, proc.pid)


def test_not_root_is_one_clear_line_and_exit_2() -> None:
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    reachable = shutil.which("setpriv") is not None and subprocess.run(
        [*nobody, sys.executable, "-c", "import uproxy.demo.walkthrough"],
        capture_output=True, timeout=30).returncode == 0
    if not reachable:  # the interpreter is not readable for nobody: check the function
        problem = requirements_problem(euid=65534)
        assert problem is not None and "root" in problem
        return
    proc = subprocess.run([*nobody, *DEMO, "--once"], capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "needs root" in lines[0], proc.stderr


def test_a_missing_tool_is_named_with_its_debian_package(tmp_path: Path) -> None:
    require_root()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, _ in REQUIRED_TOOLS:
        if tool != "dnsmasq":
            real = shutil.which(tool)
            assert real is not None, tool
            (bin_dir / tool).symlink_to(real)
    with subprocess.Popen([*DEMO, "--once"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "PATH": str(bin_dir)}) as proc:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out == ""
    assert err.splitlines() == [
        "uproxy demo: dnsmasq not found: install the Debian package dnsmasq-base "
        "(apt-get install dnsmasq-base)"]
    assert {ns for ns in netns() if ns.startswith(f"upl{proc.pid}x")} == set()
