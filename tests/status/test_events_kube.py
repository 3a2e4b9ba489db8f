"""A refused API request shows in the daemon's event log: a real Daemon with the real kube
source against the fake API server (tests/k8s/apiserver.py), which answers 403 for a while."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.k8s.apiserver import FakeApiServer, endpoint_slice, service
from tests.support.waiting import wait_until_async
from uproxy.daemon import Daemon
from uproxy.settings import Settings
from uproxy.sources.kube import KubeSettings, KubeSource

FAST = KubeSettings(page_size=500, watch_timeout_seconds=300, inactivity_timeout=5.0,
                    backoff_initial=0.05, backoff_max=0.5)


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval=0.3)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_refused_api_request_is_an_event(api: FakeApiServer, tmp_path: Path) -> None:
    api.create(service("web"))
    api.create(endpoint_slice("web", ["10.1.0.1"]))
    api.fail_next(3, status=403)
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    settings = Settings(manage_iptables=False, bind_address="127.0.0.1",
                        nodeport_addresses=("127.0.0.1/32",), status_address=("127.0.0.1", 0),
                        healthz_address=("127.0.0.1", 0), min_sync_period=0.01,
                        hostname_override="node-1")
    source = KubeSource(kubeconfig=kubeconfig, master=None, node_name="node-1", settings=FAST)
    daemon = Daemon(settings, source)
    await daemon.start()
    try:
        await wait_until_async(lambda: daemon.ready, timeout=15, message="ready after the 403s")
        refused = [e for e in daemon.events.items() if "403" in e.message]
        assert refused, [e.as_dict() for e in daemon.events.items()]
        assert refused[0].kind == "Warning" and refused[0].object == "uproxy.kube"
        assert any(e.kind == "ServiceAdded" and e.object.startswith("Service default/web")
                   for e in daemon.events.items())
    finally:
        await daemon.shutdown()
        await asyncio.sleep(0)
