"""Pure filter-table rules: what kube-proxy filters in the kernel, before uproxy's sockets.

uproxy owns one filter chain, ``UPROXY-FIREWALL``, hooked from ``INPUT`` (traffic from
pods and other hosts, which the nat ``REDIRECT`` delivers locally) and ``OUTPUT``
(traffic from the node itself), for new connections only. Since a redirected packet's
destination is already the proxy socket's, the rules match the *original* destination
with ``-m conntrack --ctorigdst/--ctorigdstport``; NodePorts, which are plain listening
sockets, match ``--dst-type LOCAL`` and the port. Comments read
``namespace/name:port ...`` as kube-proxy's do. Per service port, in this order:

* no usable endpoint anywhere: UDP to its ClusterIPs, externalIPs, LoadBalancer IPs and
  NodePort is ``REJECT``ed (ICMP port unreachable at once, kube-proxy's "has no
  endpoints"; TCP gets the proxy's RST, which the client sees the same way);
* ``internalTrafficPolicy: Local`` and no usable endpoint on this node: its ClusterIPs
  ``DROP`` ("has no local endpoints");
* ``externalTrafficPolicy: Local`` and no usable endpoint on this node: its externalIPs,
  LoadBalancer IPs and NodePort ``DROP`` (not reject: the load balancer's health check
  moves clients away, they should retry meanwhile);
* ``loadBalancerSourceRanges``: to its LoadBalancer IPs, the listed sources ``RETURN``
  (go on to the proxy), and when a range holds the node's primary IP every local source
  too (service-proxy.md); every other source is ``DROP``ped. NodePorts, externalIPs and
  ClusterIPs are not subject to the ranges, as in kube-proxy.

The chain is written whole with one ``iptables-restore --noflush`` per change, beside
the nat one (:mod:`uproxy.rules`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from uproxy.balance import usable_endpoints
from uproxy.redirects import service_families
from uproxy.rules import CHAIN_PREFIX, safe_comment
from uproxy.state import Entry

FIREWALL = "UPROXY-FIREWALL"
FILTER_HOOK_COMMENT = "uproxy firewall"
FILTER_HOOKS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (builtin, ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
               FILTER_HOOK_COMMENT, "-j", FIREWALL))
    for builtin in ("INPUT", "OUTPUT")
)


def _family(address: str) -> int:
    return 6 if ":" in address else 4


def _to(address: str, port: int, proto: str) -> str:
    prefix = 128 if _family(address) == 6 else 32
    return (f"-p {proto} -m conntrack --ctorigdst {address}/{prefix} "
            f"--ctorigdstport {port}")


def _node_port(port: int, proto: str) -> str:
    return f"-p {proto} -m addrtype --dst-type LOCAL -m {proto} --dport {port}"


def _line(match: str, comment: str, target: str) -> str:
    return f'-A {FIREWALL} {match} -m comment --comment "{safe_comment(comment)}" -j {target}'


def filter_rules_of(entry: Entry, *, node_name: str, node_ips: Sequence[str] = (),
                    family: int = 4) -> list[str]:
    """The filter lines of one service port for one address family (see the module)."""
    port = entry.port
    if port.protocol != "UDP" and not (port.internal_local or port.external_local
                                       or port.source_ranges):
        return []  # the common case, first: 10,000 services cost ~2 ms, not ~200
    if family not in service_families(port):
        return []  # a family the Service does not have: nothing of it is served
    mine = [e for e in entry.endpoints if _family(e.ip) == family]  # each family on its own
    has_any = any(e.ready or (e.serving and e.terminating) for e in mine)
    if has_any and not (port.internal_local or port.external_local or port.source_ranges):
        return []
    proto = port.protocol.lower()
    name = str(port.name)
    cluster = [a for a in port.cluster_ips if _family(a) == family]
    external = [a for a in port.external_ips if _family(a) == family]
    balancers = [a for a in port.load_balancer_ips if _family(a) == family]
    out: list[str] = []
    if not has_any:
        if port.protocol == "UDP":
            comment = f"{name} has no endpoints"
            out.extend(_line(_to(a, port.port, proto), comment, "REJECT")
                       for a in (*cluster, *external, *balancers))
            if port.node_port:
                out.append(_line(_node_port(port.node_port, proto), comment, "REJECT"))
        return out
    comment = f"{name} has no local endpoints"
    if port.internal_local and not usable_endpoints(entry, external=False, node_name=node_name,
                                                    family=family):
        out.extend(_line(_to(a, port.port, proto), comment, "DROP") for a in cluster)
    external_local_empty = port.external_local and not usable_endpoints(
        entry, external=True, node_name=node_name, family=family)
    if external_local_empty:
        out.extend(_line(_to(a, port.port, proto), comment, "DROP")
                   for a in (*external, *balancers))
        if port.node_port:
            out.append(_line(_node_port(port.node_port, proto), comment, "DROP"))
    ranges = [r for r in port.source_ranges if _family(r) == family]
    if ranges and balancers and not external_local_empty:
        nets = [ipaddress.ip_network(r) for r in ranges]
        node_listed = any(ipaddress.ip_address(ip) in net for ip in node_ips
                          if _family(ip) == family for net in nets)
        allowed = f"{name} loadbalancer IP source ranges"
        refused = f"{name} traffic not accepted by loadBalancerSourceRanges"
        for address in balancers:
            to = _to(address, port.port, proto)
            out.extend(_line(f"-s {r} {to}", allowed, "RETURN") for r in ranges)
            if node_listed:
                out.append(_line(f"-m addrtype --src-type LOCAL {to}", allowed, "RETURN"))
            out.append(_line(to, refused, "DROP"))
    return out


def render_filter(lines: Iterable[str], *, stale_chains: Iterable[str] = (),
                  hooks: bool = False) -> str:
    """The complete ``filter`` restore text: the chain (flushed by declaring it), ``lines``
    as given, ``stale_chains`` (other ``UPROXY-*`` filter chains) deleted, and with
    ``hooks`` the jumps from INPUT and OUTPUT (only right after a cleanup)."""
    out = ["*filter", f":{FIREWALL} - [0:0]"]
    stale = sorted(c for c in set(stale_chains) if c.startswith(CHAIN_PREFIX) and c != FIREWALL)
    out.extend(f":{c} - [0:0]" for c in stale)
    out.extend(lines)
    out.extend(f"-X {c}" for c in stale)
    if hooks:
        for builtin, spec in FILTER_HOOKS:
            words = [f'"{w}"' if " " in w else w for w in spec]
            out.append(f"-I {builtin} 1 " + " ".join(words))
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_filter_cleanup(chains: Iterable[str]) -> str:
    """Restore text that flushes and deletes the given uproxy filter chains."""
    own = sorted(c for c in set(chains) if c.startswith(CHAIN_PREFIX))
    if not own:
        return ""
    return "\n".join(["*filter", *(f":{c} - [0:0]" for c in own),
                      *(f"-X {c}" for c in own), "COMMIT"]) + "\n"
