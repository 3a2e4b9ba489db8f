"""The Kubernetes API source end to end: the real daemon against the fake API server in the lab.

The fake API server (:mod:`tests.k8s.apiserver`) runs as its own process in the
lab's node namespace, on 127.0.0.1 there, so ``uproxy run --kubeconfig`` reaches
it exactly as it would reach a real API server. The test drives it over the
server's control socket (a unix socket, reachable from the root namespace
without any packet), and looks at what a user would look at: ``/readyz`` and
``/healthz`` of the daemon, the rules in ``iptables-save``, and real TCP
connections from the client namespace to echo servers in the pods.

Run as a program (``python -m tests.k8s.test_kube_lab --services 2000``) it
measures, without asserting, the time from the daemon's start to ``/readyz``
with many services loaded, and the daemon's resident memory afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.waiting import wait_until
from uproxy.demo.lab import Lab, LabError
from uproxy.demo.node import NodeProxy
from uproxy.rules import parse_rules
from uproxy.sources.kube import TO_BE_DELETED_TAINT

from .apiserver import Control, endpoint_slice, node, service

REPO = Path(__file__).resolve().parents[2]
NODE = "node"  # --hostname-override, and the Node object's name
PORT, TARGET = 80, 8080


class FakeCluster:
    """``python -m tests.k8s.apiserver`` in the node namespace, with its control socket."""

    def __init__(self, lab: Lab, objects: Iterable[dict[str, Any]], *,
                 hold: Iterable[str] = (), history_size: int = 1000) -> None:
        self.lab = lab
        self.kubeconfig = lab.workdir / "kubeconfig"
        self.control_path = lab.workdir / "apiserver.sock"
        load = lab.workdir / "objects.json"
        load.write_text(json.dumps(list(objects)))
        argv = [sys.executable, "-m", "tests.k8s.apiserver", "--kubeconfig", str(self.kubeconfig),
                "--load", str(load), "--control", str(self.control_path),
                "--history-size", str(history_size), "--bookmark-interval", "5"]
        for resource in hold:
            argv += ["--hold", resource]
        self.proc = lab.spawn("node", argv, "apiserver", env={"PYTHONPATH": str(REPO)})
        proc = self.proc

        def listening() -> bool:  # the kubeconfig is written (atomically) once both listen
            if proc.poll() is not None:
                raise LabError(f"fake API server exited: {lab.log('apiserver')}")
            return self.kubeconfig.exists()

        wait_until(listening, timeout=60,
                   message=lambda: f"fake API server not up: {lab.log('apiserver')}")
        self.control = Control(self.control_path)
        self.url = json.loads(self.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]

    def requests(self, resource: str, *, watch: bool) -> list[dict[str, Any]]:
        return [r for r in self.control.requests()
                if r["resource"] == resource and r["watch"] == watch]

    def watching(self) -> bool:
        """Every resource has one open watch (the daemon listed all and follows)."""
        return all(n == 1 for n in self.control.state()["watchers"].values())


class KubeProxy(NodeProxy):
    """:class:`NodeProxy` with the API source instead of manifests."""

    def __init__(self, lab: Lab, kubeconfig: Path, *, args: Iterable[str] = ()) -> None:
        super().__init__(lab, name="uproxy-kube", args=args)
        self.kubeconfig = kubeconfig
        self.started_at = 0.0

    def start(self, *, wait_for: str | None = None, timeout: float = 15.0,
              wait: bool = True) -> None:
        argv = [sys.executable, "-m", "uproxy", "run", "--kubeconfig", str(self.kubeconfig),
                "--loop", self.loop, "--hostname-override", NODE,
                "--status-address", "127.0.0.1:10249", "--healthz-address", "127.0.0.1:10256",
                "--state-dir", str(self.state_dir), *self.args]
        self._starts += 1
        self.started_at = time.monotonic()
        self.proc = self.lab.spawn("node", argv, f"{self.name}-{self._starts}")
        if wait:
            self.wait_ready(timeout=timeout)
        if wait_for is not None:
            self.wait_rules(lambda text: wait_for in text, timeout=timeout)

    def http_status(self, path: str) -> int:
        out = self.lab.run("node", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                    "-m", "2", f"http://127.0.0.1:10256{path}"], check=False)
        return int(out.stdout or 0)

    def rss_kib(self) -> int:
        """VmRSS of the daemon (the python under ``ip netns exec``, which execs it)."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        if not any(line.split() == ["Name:", "python3"] or line.startswith("Name:\tpython")
                   for line in status):
            raise LabError(f"pid {self.proc.pid} is not the daemon: {status[0]}")
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise LabError("no VmRSS")


@pytest.fixture
def proxies() -> Iterator[list[KubeProxy]]:
    started: list[KubeProxy] = []
    yield started
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.stop()


def probe(lab: Lab, ip: str, port: int = PORT, *, timeout: float = 3.0) -> dict[str, Any]:
    """20 connections (``whoami``) from the client namespace."""
    return lab.probe("tcp", ip, str(port), "--count", "20", "--timeout", f"{timeout:g}",
                     "--max-time", "15")


def probe_until(lab: Lab, ip: str, counts: dict[str, int] | set[str], what: str,
                port: int = PORT, timeout: float = 15.0) -> dict[str, Any]:
    """Probe until every connection succeeds and the answering pods are ``counts``."""
    last: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        last = probe(lab, ip, port)
        got = last["counts"] if isinstance(counts, dict) else set(last["counts"])
        return got == counts and sum(last["counts"].values()) == 20

    try:
        wait_until(check, timeout=timeout, interval=0.1, message=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: last probe {last}") from None
    return last


def unanswered(lab: Lab, ip: str, port: int = PORT) -> bool:
    """No pod answers any of 20 connections (no rule: they time out; no endpoint: refused)."""
    result = probe(lab, ip, port, timeout=1.0)
    return not result["counts"] and sum(result["errors"].values()) == 20


def web(ip: str, *pods: str, name: str = "web", port: int = PORT) -> list[dict[str, Any]]:
    return [service(name, cluster_ip=ip, port=port, target_port=TARGET),
            endpoint_slice(name, list(pods), port=TARGET)]


def test_ready_after_first_lists_then_create_update_delete(lab: Lab,
                                                           proxies: list[KubeProxy]) -> None:
    for pod in (1, 2):
        lab.start_echo(pod, tcp_ports=(TARGET,))
    p1, p2 = lab.pod_ip(1), lab.pod_ip(2)
    cluster = FakeCluster(lab, [node(NODE), *web("10.0.0.10", p1)], hold=["endpointslices"])
    ctl = cluster.control
    daemon = KubeProxy(lab, cluster.kubeconfig)
    proxies.append(daemon)
    daemon.start(wait=False)

    # Services listed and watched, slices' list held: not ready, no service in iptables
    # (the empty chain and its hooks are put in place at start-up: no service state).
    wait_until(lambda: cluster.requests("services", watch=True),
               timeout=15, interval=0.1, message="watching services")
    wait_until(lambda: cluster.requests("endpointslices", watch=False),
               timeout=15, interval=0.1, message="listing slices")
    time.sleep(0.5)  # would be plenty for a daemon that wrongly syncs a partial view
    assert daemon.http_status("/readyz") == 503
    saved = daemon.iptables_save()
    assert parse_rules(saved) == [] and daemon.redirects() == []
    if daemon.interception == "iptables":
        assert "REDIRECT --to-ports 1\n" in saved, saved
    else:  # nothing before the first complete view
        assert daemon.nft_tables(None) == ""
    ctl.ops({"op": "release", "resource": "endpointslices"})
    daemon.wait_ready()
    daemon.wait_rules(lambda t: "default/web:http cluster IP" in t)
    probe_until(lab, "10.0.0.10", {"pod1": 20}, "web on pod1")
    assert daemon.http_status("/healthz") == 200

    # Update: the slice grows; then the service moves to another port.
    ctl.apply(endpoint_slice("web", [p1, p2], port=TARGET))
    probe_until(lab, "10.0.0.10", {"pod1", "pod2"}, "web on both pods")
    ctl.apply(service("web", cluster_ip="10.0.0.10", port=81, target_port=TARGET))
    daemon.wait_rules(lambda t: {r[1:3] for r in daemon.parse(t)
                                 if r[1] == "10.0.0.10"} == {("10.0.0.10", 81)})
    probe_until(lab, "10.0.0.10", {"pod1", "pod2"}, "web on port 81", port=81)
    assert unanswered(lab, "10.0.0.10", 80)

    # Create another service; delete its slice (refused at once), then delete web.
    ctl.apply(*web("10.0.0.11", p2, name="api"))
    probe_until(lab, "10.0.0.11", {"pod2": 20}, "api on pod2")
    ctl.delete("EndpointSlice", "default", "api-abc")
    refused = wait_until(lambda: (r := probe(lab, "10.0.0.11"))["errors"]["refused"]
                         + r["errors"]["reset"] == 20 and r,
                         timeout=15, interval=0.1, message="api refusing")
    assert not refused["counts"], refused
    ctl.delete("Service", "default", "web")
    ctl.delete("EndpointSlice", "default", "web-abc")
    text = daemon.wait_rules(lambda t: "default/web" not in t)
    assert "default/api:http cluster IP" in text
    assert unanswered(lab, "10.0.0.10", 81)
    assert daemon.http_status("/readyz") == 200
    assert daemon.stop() == 0
    assert daemon.uproxy_lines() == []


def test_deletion_missed_during_a_dropped_stream_is_applied_after_410(
        lab: Lab, proxies: list[KubeProxy]) -> None:
    for pod in (1, 2):
        lab.start_echo(pod, tcp_ports=(TARGET,))
    cluster = FakeCluster(lab, [node(NODE), *web("10.0.0.20", lab.pod_ip(1), name="keep"),
                                *web("10.0.0.21", lab.pod_ip(2), name="gone")])
    daemon = KubeProxy(lab, cluster.kubeconfig)
    proxies.append(daemon)
    daemon.start(wait_for="default/gone:http cluster IP")
    probe_until(lab, "10.0.0.21", {"pod2": 20}, "gone on pod2")
    wait_until(cluster.watching, timeout=15, interval=0.1, message="watching everything")
    lists_before = len(cluster.requests("services", watch=False))

    # One atomic batch: the streams are cut, the deletion happens while nobody
    # watches, and history is compacted, so the reconnecting watch gets 410.
    cluster.control.ops({"op": "drop"},
                        {"op": "delete", "kind": "Service", "namespace": "default",
                         "name": "gone"},
                        {"op": "delete", "kind": "EndpointSlice", "namespace": "default",
                         "name": "gone-abc"},
                        {"op": "compact"})
    text = daemon.wait_rules(lambda t: "default/gone" not in t)
    assert "default/keep:http cluster IP" in text
    assert unanswered(lab, "10.0.0.21")
    probe_until(lab, "10.0.0.20", {"pod1": 20}, "keep still served")
    assert "410" in daemon.log and "listing again" in daemon.log
    assert len(cluster.requests("services", watch=False)) > lists_before
    # It watches again from the new list: a later change arrives as an event.
    cluster.control.apply(*web("10.0.0.22", lab.pod_ip(1), name="after"))
    daemon.wait_rules(lambda t: "default/after:http cluster IP" in t)
    assert daemon.http_status("/healthz") == 200


def test_outage_keeps_last_state_then_converges(lab: Lab, proxies: list[KubeProxy]) -> None:
    for pod in (1, 2, 3):
        lab.start_echo(pod, tcp_ports=(TARGET,))
    p1, p2, p3 = lab.pod_ips[:3]
    cluster = FakeCluster(lab, [node(NODE), *web("10.0.0.30", p1)])
    ctl = cluster.control
    daemon = KubeProxy(lab, cluster.kubeconfig)
    proxies.append(daemon)
    daemon.start(wait_for="default/web:http cluster IP")
    probe_until(lab, "10.0.0.30", {"pod1": 20}, "web on pod1")
    wait_until(cluster.watching, timeout=15, interval=0.1, message="watching everything")

    # The API server goes away (port closed) for 4 s; meanwhile the slice changes.
    ctl.ops({"op": "outage", "seconds": 4, "refuse": True},
            {"op": "apply", "objects": [endpoint_slice("web", [p1, p2], port=TARGET)]})
    gone = lab.run("node", ["curl", "-s", "-m", "2", f"{cluster.url}/api/v1/services"],
                   check=False)
    assert gone.returncode == 7, gone  # connection refused: the outage is real
    r = probe(lab, "10.0.0.30")
    assert r["counts"] == {"pod1": 20}, r  # the last known state keeps serving
    assert daemon.http_status("/healthz") == 200  # nothing is waiting to be applied
    assert daemon.http_status("/readyz") == 200
    probe_until(lab, "10.0.0.30", {"pod1", "pod2"}, "converged after the outage", timeout=20)
    assert "watching again" in daemon.log
    # It resumed watching from its last version (the change came as an event): no re-list.
    assert len(cluster.requests("endpointslices", watch=False)) == 1

    # 429 with Retry-After and 500s on the reconnect after a cut: still converges.
    wait_until(cluster.watching, timeout=15, interval=0.1, message="watching again")
    ctl.ops({"op": "fail", "count": 2, "status": 429, "retryAfter": 1},
            {"op": "fail", "count": 2, "status": 500}, {"op": "drop"},
            {"op": "apply", "objects": [endpoint_slice("web", [p3], port=TARGET)]})
    probe_until(lab, "10.0.0.30", {"pod3": 20}, "converged after 429/500")
    statuses = [r["status"] for r in ctl.requests()]
    assert statuses.count(429) == 2 and statuses.count(500) == 2, statuses


def test_healthz_follows_the_node(lab: Lab, proxies: list[KubeProxy]) -> None:
    lab.start_echo(1, tcp_ports=(TARGET,))
    cluster = FakeCluster(lab, [node(NODE), *web("10.0.0.40", lab.pod_ip(1))])
    ctl = cluster.control
    daemon = KubeProxy(lab, cluster.kubeconfig)
    proxies.append(daemon)
    daemon.start(wait_for="default/web:http cluster IP")
    assert daemon.http_status("/healthz") == 200

    taint = {"key": TO_BE_DELETED_TAINT, "value": "1700000000", "effect": "NoSchedule"}
    ctl.apply(node(NODE, taints=[taint]))
    wait_until(lambda: daemon.http_status("/healthz") == 503,
               timeout=15, interval=0.1, message="healthz 503 when tainted")
    assert daemon.http_status("/livez") == 200  # going away, but alive
    assert daemon.http_status("/readyz") == 200
    probe_until(lab, "10.0.0.40", {"pod1": 20}, "still serving while draining")

    ctl.apply(node(NODE))
    wait_until(lambda: daemon.http_status("/healthz") == 200,
               timeout=15, interval=0.1, message="healthz 200 when untainted")

    deleting = node(NODE)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ctl.apply(deleting)
    wait_until(lambda: daemon.http_status("/healthz") == 503,
               timeout=15, interval=0.1, message="healthz 503 when being deleted")
    assert "terminating=True" in daemon.log


def test_many_services_paged_and_served(lab: Lab, proxies: list[KubeProxy]) -> None:
    """More services than one list page (500): all of them get rules."""
    lab.start_echo(1, tcp_ports=(TARGET,))
    lab.start_echo(2, tcp_ports=(TARGET,))
    objects = [node(NODE), *many_services(600, [lab.pod_ip(1), lab.pod_ip(2)])]
    cluster = FakeCluster(lab, objects)
    daemon = KubeProxy(lab, cluster.kubeconfig)
    proxies.append(daemon)
    daemon.start(timeout=30)
    lines = [r for r in daemon.redirects() if r[0].endswith("cluster IP")]
    assert len(lines) == 600
    pages = [r for r in cluster.requests("services", watch=False)]
    assert len(pages) == 2 and "continue" in pages[1]["query"], pages
    probe_until(lab, svc_ip(599), {"pod1", "pod2"}, "the last service served")


# --- scale: many services, measured ------------------------------------------------------


def svc_ip(i: int) -> str:
    """ClusterIPs in 10.1.0.0/16 onwards (not the lab's 10.0.0.0/24), one per service."""
    return f"10.{1 + i // 65536}.{i // 256 % 256}.{i % 256}"


def many_services(n: int, pods: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        name = f"svc{i:05}"
        out.append(service(name, cluster_ip=svc_ip(i), port=PORT, target_port=TARGET))
        out.append(endpoint_slice(name, pods, port=TARGET))
    return out


def measure(services: int, args: Iterable[str] = ()) -> dict[str, Any]:
    """Start the daemon against ``services`` x 2 endpoints; time to /readyz and RSS."""
    with Lab.create(pods=2, name_hint="kscale") as lab:
        lab.start_echo(1, tcp_ports=(TARGET,))
        lab.start_echo(2, tcp_ports=(TARGET,))
        cluster = FakeCluster(lab, [node(NODE), *many_services(services, lab.pod_ips[:2])])
        daemon = KubeProxy(lab, cluster.kubeconfig, args=args)
        daemon.start(wait=False)
        try:
            daemon.wait_ready(timeout=300)
            ready_s = time.monotonic() - daemon.started_at
            rss = daemon.rss_kib()
            rules = len(daemon.redirects(None))
            served = probe(lab, svc_ip(services - 1))["counts"]
            time.sleep(2)
            rss_later = daemon.rss_kib()
        finally:
            daemon.stop(timeout=60)
            print(daemon.log.strip(), file=sys.stderr)
    return {"services": services, "endpoints": 2 * services, "ready_s": round(ready_s, 2),
            "rss_mib": round(rss / 1024, 1), "rss_mib_2s_later": round(rss_later / 1024, 1),
            "redirect_rules": rules, "last_service_answers": served}


def main() -> None:
    parser = argparse.ArgumentParser(description="time to /readyz and RSS with many services")
    parser.add_argument("--services", type=int, action="append", default=[])
    parser.add_argument("--daemon-arg", action="append", default=[], help="passed to uproxy run")
    args = parser.parse_args()
    for n in args.services or [2000]:
        print(json.dumps(measure(n, args.daemon_arg)), flush=True)


if __name__ == "__main__":
    main()
