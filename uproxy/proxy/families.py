"""Which address families this node can serve: IPv4 always, IPv6 when the kernel has it.

An edge (reads ``/proc`` and opens a socket). kube-proxy runs one proxier per
family the node supports; uproxy serves every family it can and skips a family
the node lacks (no IPv6 in the kernel, IPv6 disabled, no IPv6 address at all)
with one log line, never an error. Whether ``ip6tables`` works is the daemon's
second question (:meth:`uproxy.iptables.Iptables.unusable`).
"""

from __future__ import annotations

import socket
from pathlib import Path

IF_INET6 = Path("/proc/net/if_inet6")


def ipv6_missing(if_inet6: Path = IF_INET6) -> str | None:
    """Why this node (network namespace) cannot serve IPv6, or None when it can."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        text = if_inet6.read_text()
    except OSError:
        return "the kernel has no IPv6 (no /proc/net/if_inet6)"
    if not text.strip():
        return "the node has no IPv6 address (IPv6 disabled)"
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError as exc:
        return f"cannot open an IPv6 socket: {exc.strerror or exc}"
    return None
