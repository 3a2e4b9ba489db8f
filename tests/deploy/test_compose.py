"""The docker-compose stack and the demo's manifests, checked statically (no Docker engine here).

What can be known without running containers is checked against the real
parsers: the compose file parses, every path it names exists, each command's
flags are accepted by the program's own argument parser (and uproxy's settings
accept their values), the manifests load into a Store without problems, the
endpoints name the backends' fixed addresses and ports, and the Service
definitions are the very files the namespace demo runs for real.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from uproxy.cli import build_parser, settings_from_args
from uproxy.demo import echo, probe
from uproxy.demo.lab import pod_ip
from uproxy.demo.walkthrough import (
    COMPOSE_ENDPOINTS,
    LAB_ENDPOINTS,
    MANIFESTS_DIR,
    PODS,
    SERVICE_FILES,
)
from uproxy.sources.files import FilesSource, read_objects
from uproxy.state import Store

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs: dict[str, dict[str, Any]] = compose["services"]
    assert set(svcs) == {"uproxy", "backend-1", "backend-2", "client"}
    return svcs


def mounts(service: dict[str, Any]) -> list[tuple[Path, str, str]]:
    """(host path, container path, mode) of each bind mount, host paths from the repo root."""
    out = []
    for spec in service.get("volumes", []):
        host, container, *mode = spec.split(":")
        out.append(((ROOT / host).resolve(), container, mode[0] if mode else "rw"))
    return out


def load_mounted(service: dict[str, Any], tmp_path: Path,
                 caplog: pytest.LogCaptureFixture) -> Store:
    """Lay the mounted files out as the container sees /manifests, then load them."""
    target = tmp_path / "manifests"
    target.mkdir()
    for host, container, _ in mounts(service):
        shutil.copyfile(host, target / Path(container).name)
    store = Store()
    with caplog.at_level(logging.WARNING, logger="uproxy"):
        assert FilesSource((str(target),)).load(store)
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == []
    return store


def test_every_service_builds_from_the_repository_dockerfile(
        services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        build = svc["build"]
        context = (ROOT / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).is_file(), name
        assert svc["image"] == services["uproxy"]["image"], name


def test_dockerfile_uses_the_official_python_image_and_files_that_exist() -> None:
    text = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert bases and all(re.fullmatch(r"python:3\.1[1-9]-slim", b) for b in bases), bases
    assert re.search(r"apt-get install .*\biptables\b.*\bconntrack\b", text)
    assert re.search(r"apt-get install .*\bnftables\b", text)  # the default interception
    assert re.search(r"pip install .*\buproxy\b", text)
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, flags=re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"


def test_uproxy_service_command_is_accepted_by_the_cli(
        services: dict[str, dict[str, Any]]) -> None:
    svc = services["uproxy"]
    command = svc["command"]
    assert command[0] == "uproxy"
    args = build_parser().parse_args(command[1:])
    assert args.command == "run"
    settings = settings_from_args(args)  # the values too: addresses, durations
    assert settings.manifests == ("/manifests",)
    assert settings.status_address == ("0.0.0.0", 10249)
    assert "NET_ADMIN" in svc["cap_add"]
    # The status page is published on the host's loopback only, on the port uproxy serves.
    (published,) = svc["ports"]
    host_ip, host_port, container_port = str(published).split(":")
    assert ipaddress.ip_address(host_ip).is_loopback
    assert int(container_port) == settings.status_address[1]
    assert 1 <= int(host_port) <= 65535
    # Every manifest is mounted read-only into the directory uproxy reads.
    for host, container, mode in mounts(svc):
        assert host.is_file(), host
        assert mode == "ro", container
        assert Path(container).parent == Path("/manifests"), container
    health = svc["healthcheck"]["test"]
    assert any(f":{settings.healthz_address[1]}/readyz" in part for part in health)


def test_backends_run_the_echo_server_at_fixed_addresses_on_the_network(
        compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    (subnet_cfg,) = compose["networks"]["demo"]["ipam"]["config"]
    subnet = ipaddress.ip_network(subnet_cfg["subnet"])
    assert not subnet.overlaps(ipaddress.ip_network("10.0.0.0/24"))  # the ClusterIP range
    seen = set()
    for name in ("backend-1", "backend-2"):
        svc = services[name]
        command = svc["command"]
        assert command[:3] == ["python", "-m", "uproxy.demo.echo"]
        args = echo._parser().parse_args(command[3:])
        assert args.name == name and sorted(args.tcp) == [6789, 9876]
        address = ipaddress.ip_address(svc["networks"]["demo"]["ipv4_address"])
        assert address in subnet
        seen.add(address)
    uproxy_address = services["uproxy"]["networks"]["demo"]["ipv4_address"]
    assert ipaddress.ip_address(uproxy_address) in subnet
    assert len(seen | {ipaddress.ip_address(uproxy_address)}) == 3


def test_client_shares_uproxys_namespace_and_calls_a_cluster_ip_in_a_bounded_loop(
        services: dict[str, dict[str, Any]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    svc = services["client"]
    assert svc["network_mode"] == "service:uproxy"
    assert "networks" not in svc and "ports" not in svc
    assert svc["depends_on"]["uproxy"]["condition"] == "service_healthy"
    shell, flag, script = svc["command"]
    assert (shell, flag) == ("sh", "-c")
    calls = re.findall(r"python -m uproxy\.demo\.probe ([^;]+);", script)
    assert calls, script
    sleeps = [float(s) for s in re.findall(r"\bsleep ([0-9.]+)\b", script)]
    assert sleeps and all(0 < s <= 60 for s in sleeps)
    table = load_mounted(services["uproxy"], tmp_path, caplog).table()
    targets = {(ip, e.port.port) for e in table.values() for ip in e.port.cluster_ips}
    for call in calls:
        args = probe._parser().parse_args(shlex.split(call))
        assert args.mode == "tcp"
        assert args.count <= 100 and args.max_time <= 60 and args.timeout <= 10
        assert (args.host, args.port) in targets


def test_compose_manifests_are_the_demo_services_with_compose_endpoints(
        services: dict[str, dict[str, Any]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    svc = services["uproxy"]
    mounted = [host for host, _, _ in mounts(svc)]
    assert all(p.parent == MANIFESTS_DIR for p in mounted)
    service_files = [p.name for p in mounted if p.name != COMPOSE_ENDPOINTS]
    assert (MANIFESTS_DIR / COMPOSE_ENDPOINTS) in mounted
    # The Service definitions are the demo's own files, not copies.
    assert set(service_files) <= set(SERVICE_FILES)
    for name in service_files:
        assert {kind for kind, _ in read_objects(MANIFESTS_DIR / name)} == {"Service"}
    assert {kind for kind, _ in read_objects(MANIFESTS_DIR / COMPOSE_ENDPOINTS)} == \
        {"EndpointSlice"}
    # Every service port has endpoints, all on the backends' addresses and echo ports.
    table = load_mounted(svc, tmp_path, caplog).table()
    backends = {services[b]["networks"]["demo"]["ipv4_address"]
                for b in ("backend-1", "backend-2")}
    assert {str(name) for name in table} == {
        "default/multi-port:port1", "default/multi-port:port2",
        "namingthings/simpleservice:", "default/sticky:"}
    for name, entry in table.items():
        assert {e.ip for e in entry.endpoints} == backends, name
        assert {e.port for e in entry.endpoints} <= {6789, 9876}, name


def test_demo_manifests_load_and_name_the_right_lab_pods(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "manifests"
    target.mkdir()
    for name in (*SERVICE_FILES, LAB_ENDPOINTS):
        shutil.copyfile(MANIFESTS_DIR / name, target / name)
    store = Store()
    with caplog.at_level(logging.WARNING, logger="uproxy"):
        FilesSource((str(target),)).load(store)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    table = store.table()
    runs = {kind: {pod_ip(i) for i, (k, _) in PODS.items() if k == kind}
            for kind in ("echo", "nginx", "dnsmasq")}
    expected = {
        "default/multi-port:port1": ("echo", 2), "default/multi-port:port2": ("echo", 2),
        "namingthings/simpleservice:": ("echo", 1), "default/sticky:": ("echo", 2),
        "default/k8s-nginx-node:": ("nginx", 2),
        "kube-system/kube-dns:dns": ("dnsmasq", 3), "kube-system/kube-dns:dns-tcp": ("dnsmasq", 3),
    }
    assert {str(n) for n in table} == set(expected)
    for name, entry in table.items():
        kind, count = expected[str(name)]
        ips = {e.ip for e in entry.endpoints if ":" not in e.ip}
        assert len(ips) == count and ips <= runs[kind], (name, ips)
        ips6 = {e.ip for e in entry.endpoints if ":" in e.ip}  # dual-stack kube-dns
        same_pods6 = {str(ipaddress.IPv6Address("fd00:17::") + int(ip.rsplit(".", 1)[1]))
                      for ip in ips}  # pod i: 172.17.0.{i+1} and fd00:17::{i+1:x}
        assert not ips6 or ips6 == same_pods6, (name, ips6)
        for ip in entry.port.cluster_ips:  # inside the lab's service ranges
            assert any(ipaddress.ip_address(ip) in ipaddress.ip_network(net)
                       for net in ("10.0.0.0/24", "fd00:96::/112"))
    nodeport = next(e for n, e in table.items() if n.name == "k8s-nginx-node")
    assert nodeport.port.node_port == 32293
    sticky = next(e for n, e in table.items() if n.name == "sticky")
    assert sticky.port.affinity_timeout == 10800
    dns = {e.port.protocol for n, e in table.items() if n.name == "kube-dns"}
    assert dns == {"UDP", "TCP"}
