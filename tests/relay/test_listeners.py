"""The listener set opens each service port's sockets (uproxy.proxy.listeners.ListenerSet).

A start opens 10,000 ClusterIP-only service ports through a short path (issue 16's
start-up); these check it opens what the general path opens, reports a port it cannot
bind once with the service named, and that the next ensure retries it. Real sockets on
the loopback addresses.
"""

from __future__ import annotations

import logging
import socket

import pytest

from uproxy.model import ServicePort, ServicePortName
from uproxy.proxy.listeners import ListenerKey, ListenerSet
from uproxy.proxy.ports import PortAllocator


class _Served:
    """What a protocol proxy's listener is to the set: the socket, its port, close."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()

    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def release(self) -> None: ...


class _Proxy:
    def __init__(self) -> None:
        self.served: list[tuple[ServicePortName, str, _Served]] = []

    def listen(self, sock: socket.socket, name: ServicePortName, scope: str) -> _Served:
        listener = _Served(sock)
        self.served.append((name, scope, listener))
        return listener


def _free_ports(count: int, family: int = socket.AF_INET) -> list[int]:
    socks = [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port(name: str, *cluster_ips: str, **extra: object) -> ServicePort:
    return ServicePort(name=ServicePortName("default", name, "", "TCP"), type="ClusterIP",
                       cluster_ips=cluster_ips, port=80, protocol="TCP", target_port=8080,
                       **extra)  # type: ignore[arg-type]


def test_cluster_only_ports_get_the_sockets_the_general_path_gives() -> None:
    low = _free_ports(1)[0]
    first = ListenerSet(PortAllocator((low, low + 40)), "127.0.0.1", ())
    proxy = _Proxy()
    try:
        first.ensure(_port("a", "10.0.0.1"), proxy)  # the short path (a new ClusterIP port)
        first.ensure(_port("b", "10.0.0.2", "fd00::2"), proxy)  # IPv6: not a served family
        ext = _port("c", "10.0.0.3", external_ips=("192.0.2.3",))  # the general path
        first.ensure(ext, proxy)
        a, b = ServicePortName("default", "a", "", "TCP"), ServicePortName("default", "b", "",
                                                                           "TCP")
        assert set(first.listeners) == {
            ListenerKey(a, "cluster", "127.0.0.1", 0, 4),
            ListenerKey(b, "cluster", "127.0.0.1", 0, 4),
            ListenerKey(ext.name, "cluster", "127.0.0.1", 0, 4),
            ListenerKey(ext.name, "external", "127.0.0.1", 0, 4)}
        assert [(n.name, scope) for n, scope, _ in proxy.served] == [
            ("a", "cluster"), ("b", "cluster"), ("c", "cluster"), ("c", "external")]
        assert first.proxy_ports(a) == {("cluster", 4): proxy.served[0][2].port}
        assert not first.bind_failures
        # ensuring again changes nothing; a port that lost its last ClusterIP family closes
        first.ensure(_port("a", "10.0.0.1"), proxy)
        assert len(proxy.served) == 4
        first.ensure(_port("b", "fd00::2"), proxy)
        assert first.proxy_ports(b) == {} and proxy.served[1][2].sock.fileno() == -1
    finally:
        first.close_all()


def test_a_proxy_port_that_cannot_be_bound_is_reported_once_and_retried(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="uproxy")
    port = _free_ports(1)[0]
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    listeners = ListenerSet(PortAllocator((port, port)), "127.0.0.1", ())
    proxy = _Proxy()
    svc = _port("web", "10.0.0.9")
    try:
        listeners.ensure(svc, proxy)  # the short path (new)
        assert svc.name in listeners.bind_failures and not listeners.listeners
        listeners.ensure(svc, proxy)  # the general path (known)
        assert svc.name in listeners.bind_failures and not listeners.listeners
        lines = [r.getMessage() for r in caplog.records]
        assert lines == ["Service default/web: port (unnamed): cannot listen on a proxy port "
                         "127.0.0.1: already in use by another process"]
        blocker.close()
        listeners.ensure(svc, proxy)  # (a full sync retries it)
        assert svc.name not in listeners.bind_failures
        assert listeners.proxy_ports(svc.name) == {("cluster", 4): port}
    finally:
        blocker.close()
        listeners.close_all()
