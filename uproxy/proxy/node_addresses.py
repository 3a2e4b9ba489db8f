"""The node's own addresses, for NodePort sockets (``--nodeport-addresses``).

An edge: it asks ``ip`` (iproute2) rather than parsing ``/proc``, because
``ip -j`` gives every address of every link, secondary ones included, as JSON.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Sequence

ANY_ADDRESS = "0.0.0.0"
#: ``--nodeport-addresses primary``: the node's primary address of each family.
PRIMARY = "primary"


def node_addresses() -> list[str]:
    """Every IPv4 address configured on this node (network namespace)."""
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                             timeout=5, check=True).stdout
        data = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    return [a["local"] for link in data for a in link.get("addr_info", []) if "local" in a]


def primary_addresses(node_ips: Sequence[str]) -> list[str]:
    """The node's primary IPv4 address: its Node object's (``node_ips``, as kube-proxy),
    else the source address of the default route; never a loopback address."""
    ips = [ip for ip in node_ips if ":" not in ip]
    if not ips:
        try:
            out = subprocess.run(["ip", "-j", "-4", "route", "get", "192.0.2.1"],
                                 capture_output=True, text=True, timeout=5, check=True).stdout
            ips = [r["prefsrc"] for r in json.loads(out) if "prefsrc" in r]
        except (OSError, subprocess.SubprocessError, ValueError, TypeError):
            ips = []
    return [ip for ip in ips[:1] if not ipaddress.ip_address(ip).is_loopback]


def nodeport_addresses(cidrs: Sequence[str], node_ips: Sequence[str] = ()) -> list[str]:
    """Where NodePorts listen: every address (no CIDRs), the node's addresses in ``cidrs``,
    or with ``primary`` the node's primary address (:func:`primary_addresses`)."""
    if not cidrs:
        return [ANY_ADDRESS]
    if tuple(cidrs) == (PRIMARY,):
        return primary_addresses(node_ips)
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return [a for a in node_addresses() if any(ipaddress.ip_address(a) in n for n in nets)]
