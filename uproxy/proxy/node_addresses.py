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


def node_addresses() -> list[str]:
    """Every IPv4 address configured on this node (network namespace)."""
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                             timeout=5, check=True).stdout
        data = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    return [a["local"] for link in data for a in link.get("addr_info", []) if "local" in a]


def nodeport_addresses(cidrs: Sequence[str]) -> list[str]:
    """Where NodePorts listen: every address (no CIDRs), or the node's addresses in ``cidrs``."""
    if not cidrs:
        return [ANY_ADDRESS]
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return [a for a in node_addresses() if any(ipaddress.ip_address(a) in n for n in nets)]
