"""A real daemon on loopback for the status tests: sockets only, no iptables, no namespaces.

Backends are asyncio echo servers on 127.0.0.1-3 (loopback only); the daemon
reads a manifest directory through the real FilesSource and proxies through
its real TCP proxy and relay. Clients connect to the service's proxy socket
(the port is in ``daemon.listeners``), which is what an iptables REDIRECT
would deliver to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.waiting import wait_until_async
from uproxy.daemon import Daemon, ListenerKey
from uproxy.model import ServicePortName
from uproxy.settings import Settings
from uproxy.sources import SourceHooks
from uproxy.sources.files import FilesSource
from uproxy.state import Store

BACKEND_HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
CREATED = "2026-01-02T03:04:05Z"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def manifests(backend_port: int, node_port: int) -> list[dict[str, Any]]:
    """``default/echo`` (two named ports, 3 endpoints) and ``web/site`` (NodePort, 1 port)."""
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "echo", "namespace": "default", "creationTimestamp": CREATED},
         "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "selector": {"app": "echo"},
                  "ports": [{"name": "tcp", "port": 80, "targetPort": backend_port},
                            {"name": "alt", "port": 8080, "targetPort": backend_port}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "echo-abc", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": "echo"}},
         "addressType": "IPv4",
         "ports": [{"name": "tcp", "port": backend_port, "protocol": "TCP"},
                   {"name": "alt", "port": backend_port, "protocol": "TCP"}],
         "endpoints": [{"addresses": [h], "conditions": {"ready": True}} for h in BACKEND_HOSTS]
         + [{"addresses": ["127.0.0.9"], "conditions": {"ready": False}}]},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "site", "namespace": "web"},
         "spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "selector": {"app": "site"},
                  "ports": [{"port": 443, "targetPort": backend_port, "nodePort": node_port,
                             "protocol": "TCP"}]}},
        {"apiVersion": "v1", "kind": "Endpoints",
         "metadata": {"name": "site", "namespace": "web"},
         "subsets": [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"port": backend_port}]}]},
    ]


def write_manifests(directory: Path, objects: list[dict[str, Any]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = "\n---\n".join(json.dumps(o) for o in objects)  # JSON is YAML
    (directory / "services.yaml").write_text(text)


class GatedSource:
    """The files source, but its first complete view is announced only when the test says so.

    A real :class:`~uproxy.sources.Source` (the daemon's own protocol): it lets
    tests hold the daemon in "change queued, not applied" — what an API server
    that never finishes its list looks like — and flag the node as terminating,
    as the kube source does when the Node is being deleted.
    """

    name = "gated"

    def __init__(self, paths: tuple[str, ...]) -> None:
        self.files = FilesSource(paths)
        self.release = asyncio.Event()
        self.node_terminating = False

    async def run(self, store: Store, hooks: SourceHooks) -> None:
        self.files.load(store)
        hooks.changed()
        await self.release.wait()
        hooks.synced()
        await asyncio.Event().wait()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@dataclass
class Stack:
    daemon: Daemon
    manifest_dir: Path
    backend_port: int
    node_port: int
    servers: list[asyncio.Server] = field(default_factory=list)

    def proxy_port(self, namespace: str = "default", name: str = "echo", port: str = "tcp") -> int:
        key = ListenerKey(ServicePortName(namespace, name, port, "TCP"), "cluster",
                          self.daemon.settings.bind_address, 0)
        return self.daemon.listeners[key].port


def settings_for(manifest_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "manifests": (str(manifest_dir),),
        "manage_iptables": False,
        "bind_address": "127.0.0.1",
        "nodeport_addresses": ("127.0.0.1/32",),
        "status_address": ("127.0.0.1", 0),
        "healthz_address": ("127.0.0.1", 0),
        "hostname_override": "status-test-node",
        "min_sync_period": 0.01,
        "shutdown_grace": 0.5,
        "loop": "asyncio",
    }
    base.update(overrides)
    return Settings(**base)


@contextlib.asynccontextmanager
async def running_stack(tmp_path: Path, *, gated: bool = False, wait_ready: bool = True,
                        **overrides: Any) -> AsyncIterator[Stack]:
    """Echo backends, manifests, a started Daemon; everything stopped afterwards."""
    backend_port = free_port()
    servers = [await asyncio.start_server(_echo, host, backend_port) for host in BACKEND_HOSTS]
    node_port = free_port()
    manifest_dir = tmp_path / "manifests"
    write_manifests(manifest_dir, manifests(backend_port, node_port))
    settings = settings_for(manifest_dir, **overrides)
    source: Any = GatedSource(settings.manifests) if gated else FilesSource(settings.manifests)
    daemon = Daemon(settings, source)
    stack = Stack(daemon, manifest_dir, backend_port, node_port, servers)
    try:
        await daemon.start()
        if wait_ready:
            await wait_until_async(lambda: daemon.ready,
                                   timeout=10, message="the daemon to be ready")
        yield stack
    finally:
        await daemon.shutdown()
        for server in servers:
            server.close()
            await server.wait_closed()


async def talk(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, data: bytes) -> None:
    """Send ``data`` and read the same number of bytes back (through the echo backend)."""
    writer.write(data)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(data)), 10)
    assert got == data
