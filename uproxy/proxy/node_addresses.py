"""The node's own addresses, for NodePort sockets (``--nodeport-addresses``).

An edge: it asks ``ip`` (iproute2) rather than parsing ``/proc``, because
``ip -j`` gives every address of every link, secondary ones included, as JSON.
Link-local IPv6 addresses are left out (a socket on one needs its interface, and
NodePorts are not reached that way).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Collection, Sequence

ANY_ADDRESS = "0.0.0.0"
ANY_ADDRESS6 = "::"
ANY = {4: ANY_ADDRESS, 6: ANY_ADDRESS6}
#: ``--nodeport-addresses primary``: the node's primary address of each family.
PRIMARY = "primary"
_PROBE = {4: "192.0.2.1", 6: "2001:db8::1"}  # documentation addresses: never sent to


def node_addresses(families: Collection[int] = (4,)) -> list[str]:
    """Every address of the given families configured on this node (network namespace)."""
    wanted = set(families)
    flag = ["-4"] if wanted == {4} else ["-6"] if wanted == {6} else []
    try:
        out = subprocess.run(["ip", "-j", *flag, "addr", "show"], capture_output=True,
                             text=True, timeout=5, check=True).stdout
        data = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    found = []
    for link in data:
        for a in link.get("addr_info", []):
            if "local" not in a or a.get("scope") == "link":
                continue
            family = 6 if a.get("family") == "inet6" else 4
            if family in families:
                found.append(a["local"])
    return found


def primary_addresses(node_ips: Sequence[str], families: Collection[int] = (4,)) -> list[str]:
    """The node's primary address of each family: its Node object's (``node_ips``, as
    kube-proxy), else the source address of that family's default route (``ip route get``
    only looks the route up; nothing is sent); never a loopback address."""
    out: list[str] = []
    for family in sorted(set(families)):
        ips = [ip for ip in node_ips if (":" in ip) == (family == 6)]
        if not ips:
            try:
                text = subprocess.run(["ip", "-j", f"-{family}", "route", "get", _PROBE[family]],
                                      capture_output=True, text=True, timeout=5,
                                      check=True).stdout
                ips = [r["prefsrc"] for r in json.loads(text) if "prefsrc" in r]
            except (OSError, subprocess.SubprocessError, ValueError, TypeError):
                ips = []
        out.extend(ip for ip in ips[:1] if not ipaddress.ip_address(ip).is_loopback)
    return out


def nodeport_addresses(cidrs: Sequence[str], node_ips: Sequence[str] = (),
                       families: Collection[int] = (4,)) -> list[str]:
    """Where NodePorts listen: every address of each family (no CIDRs), the node's
    addresses in ``cidrs``, or with ``primary`` the node's primary address of each family
    (:func:`primary_addresses`)."""
    if not cidrs:
        return [ANY[f] for f in sorted(set(families))]
    if tuple(cidrs) == (PRIMARY,):
        return primary_addresses(node_ips, families)
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return [a for a in node_addresses(families)
            if any(ipaddress.ip_address(a) in n for n in nets)]
