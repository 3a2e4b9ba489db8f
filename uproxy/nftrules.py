"""Pure rule rendering for nftables: the desired redirects -> ``nft -f`` text.

Why a map and not a chain: the iptables chain ``UPROXY-SERVICES`` is walked
one rule per service port by the first packet of every connection, so new
connections/s fall with the number of Services (0.2x with 10,000 in the
measurement spike, ``bench/ANALYSIS.md``). Here each family gets uproxy's own
table with one map ``services`` keyed ``daddr . l4proto . dport`` -> proxy
port, and one ``redirect`` rule per hook that looks the packet up in it:
constant time, one map for TCP, UDP and SCTP::

    table ip uproxy {
      map services {
        type ipv4_addr . inet_proto . inet_service : inet_service
        elements = { 10.0.0.180 . tcp . 6789 comment "default/multi-port:port1 cluster IP" : 40000 }
      }
      chain prerouting {
        type nat hook prerouting priority dstnat - 1; policy accept;
        meta l4proto { tcp, udp, sctp } redirect to : ip daddr . meta l4proto . th dport map ...
      }
      chain output { type nat hook output priority -101; ... the same rule ... }
    }

- Priority ``dstnat - 1`` (-101) runs before iptables-nft's ``nat`` table and
  kube-proxy's nftables table (both ``dstnat``); the first NAT binding wins, and
  a connection whose address is not in the map falls through to them unchanged.
  nft 1.0.6 rejects ``dstnat`` on the output hook of family ``ip``, hence -101.
- nft insists on a transport-protocol match before a ``th dport`` mapping:
  ``meta l4proto { ... }``.
- Each element carries the comment ``namespace/name:port kind`` (kube-proxy's
  comment, :attr:`uproxy.rules.Redirect.comment`), which ``nft list`` prints, so
  ``uproxy rules`` reads like the ``iptables-save`` excerpts. nft allows 128
  characters.
- :func:`render` replaces the whole table in one transaction: ``table`` (create
  if missing) + ``delete table`` + the full definition. One ``nft -f`` is one
  netlink transaction, so nothing ever sees a half table, anything someone
  deleted or added in uproxy's table is repaired, and the new base chains are
  registered before the old ones go, so the NAT of open connections never lapses.
- :func:`render_changes` sends one sync's element deltas (milliseconds, where a
  full replace of 10,000 elements takes about half a second).
- :func:`render_cleanup` deletes uproxy's tables only. Never ``flush ruleset``:
  that also wipes iptables-nft's tables and kube-proxy's.
- A key can only be in a map once. Two redirects for the same address, protocol
  and port (an externalIP that equals another Service's ClusterIP) keep the
  first in the usual rule order, which is also the rule that would have acted
  first in the iptables chain.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from uproxy.rules import HOOK_COMMENT, Redirect

TABLE = "uproxy"
MAP = "services"
COMMENT_MAX = 128
"""nft rejects longer element comments ("comment too long, 128 characters maximum")."""
PROTOCOLS = ("tcp", "udp", "sctp")
PREROUTING_PRIORITY = "dstnat - 1"
OUTPUT_PRIORITY = "-101"

Key = tuple[str, str, int]
"""``(address, protocol, port)``: what the map is keyed by (protocol lower case)."""


def family_keyword(family: int) -> str:
    """nft's table family: ``ip`` or ``ip6``."""
    return "ip6" if family == 6 else "ip"


def _addr_type(family: int) -> str:
    return "ipv6_addr" if family == 6 else "ipv4_addr"


def _order(r: Redirect) -> tuple[str, str, str, str, str, str, int, str, int]:
    """The dataclass order of a Redirect as one tuple (as :mod:`uproxy.rules` sorts)."""
    n = r.name
    return (n.namespace, n.name, n.port, n.protocol, r.kind, r.address, r.port, r.protocol,
            r.to_port)


def key(r: Redirect) -> Key:
    return (r.address, r.protocol.lower(), r.port)


def comment(r: Redirect) -> str:
    return r.comment[:COMMENT_MAX]


def _by_key(redirects: Iterable[Redirect], family: int) -> dict[Key, Redirect]:
    """One redirect per key, the first in rule order; no sort (a sync diffs 10,000s)."""
    out: dict[Key, Redirect] = {}
    for r in redirects:
        if r.family != family:
            continue
        k = key(r)
        other = out.get(k)
        if other is None or _order(r) < _order(other):
            out[k] = r
    return out


def elements(redirects: Iterable[Redirect], *, family: int) -> list[Redirect]:
    """The redirects of one family as map elements: sorted, one per key (the first wins)."""
    return sorted(_by_key(redirects, family).values(), key=_order)


def render_element(r: Redirect) -> str:
    """``10.0.0.180 . tcp . 6789 comment "..." : 40000``."""
    address, proto, port = key(r)
    return f'{address} . {proto} . {port} comment "{comment(r)}" : {r.to_port}'


def _render_key(k: Key) -> str:
    address, proto, port = k
    return f"{address} . {proto} . {port}"


def _hook_rule(family: int) -> str:
    daddr = "ip6 daddr" if family == 6 else "ip daddr"
    protos = ", ".join(PROTOCOLS)
    return (f"meta l4proto {{ {protos} }} redirect to : {daddr} . meta l4proto . th dport "
            f'map @{MAP} comment "{HOOK_COMMENT}"')


def render(redirects: Iterable[Redirect], *, family: int = 4) -> str:
    """The complete ``nft -f`` text for one family: replaces uproxy's table atomically."""
    fam = family_keyword(family)
    elems = elements(redirects, family=family)
    lines = [
        f"table {fam} {TABLE}",
        f"delete table {fam} {TABLE}",
        f"table {fam} {TABLE} {{",
        f"\tmap {MAP} {{",
        f"\t\ttype {_addr_type(family)} . inet_proto . inet_service : inet_service",
    ]
    if elems:
        lines.append("\t\telements = { " + ",\n\t\t\t     ".join(render_element(r) for r in elems)
                     + " }")
    lines.append("\t}")
    for chain, hook, priority in (("prerouting", "prerouting", PREROUTING_PRIORITY),
                                  ("output", "output", OUTPUT_PRIORITY)):
        lines += [
            f"\tchain {chain} {{",
            f"\t\ttype nat hook {hook} priority {priority}; policy accept;",
            f"\t\t{_hook_rule(family)}",
            "\t}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_changes(old: Iterable[Redirect], new: Iterable[Redirect], *, family: int = 4) -> str:
    """``nft -f`` text that turns the map holding ``old`` into one holding ``new`` ("" if same).

    ``old`` must be what the map holds now (the last render): nft refuses to
    delete a missing element or to add a key that is present with another
    port, and then applies nothing of the file (re-adding an identical element
    is accepted). Changed elements (new proxy port or comment) are
    deleted and added again in the same transaction.
    """
    fam = family_keyword(family)
    before = _by_key(old, family)
    after = _by_key(new, family)
    changed = {k for k, r in after.items() if k in before and _changed(before[k], r)}
    gone = [k for k in before if k not in after or k in changed]
    came = [r for k, r in after.items() if k not in before or k in changed]
    lines = []
    if gone:
        lines.append(f"delete element {fam} {TABLE} {MAP} {{ "
                     + ", ".join(_render_key(k) for k in sorted(gone)) + " }")
    if came:
        lines.append(f"add element {fam} {TABLE} {MAP} {{ "
                     + ", ".join(render_element(r) for r in sorted(came, key=_order)) + " }")
    return "".join(line + "\n" for line in lines)


class RulesDelta:
    """The redirects one sync took away (``old``) and put in (``new``), of the service ports
    whose redirects changed: the nft map's element delta from them alone is the one from
    the whole lists (:func:`render_changes`), at the cost of the change,
    when no map key they touch is claimed by another service port (a conflict: then which
    redirect wins depends on all of them, and the whole lists are compared).

    ``claims`` (map key -> how many service ports have a redirect with it) is kept up to
    date by :meth:`change`; ``since``: the redirects list before the sync (the delta holds
    only if the map held exactly those).
    """

    __slots__ = ("exact", "new", "old", "since")

    def __init__(self, since: list[Redirect]) -> None:
        self.since = since
        self.old: list[Redirect] = []
        self.new: list[Redirect] = []
        self.exact = True

    def change(self, claims: dict[Key, int], old: list[Redirect],
               new: list[Redirect]) -> None:
        self.old += old
        self.new += new
        for keys, step in (({key(r) for r in old}, -1),
                           ({key(r) for r in new}, 1)):
            for k in keys:
                before = claims.get(k, 0)
                after = before + step
                if before > 1 or after > 1:
                    self.exact = False
                if after:
                    claims[k] = after
                else:
                    del claims[k]



def _changed(a: Redirect, b: Redirect) -> bool:
    """Another proxy port or another comment (the comment is made of name and kind)."""
    return a.to_port != b.to_port or a.name != b.name or a.kind != b.kind


def render_cleanup(families: Iterable[int] = (4, 6)) -> str:
    """``nft -f`` text deleting uproxy's tables (and nothing else); fine if they are absent."""
    lines = []
    for family in sorted(set(families)):
        fam = family_keyword(family)
        lines += [f"table {fam} {TABLE}", f"delete table {fam} {TABLE}"]
    return "".join(line + "\n" for line in lines)


_TABLE_LINE = re.compile(r"^table (?P<family>ip6?) (?P<name>\S+)(?: \{)?$", re.MULTILINE)
_ELEMENTS = re.compile(r"elements = \{(?P<body>[^}]*)\}")
_ELEMENT = re.compile(
    r'(?P<addr>[0-9a-fA-F:.]+) \. (?P<proto>[a-z]+) \. (?P<port>\d+)'
    r'(?: comment "(?P<comment>[^"]*)")? : (?P<to>\d+)'
)


def parse_elements(text: str) -> list[tuple[str, str, int, str, int]]:
    """Read back ``(comment, address, port, PROTOCOL, to_port)`` from render or ``nft list`` text.

    The tuple is :func:`uproxy.rules.parse_rules`'s, so ``uproxy rules`` and the
    tests read both kinds of rules the same way. Elements of every ``elements``
    block in the text count (``nft list table ip uproxy`` has one).
    """
    out = []
    for block in _ELEMENTS.finditer(text):
        for m in _ELEMENT.finditer(block["body"]):
            out.append((m["comment"] or "", m["addr"], int(m["port"]), m["proto"].upper(),
                        int(m["to"])))
    return out


def uproxy_tables(list_tables_text: str) -> list[int]:
    """Families (4, 6) that have a uproxy table, from ``nft list chains`` (or ``list
    tables``) output."""
    found = set()
    for m in _TABLE_LINE.finditer(list_tables_text):
        if m["name"] == TABLE:
            found.add(6 if m["family"] == "ip6" else 4)
    return sorted(found)
