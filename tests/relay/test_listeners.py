"""The listener set opens each service port's sockets (uproxy.proxy.listeners.ListenerSet).

A start opens 10,000 ClusterIP-only service ports through a short path (issue 16's
start-up); these check it opens what the general path opens, reports a port it cannot
bind once with the service named, and that the next ensure retries it. Real sockets on
the loopback addresses.
"""

from __future__ import annotations

import errno
import logging
import os
import random
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


def _free_window(count: int) -> int:
    """The first of ``count`` consecutive ports free for TCP and UDP on both loopbacks,
    below the ephemeral range (where other tests' client sockets come and go)."""
    rng = random.Random()
    for _ in range(200):
        low = rng.randrange(15000, 30000)
        socks: list[socket.socket] = []
        try:
            for port in range(low, low + count):
                for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
                                     (socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                        sock = socket.socket(family, kind)
                        socks.append(sock)
                        if family == socket.AF_INET6:
                            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        sock.bind((host, port))
                        sock.close()
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return low
    raise AssertionError(f"no {count} consecutive free ports found")


def _twins() -> list[str]:
    from uproxy import native
    return ["native", "python"] if native.AVAILABLE else ["python"]


@pytest.fixture(params=_twins())
def twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``PortAllocator.open_many``'s C call (native/sockets.c) or its Python twin."""
    from uproxy import native
    if request.param == "python":
        monkeypatch.setattr(native, "AVAILABLE", False)
    return str(request.param)


def test_open_many_walks_the_range_as_open_does(twin: str) -> None:
    """Both families, a taken port and an avoided one skipped, the cursor moved as
    ``open`` moves it, then the range exhausted: that socket's error only."""
    low = _free_window(6)
    taken = socket.socket()
    taken.bind(("127.0.0.1", low + 1))
    taken.listen()
    allocator = PortAllocator((low, low + 5))
    allocator.avoid.add(low + 2)
    socks: list[socket.socket] = []
    try:
        opened = allocator.open_many(socket.SOCK_STREAM,
                                     ["127.0.0.1", "::1", "127.0.0.1", "127.0.0.1", "::1"])
        socks = [s for s in opened if isinstance(s, socket.socket)]
        assert [s.getsockname()[:2] if isinstance(s, socket.socket) else None
                for s in opened] == [("127.0.0.1", low), ("::1", low + 1),
                                     ("127.0.0.1", low + 3), ("127.0.0.1", low + 4),
                                     ("::1", low + 5)]
        for s in socks:  # as bind() makes them: non-blocking, listening, v6 only
            assert s.gettimeout() == 0.0 and not s.get_inheritable()
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
            if s.family == socket.AF_INET6:
                assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert allocator._cursor == low
        allocator.avoid.add(low + 5)  # (IPv4's last free one)
        (full,) = allocator.open_many(socket.SOCK_STREAM, ["127.0.0.1"])
        assert isinstance(full, OSError) and full.errno == errno.EADDRINUSE
        assert str(low) in str(full)
        udp = allocator.open_many(socket.SOCK_DGRAM, ["::1", "192.0.2.1"])
        assert isinstance(udp[0], socket.socket) and udp[0].type == socket.SOCK_DGRAM
        socks.append(udp[0])
        assert udp[0].getsockname()[1] == low  # (UDP's port space is its own)
        assert isinstance(udp[1], OSError) and udp[1].errno == errno.EADDRNOTAVAIL
        assert udp[1].strerror == os.strerror(errno.EADDRNOTAVAIL)
    finally:
        taken.close()
        for s in socks:
            s.close()


def test_the_walk_never_shares_a_udp_port(twin: str) -> None:
    """A UDP port one of the allocator's own sockets holds is in use for the walk, as a
    TCP one is: two UDP sockets that both had SO_REUSEADDR could bind one port (the new
    one taking the other service's datagrams), so UDP ones go without it."""
    low = _free_window(1)
    allocator = PortAllocator((low, low))
    socks: list[socket.socket] = []
    try:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            (first,) = allocator.open_many(kind, ["127.0.0.1"])
            assert isinstance(first, socket.socket) and first.getsockname()[1] == low
            socks.append(first)
            (again,) = allocator.open_many(kind, ["127.0.0.1"])  # (the cursor is on it again)
            if isinstance(again, socket.socket):
                socks.append(again)
            assert isinstance(again, OSError) and again.errno == errno.EADDRINUSE
            assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) \
                == int(kind == socket.SOCK_STREAM)
    finally:
        for sock in socks:
            sock.close()


def test_ports_ensured_together_open_what_one_by_one_opens_and_report_once(
        twin: str, caplog: pytest.LogCaptureFixture) -> None:
    """``ensure_many`` (the first sync's 10,000): new ClusterIP-only ports opened
    together, the others through ``ensure``; a port that cannot be bound is the same
    one line as before, and the next ensure retries it."""
    caplog.set_level(logging.WARNING, logger="uproxy")
    low = _free_window(2)
    blocker = socket.socket()
    blocker.bind(("0.0.0.0", low + 1))
    blocker.listen()
    listeners = ListenerSet(PortAllocator((low, low + 1)), "0.0.0.0", (), families=(4, 6))
    proxy = _Proxy()
    a, b = _port("a", "10.0.0.1", "fd00::1"), _port("b", "10.0.0.2")
    try:
        listeners.ensure_many([(a, proxy), (b, proxy)])
        assert listeners.proxy_ports(a.name) == {("cluster", 4): low, ("cluster", 6): low + 1}
        assert b.name in listeners.bind_failures and not listeners.proxy_ports(b.name)
        assert a.name not in listeners.bind_failures
        assert [r.getMessage() for r in caplog.records] == [
            "Service default/b: port (unnamed): cannot listen on a proxy port 0.0.0.0: "
            "already in use by another process"]
        listeners.ensure_many([(a, proxy), (b, proxy)])  # (known now: the general path)
        assert len(caplog.records) == 1 and len(proxy.served) == 2
        blocker.close()
        listeners.ensure_many([(b, proxy)])  # (a full sync retries it)
        assert b.name not in listeners.bind_failures
        assert listeners.proxy_ports(b.name) == {("cluster", 4): low + 1}
        assert [(n.name, scope) for n, scope, _ in proxy.served] == [
            ("a", "cluster"), ("a", "cluster"), ("b", "cluster")]
    finally:
        blocker.close()
        listeners.close_all()


def test_open_ahead_gives_what_open_many_gives_and_closes_what_it_did_not_hand_out(
        twin: str) -> None:
    """``open_ahead`` (chunks opened by a worker thread while the caller takes the ones
    before): the same sockets in the same order; closed early, no fd is left open."""
    low = _free_window(8)
    addresses = ["127.0.0.1", "::1"] * 4 + ["127.0.0.1"]
    before = len(os.listdir("/proc/self/fd"))
    allocator = PortAllocator((low, low + 7))
    opened = list(allocator.open_ahead(socket.SOCK_STREAM, addresses, chunk=2))
    try:
        assert [s.getsockname()[:2] if isinstance(s, socket.socket) else None
                for s in opened] == [(a, low + i) for i, a in enumerate(addresses[:8])] + [
                    ("127.0.0.1", low + 1)]  # (wrapped: low is IPv4's already)
    finally:
        for s in opened:
            if isinstance(s, socket.socket):
                s.close()
    assert len(os.listdir("/proc/self/fd")) == before
    allocator = PortAllocator((low, low + 7))
    early = allocator.open_ahead(socket.SOCK_STREAM, addresses, chunk=2)
    first = next(early)
    second = next(early)
    early.close()  # (the rest of its chunk, and the chunk being opened ahead, close)
    assert isinstance(first, socket.socket) and isinstance(second, socket.socket)
    first.close()
    second.close()
    assert len(os.listdir("/proc/self/fd")) == before
