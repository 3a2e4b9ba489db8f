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


# struct tcp_info (linux/tcp.h): tcpi_segs_in at byte 140, tcpi_data_segs_in at 152
_SEGS_IN, _DATA_SEGS_IN = 140, 152


def segments_in(sock: socket.socket) -> tuple[int, int]:
    """(segments, segments carrying data) ``sock`` has received, SYN included: the
    kernel's own count (``TCP_INFO``), so a test can see how the bytes and the
    handshake's ACK and FIN were packed into segments."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return (int.from_bytes(info[_SEGS_IN:_SEGS_IN + 4], "little"),
            int.from_bytes(info[_DATA_SEGS_IN:_DATA_SEGS_IN + 4], "little"))


def send_with_fin(sock: socket.socket, data: bytes) -> None:
    """``data`` and the FIN in one segment (MSG_MORE holds the bytes for SHUT_WR)."""
    sock.send(data, socket.MSG_MORE)
    sock.shutdown(socket.SHUT_WR)
