"""Finding and reading this process's own sockets (the native engine's too) in tests."""

from __future__ import annotations

import os
import socket


def congestion(sock: socket.socket) -> str:
    """The TCP congestion control ``sock`` uses."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


def congestion_choices(family: int) -> tuple[str, list[str]]:
    """This namespace's default congestion control and the other allowed ones."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        default = congestion(probe)
    with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control") as f:
        return default, [a for a in f.read().split() if a != default]


def own_tcp_socket(local: tuple, peer: tuple) -> socket.socket | None:  # type: ignore[type-arg]
    """This process's TCP socket bound to ``local`` and connected to ``peer`` (a dup to
    close), or None."""
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue
        try:
            s = socket.socket(fileno=fd)
        except OSError:  # not a socket
            os.close(fd)
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.getsockname()[:2] == local[:2] \
                    and s.getpeername()[:2] == peer[:2]:
                return s
        except OSError:
            pass
        s.close()
    return None
