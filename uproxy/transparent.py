"""Pure: transparent backend connections -- the rules they need and who gets one.

kube-proxy's iptables mode only rewrites the destination, so a backend sees the
client's address. A userspace proxy opens its own connection to the backend and
the backend sees the node -- unless that connection is opened from the client's
address: an ``IP_TRANSPARENT`` socket bound to the client's address (HAProxy's
``usesrc clientip``). The backend's replies are addressed to the client; they reach
the node (the client's address routes here) and would be forwarded on to the real
client, so two things steer them into uproxy's socket instead:

* a ``mangle`` rule: ``-m socket --transparent`` finds the local transparent socket a
  packet belongs to and sets uproxy's mark bit (:data:`MARK`). It lives in uproxy's
  own chain, :data:`CHAIN`, hooked once from ``PREROUTING``, commented like the nat
  rules; the same text serves both families;
* policy routing: ``ip rule fwmark MARK/MARK lookup TABLE`` and, in :data:`TABLE`,
  ``local 0.0.0.0/0 dev lo`` (``::/0`` for IPv6), so a marked packet is delivered
  locally instead of forwarded.

The mark bit and the table number are declared here once. kube-proxy uses
``0x4000`` (masquerade) and ``0x8000`` (drop); Cilium's proxy marks live in
``0x0f00``; :data:`MARK` is a different single bit, always set and matched with its
mask, so other marks on the packet are left alone.

Who connects from the client's address (:func:`transparent_source`): only where
kube-proxy keeps the client address, and only where the replies can come back
through this node's IP stack (the client's address must route to this node from
the endpoint's node). The feasibility spike (kept with the issue) found
where they cannot: hairpin (the endpoint drops a packet from itself), node-local
clients (the address is the node's own), and a client on the same on-link subnet
of the same node interface as the endpoint (the same bridge: the endpoint answers
the client directly over L2, the frames are bridged, never routed, and the mark
has no effect). In those cases uproxy connects from the node's address, as it did
before this mode existed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

CHAIN = "UPROXY-TRANSPARENT"
MARK = 0x1000
"""uproxy's mark bit: replies to a transparent backend connection carry it."""
TABLE = 4096
"""The routing table that delivers marked packets locally."""
RULE_PREF = 100
"""Before ``main`` (32766); ``local`` (0) still comes first."""
MARK_TEXT = f"{MARK:#x}/{MARK:#x}"
HOOK_COMMENT = "uproxy transparent backend connections"
RULE_COMMENT = "uproxy: replies to backend connections from the client address"
HOOKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("PREROUTING", ("-m", "comment", "--comment", HOOK_COMMENT, "-j", CHAIN)),
)
MARK_RULE = (f"-A {CHAIN} -m socket --transparent "
             f'-m comment --comment "{RULE_COMMENT}" -j MARK --set-xmark {MARK_TEXT}')

FAMILIES = (4, 6)


# --- mangle rules ---------------------------------------------------------------------------


def render_mangle(*, hooks: bool = False) -> str:
    """The ``mangle`` restore text (``--noflush``): uproxy's chain with its one rule.

    Declaring the chain flushes it, so each restore replaces it whole; ``hooks`` also
    inserts the jump from ``PREROUTING`` (only where none exists: a restore adds it
    again each time).
    """
    lines = ["*mangle", f":{CHAIN} - [0:0]", MARK_RULE]
    if hooks:
        lines.extend(render_hook(builtin, spec) for builtin, spec in HOOKS)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_hook(builtin: str, spec: tuple[str, ...]) -> str:
    words = [f'"{w}"' if " " in w else w for w in spec]
    return f"-I {builtin} 1 " + " ".join(words)


def render_mangle_cleanup(chains: Iterable[str]) -> str:
    """Restore text that flushes and deletes uproxy's mangle chains (hooks removed first)."""
    own = sorted(c for c in set(chains) if c.startswith("UPROXY-"))
    if not own:
        return ""
    return "\n".join(["*mangle", *(f":{c} - [0:0]" for c in own),
                      *(f"-X {c}" for c in own), "COMMIT"]) + "\n"


def chain_intact(save_text: str) -> bool:
    """``iptables-save -t mangle`` shows the chain with exactly its rule and one hook."""
    lines = [line.strip() for line in save_text.splitlines()]
    own = [line for line in lines if line.startswith(f"-A {CHAIN} ")]
    hooks = [line for line in lines if line.startswith("-A ") and line.endswith(f"-j {CHAIN}")]
    return own == [MARK_RULE] and len(hooks) == 1 and hooks[0].startswith("-A PREROUTING ")


# --- policy routing -------------------------------------------------------------------------


def rule_spec(*, pref: bool = True) -> tuple[str, ...]:
    """``ip rule add`` arguments of uproxy's rule (the same for ``-4`` and ``-6``); without
    ``pref``, for ``ip rule del``: deletes one such rule whatever its preference."""
    spec = ("fwmark", MARK_TEXT, "lookup", str(TABLE))
    return (*spec, "pref", str(RULE_PREF)) if pref else spec


def route_spec(family: int) -> tuple[str, ...]:
    """``ip route replace|del`` arguments of the one route in :data:`TABLE`."""
    return ("local", "::/0" if family == 6 else "0.0.0.0/0", "dev", "lo", "table", str(TABLE))


_RULE_LINE = re.compile(r"^\s*(\d+):\s+from all fwmark (0x[0-9a-f]+)/(0x[0-9a-f]+) lookup (\S+)")


def count_rules(show_text: str) -> int:
    """How many of uproxy's rules ``ip rule show`` lists (0: missing; >1: duplicates)."""
    n = 0
    for line in show_text.splitlines():
        m = _RULE_LINE.match(line)
        if m and int(m[2], 16) == MARK and int(m[3], 16) == MARK and m[4] == str(TABLE):
            n += 1
    return n


def route_present(show_text: str) -> bool:
    """``ip route show table TABLE`` lists the local default route."""
    return any(line.split()[:2] in (["local", "default"], ["local", "0.0.0.0/0"],
                                    ["local", "::/0"])
               for line in show_text.splitlines() if line.strip())


# --- who connects from the client's address -------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeLinks:
    """What the decision needs to know about the node's network: its own addresses and
    its on-link (directly connected, no gateway) prefixes with their interface."""

    local: frozenset[str] = frozenset()
    on_link: tuple[tuple[str, str], ...] = ()  # (prefix, interface)
    default_devs: frozenset[str] = frozenset()  # interfaces of the default routes (uplinks)
    _nets: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = field(
        default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nets = []
        for prefix, dev in self.on_link:
            try:
                nets.append((ipaddress.ip_network(prefix, strict=False), dev))
            except ValueError:
                continue
        # Longest prefix first: the first match is the route the kernel would use.
        nets.sort(key=lambda n: -n[0].prefixlen)
        object.__setattr__(self, "_nets", tuple(nets))

    def interface_of(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """The interface ``ip`` is directly reachable on, or None (routed via a gateway)."""
        for net, dev in self._nets:
            if net.version == ip.version and ip in net:
                return dev
        return None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a v4 client on a dual-stack socket
    return ip


def transparent_source(client_ip: str, endpoint_ip: str, *, external: bool,
                       external_local: bool, links: NodeLinks,
                       endpoint_here: bool = True) -> str | None:
    """The address to connect to ``endpoint_ip`` from: the client's, or None for the node's.

    The client's address where kube-proxy keeps it -- ClusterIP traffic, and external
    traffic (NodePort, externalIP, LoadBalancer IP) under ``externalTrafficPolicy:
    Local`` -- except where the replies would not come back to this node's IP stack:

    * hairpin (the client is the endpoint): kube-proxy masquerades it too;
    * a client on the node itself (its own or a loopback address): the node's
      traffic is masqueraded by kube-proxy, and a loopback source cannot leave the node;
    * an endpoint on the node itself (a host-network pod): its replies leave through
      ``OUTPUT`` towards the client and never pass ``PREROUTING``;
    * an endpoint said to be on this node that the node has no on-link route to (the
      links were read before its interface existed, e.g. the CNI's bridge): whether it
      shares a link with the client is unknown until the links are read again;
    * a client on the same on-link subnet of the same interface as the endpoint (the
      same bridge): the endpoint would answer the client directly over L2;
    * an endpoint on another node (``endpoint_here`` False, also when its node is not
      known) and a client that is not a pod of this node: the other node sends the
      reply where the client's address routes from there, which is this node only for
      this node's pods. A pod of this node is told by its route here: on-link, on an
      interface that is not an uplink (no default route on it). A client behind a
      router, or a host on the node network, gets the node's address: kube-proxy
      masquerades such off-cluster clients too (with its cluster CIDR set).
    """
    client = _address(client_ip)
    endpoint = _address(endpoint_ip)
    if client is None or endpoint is None or client.version != endpoint.version:
        return None
    if external and not external_local:
        return None
    if client == endpoint:
        return None
    if (client.is_loopback or client.is_unspecified or client.is_multicast
            or str(client) in links.local):
        return None
    if endpoint.is_loopback or str(endpoint) in links.local:
        return None
    client_dev = links.interface_of(client)
    endpoint_dev = links.interface_of(endpoint)
    if endpoint_here and endpoint_dev is None:
        return None
    if client_dev is not None and client_dev == endpoint_dev:
        return None
    if not endpoint_here and (client_dev is None or client_dev in links.default_devs):
        return None
    return str(client)


def parse_links(addr_json: Iterable[dict[str, object]],
                routes_json: Iterable[dict[str, object]]) -> NodeLinks:
    """:class:`NodeLinks` from ``ip -j addr show`` and ``ip -j route show`` (both families).

    On-link routes are the unicast routes with a device and no gateway, other than
    a default route (a ``default dev X`` route says nothing about who shares a link);
    the devices of default routes are the node's uplinks.
    """
    local = set()
    for link in addr_json:
        infos = link.get("addr_info")
        for info in infos if isinstance(infos, list) else ():
            if isinstance(info, dict) and isinstance(info.get("local"), str):
                local.add(str(_address(info["local"]) or info["local"]))
    on_link = []
    uplinks = set()
    for route in routes_json:
        dst, dev = route.get("dst"), route.get("dev")
        if not isinstance(dst, str) or not isinstance(dev, str):
            continue
        if dst == "default":
            uplinks.add(dev)
            continue
        if "gateway" in route or route.get("type", "unicast") != "unicast":
            continue
        on_link.append((dst, dev))
    return NodeLinks(frozenset(local), tuple(on_link), frozenset(uplinks))
