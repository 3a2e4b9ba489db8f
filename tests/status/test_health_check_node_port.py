"""Health-check node ports on loopback (a real daemon, real sockets, no iptables).

kube-proxy's service_health.go behaviour: for ``type: LoadBalancer`` with
``externalTrafficPolicy: Local`` and ``spec.healthCheckNodePort``, any path answers 200
while this node has a ready local endpoint, 503 with only terminating or remote ones; the
port moves with the field and closes when the policy becomes Cluster or the Service goes.
(The lab version, curled from another namespace: tests/lab/test_kube_semantics_lab.py.)
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.waiting import wait_until_async

from .support import free_port, running_stack, write_manifests

NODE = "status-test-node"


def lb_service(hc_port: int, node_port: int, backend_port: int, *,
               policy: str = "Local") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "lb", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.30",
                     "externalTrafficPolicy": policy, "healthCheckNodePort": hc_port,
                     "ports": [{"name": "http", "port": 80, "targetPort": backend_port,
                                "nodePort": node_port},
                               {"name": "https", "port": 443, "targetPort": backend_port,
                                "nodePort": node_port + 1}]}}


def lb_slice(backend_port: int, local: str = "ready") -> dict[str, Any]:
    conditions = {"ready": {"ready": True},
                  "terminating": {"ready": False, "serving": True, "terminating": True},
                  "gone": None}[local]
    endpoints = [{"addresses": ["127.0.0.3"], "nodeName": "other-node",
                  "conditions": {"ready": True}}]
    if conditions is not None:
        endpoints.append({"addresses": ["127.0.0.2"], "nodeName": NODE,
                          "conditions": conditions})
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "lb-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "lb"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": backend_port},
                      {"name": "https", "port": backend_port}],
            "endpoints": endpoints}


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def probe(port: int, path: str = "/healthz",
                method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, \
            session.request(method, f"http://127.0.0.1:{port}{path}") as response:
        return response.status, dict(response.headers), await response.read()


async def test_health_check_node_port_follows_the_service(tmp_path: Path) -> None:
    hc, hc2, node_port = free_port(), free_port(), free_port()
    async with running_stack(tmp_path) as stack:
        directory, backend = tmp_path / "lb", stack.backend_port
        (stack.manifest_dir / "lb.yaml").write_text("")

        def write(*objs: dict[str, Any]) -> None:
            write_manifests(directory, list(objs))
            (stack.manifest_dir / "lb.yaml").write_text(
                (directory / "services.yaml").read_text())

        write(lb_service(hc, node_port, backend), lb_slice(backend))
        await wait_until_async(lambda: listening(hc), timeout=10, message="hc port open")
        for path, method in (("/healthz", "GET"), ("/", "GET"), ("/anything", "POST")):
            status, headers, body = await probe(hc, path, method)
            assert status == 200, (path, method)
            assert headers["Content-Type"] == "application/json"
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["X-Load-Balancing-Endpoint-Weight"] == "1"  # one pod, two ports
            assert json.loads(body) == {"service": {"namespace": "default", "name": "lb"},
                                        "localEndpoints": 1, "serviceProxyHealthy": True}
            assert body.startswith(b'{\n\t"service": {\n') and body.endswith(b"\n}")

        # e2e: should fail health check node port if there are only terminating endpoints
        write(lb_service(hc, node_port, backend), lb_slice(backend, "terminating"))

        async def answers(code: int) -> bool:
            return (await probe(hc))[0] == code

        await wait_until_async(lambda: answers(503), timeout=10, message="503 when terminating")
        status, headers, body = await probe(hc)
        assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"
        assert json.loads(body)["localEndpoints"] == 0
        write(lb_service(hc, node_port, backend), lb_slice(backend, "gone"))
        await wait_until_async(lambda: answers(503), timeout=10, message="503: no local one")
        write(lb_service(hc, node_port, backend), lb_slice(backend))
        await wait_until_async(lambda: answers(200), timeout=10, message="200 again")

        # moved
        write(lb_service(hc2, node_port, backend), lb_slice(backend))
        await wait_until_async(lambda: listening(hc2) and not listening(hc), timeout=10,
                               message="hc port moved")
        # externalTrafficPolicy: Cluster closes it
        write(lb_service(hc2, node_port, backend, policy="Cluster"), lb_slice(backend))
        await wait_until_async(lambda: not listening(hc2), timeout=10,
                               message="closed under Cluster")
        write(lb_service(hc2, node_port, backend), lb_slice(backend))
        await wait_until_async(lambda: listening(hc2), timeout=10, message="open again")
        # the Service deleted
        (stack.manifest_dir / "lb.yaml").write_text("")
        await wait_until_async(lambda: not listening(hc2), timeout=10, message="closed")


async def test_a_taken_port_is_retried(tmp_path: Path) -> None:
    hc, node_port = free_port(), free_port()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    blocker.bind(("127.0.0.1", hc))
    blocker.listen()
    try:
        async with running_stack(tmp_path, sync_period=0.3) as stack:
            write_manifests(tmp_path / "lb", [lb_service(hc, node_port, stack.backend_port),
                                              lb_slice(stack.backend_port)])
            (stack.manifest_dir / "lb.yaml").write_text(
                (tmp_path / "lb" / "services.yaml").read_text())
            await wait_until_async(lambda: any(k.name.name == "lb" for k in stack.daemon.listeners),
                                   timeout=10, message="lb served")
            assert not stack.daemon.health_checks.servers
            blocker.close()
            await wait_until_async(lambda: listening(hc), timeout=10,
                                   message="opened at a later sync")
            assert (await probe(hc))[0] == 200
            await asyncio.sleep(0.1)  # the server sees the probes' connections end
    finally:
        blocker.close()
