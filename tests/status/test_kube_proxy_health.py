"""kube-proxy's health answers byte for byte (uproxy.status.health) and ``/proxyMode``.

The bodies are compared with what kube-proxy's Go code writes (proxier_health.go's
``json.Marshal`` of ProxyHealth; service_health.go's tab-indented template), including
field order and the missing final newline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import test_utils

from uproxy.status import server
from uproxy.status.health import go_time, proxy_health, service_health

from .support import running_stack

T0 = 1767323045.25  # 2026-01-02T03:04:05.25Z
T1 = T0 + 10


def test_go_time_is_rfc3339nano_in_utc() -> None:
    assert go_time(None) == "0001-01-01T00:00:00Z"
    assert go_time(T0) == "2026-01-02T03:04:05.25Z"
    assert go_time(1767323045.0) == "2026-01-02T03:04:05Z"
    assert go_time(1767323045.123456) == "2026-01-02T03:04:05.123456Z"


def test_healthz_body_healthy() -> None:
    status, body = proxy_health(healthy=True, last_sync=T0, now=T1, node_eligible=True)
    assert status == 200
    assert body == (b'{"lastUpdated":"2026-01-02T03:04:15.25Z",'  # now, on a 200
                    b'"currentTime":"2026-01-02T03:04:15.25Z","nodeEligible":true,'
                    b'"healthy":true,"status":{"IPv4":{"lastUpdated":"2026-01-02T03:04:05.25Z",'
                    b'"healthy":true}}}')


def test_healthz_body_node_not_eligible_and_livez() -> None:
    status, body = proxy_health(healthy=True, last_sync=T0, now=T1, node_eligible=False)
    assert status == 503
    assert body.startswith(b'{"lastUpdated":"2026-01-02T03:04:05.25Z",'
                           b'"currentTime":"2026-01-02T03:04:15.25Z","nodeEligible":false,'
                           b'"healthy":true,')
    status, body = proxy_health(healthy=True, last_sync=T0, now=T1, node_eligible=None)
    assert status == 200 and b"nodeEligible" not in body


def test_healthz_before_the_first_sync_and_unhealthy() -> None:
    status, body = proxy_health(healthy=True, last_sync=None, now=T1, node_eligible=True)
    assert (status, body) == (200, b'{"lastUpdated":"2026-01-02T03:04:15.25Z",'
                                   b'"currentTime":"2026-01-02T03:04:15.25Z",'
                                   b'"nodeEligible":true,"healthy":true}')
    status, body = proxy_health(healthy=False, last_sync=None, now=T1, node_eligible=True)
    assert status == 503 and body.startswith(b'{"lastUpdated":"0001-01-01T00:00:00Z",')
    status, body = proxy_health(healthy=False, last_sync=T0, now=T1, node_eligible=None,
                                families=("IPv6", "IPv4"))
    assert status == 503 and body.endswith(
        b'"healthy":false,"status":{"IPv4":{"lastUpdated":"2026-01-02T03:04:05.25Z",'
        b'"healthy":false},"IPv6":{"lastUpdated":"2026-01-02T03:04:05.25Z","healthy":false}}}')


@pytest.mark.parametrize(("count", "healthy", "status"), [
    (2, True, 200), (0, True, 503), (1, False, 503), (0, False, 503)])
def test_service_health_body(count: int, healthy: bool, status: int) -> None:
    got_status, headers, body = service_health("default", "lb-local", count, healthy)
    assert got_status == status
    assert list(headers.items()) == [("Content-Type", "application/json"),
                                     ("X-Content-Type-Options", "nosniff"),
                                     ("X-Load-Balancing-Endpoint-Weight", str(count))]
    assert body == ('{\n\t"service": {\n\t\t"namespace": "default",\n\t\t"name": "lb-local"\n'
                    f'\t}},\n\t"localEndpoints": {count},\n'
                    f'\t"serviceProxyHealthy": {str(healthy).lower()}\n}}').encode()


@pytest.fixture
async def apps(tmp_path: Path) -> AsyncIterator[tuple[test_utils.TestClient, ...]]:
    async with running_stack(tmp_path) as stack:
        daemon = stack.daemon
        status_app = test_utils.TestClient(test_utils.TestServer(server.make_status_app(daemon)))
        health_app = test_utils.TestClient(test_utils.TestServer(server.make_health_app(daemon)))
        async with status_app, health_app:
            yield status_app, health_app


async def test_proxy_mode_and_health_headers(apps: tuple[test_utils.TestClient, ...]) -> None:
    status_app, health_app = apps
    response = await status_app.get("/proxyMode")
    assert response.status == 200 and await response.read() == b"userspace"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/healthz", "/livez"):
        response = await health_app.get(path)
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert (await response.read()).endswith(b"}")  # no final newline
    assert (await health_app.get("/proxyMode")).status == 404  # only on the status address
